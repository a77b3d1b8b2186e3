"""Showing from a raw body's bytes that it holds no ignored user's non-state event, without
splitting it from the top (the guard's fast path).

Splitting a big answer level by level reads all of its bytes once per level on the way
to each mention of an ignored user; their state events, which are kept, are mentions in
most rooms of a ``/sync``. This reads the body only twice, with two byte searches, and
parses only the objects around the ignored users' ``sender`` members.

Why that is enough. An object whose ``sender`` decodes to an ignored ID has a member (the
last of its ``sender`` members, if there are duplicates) whose key decodes to ``sender``
and whose value decodes to that ID. If the body has no escape sequence that could spell a
character of ``sender`` or of an ignored ID, both are spelled minimally: the member reads
``"sender"``, JSON whitespace, ``:``, JSON whitespace, ``"`` + the ID's minimal spelling +
``"``. So every such object is around one of the places where the ID search finds an ID
that is a whole string and the value of a ``"sender"`` key; and each of those objects is
split and judged as the exact walk judges it.

Finding the object around a member (``_object_around``) without parsing from the top,
for a body that is valid JSON: the member's key opens outside any string, and the
object is the innermost one holding it. Going back from the key, every ``{`` before the
object's own is either inside a string or opens a container that closes before the key.
A parse starting at the first kind reads the rest of that string as structure and the
structure after it as strings (every unescaped quote flips both readings, and the one
that goes wrong has no backslash to lean on), so it fails at the key at the latest; a
parse starting at the second kind ends before the key. The first ``{`` back from the key
whose parse covers the member is therefore the object's own. (A match may start at a
quote escaped inside a longer key, ``"x\\"sender"``: the braces between the key's real
start and it are then inside a string, and the object found is the one holding that
key, judged as any other.)

Not JSON: a body no JSON parser reads holds no objects, and is left alone (the exact
walk refuses such a body if it starts with a bracket and mentions an ignored user; this
path may let it through). The same for a body nested deeper than any decoder here goes:
this shows, where the exact walk cannot, that it holds no ignored user's event.
"""

from __future__ import annotations

import json
from functools import lru_cache
from itertools import chain
from typing import Final

import msgspec

from .raw import Raw, decode_value, split_object
from .scan import escapes_of, mentions_for

__all__ = ["event_sender", "holds_no_ignored_event"]

_SENDER_KEY: Final = b'"sender"'
_WS: Final = b" \t\n\r"
_QUOTE: Final = ord('"')
_COLON: Final = ord(":")
_MAX_TRIES: Final = 32
"""``{`` tried back from a key before giving up (then the exact walk runs): bounds what a
body with many braces before a ``sender`` member costs here."""
_stdlib = json.JSONDecoder()
_STATE: Final[dict[str, Raw]] = {}


def event_sender(members: dict[str, Raw]) -> str | None:
    """The sender of an event-shaped object (string ``sender``, ``event_id`` and
    ``type``; state or not); None if it is not one."""
    sender = decode_value(members["sender"]) if "sender" in members else None
    if not isinstance(sender, str):
        return None
    for key in ("event_id", "type"):
        if key not in members or not isinstance(decode_value(members[key]), str):
            return None
    return sender


class _Searches:
    __slots__ = ("escapes", "ids", "needles")

    def __init__(self, ignored: frozenset[str]) -> None:
        escapes = escapes_of(frozenset(chain("sender", *ignored)))
        assert escapes is not None  # "sender" has characters
        self.escapes = escapes
        self.ids = mentions_for(ignored).pattern(False)
        self.needles = frozenset(msgspec.json.encode(uid)[1:-1] for uid in ignored)


@lru_cache(maxsize=256)
def _searches(ignored: frozenset[str]) -> _Searches | None:
    """None if an ID cannot be searched for as bytes (a lone surrogate)."""
    return None if mentions_for(ignored).always else _Searches(ignored)


def holds_no_ignored_event(body: bytes, ignored: frozenset[str]) -> bool:
    """True only if ``body`` (when it is JSON) certainly holds no event-shaped object
    without ``state_key`` sent by one of ``ignored``, anywhere: event content and
    redaction stubs included. False when that cannot be shown this way."""
    searches = _searches(ignored)
    if searches is None:
        return False
    if b"\\" in body and searches.escapes.search(body) is not None:
        return False
    text: str | None = None
    for match in searches.ids.finditer(body):
        start = match.start()
        key = _sender_key_before(body, start)
        if key < 0:
            continue
        end = body.find(b'"', start)
        if end < 0 or body[start:end] not in searches.needles:
            # not all of the string (one ID may begin another: the whole string is looked up)
            continue
        if text is None:
            # str indexes equal to byte offsets, for the stdlib parser
            text = body.decode("latin-1")
        members = _object_around(body, text, key, end)
        if members is None:
            return False
        if members is _STATE:
            continue
        sender = event_sender(members)
        if sender is not None and sender in ignored and "state_key" not in members:
            return False
    return True


def _skip_ws_back(body: bytes, i: int) -> int:
    while i >= 0 and body[i] in _WS:
        i -= 1
    return i


def _sender_key_before(body: bytes, start: int) -> int:
    """Where the ``"sender"`` key opens if the string value opening just before
    ``start`` is that key's; -1 if not."""
    i = start - 1
    if i < 0 or body[i] != _QUOTE:
        return -1
    i = _skip_ws_back(body, i - 1)
    if i < 0 or body[i] != _COLON:
        return -1
    i = _skip_ws_back(body, i - 1)
    key = i - len(_SENDER_KEY) + 1
    return key if key >= 0 and body[key : i + 1] == _SENDER_KEY else -1


def _object_around(body: bytes, text: str, key: int, value_end: int) -> dict[str, Raw] | None:
    """The members of the innermost object holding the member whose key opens at
    ``key`` and whose value closes at ``value_end``; ``_STATE`` if that object has a
    ``state_key`` (whatever else it holds, it is no hidden event); None if it was not
    found."""
    at = key
    for _ in range(_MAX_TRIES):
        at = body.rfind(b"{", 0, at)
        if at < 0:
            return None
        try:
            found, end = _stdlib.raw_decode(text, at)
        except (ValueError, RecursionError):
            continue
        if end > value_end:
            # A key reads "state_key" in the text decoded as Latin-1 exactly when it
            # does in UTF-8: only its ASCII bytes or escapes can spell that.
            return _STATE if "state_key" in found else split_object(body[at:end])
    return None
