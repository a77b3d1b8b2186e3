"""Showing from a raw body's bytes that it holds no ignored user's non-state event, without
splitting it from the top (the guard's fast path).

Splitting a big answer level by level reads all of its bytes once per level on the way
to each mention of an ignored user; their state events, which are kept, are mentions in
most rooms of a ``/sync``. This reads the body only twice, with two byte searches, and
parses only the objects around the ``sender`` members whose value is an ignored ID.

Why that is enough. An object whose ``sender`` decodes to an ignored ID has a member (the
last of its ``sender`` members, if there are duplicates) whose key decodes to ``sender``
and whose value decodes to that ID. If the body has no escape sequence that could spell a
character of ``sender``, the key is spelled minimally: the member reads ``"sender"``,
JSON whitespace, ``:``, JSON whitespace, and a string starting with ``@`` or ``\\u0040``
(every ID here starts with ``@``). The search finds every such member, however many IDs
are ignored: it looks up each one's value among the IDs' minimal spellings (a set), and
decodes the values with an escape in them (``scan.Mentions.decode_at``). Each object
around a member whose value is an ignored ID is split and judged as the exact walk
judges it. For a short list, where no escape could spell a character of ``sender`` or
of an ID either, one regex finds the IDs' strings and each is checked for a ``sender``
key before it (``"sender"``, whitespace, ``:``, whitespace, the opening quote): fewer
matches to look at than every ``sender`` member.

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
import re
from itertools import chain, compress
from operator import methodcaller
from typing import Final

from .raw import Raw, decode_value, split_object
from .scan import Mentions, escapes_of, mentions_for

__all__ = ["event_sender", "holds_no_ignored_event"]

_SENDER_MEMBER: Final = re.compile(rb'"sender"[ \t\n\r]*+:[ \t\n\r]*+"(@[^"\\]*+["\\]|\\u0040)')
"""A ``sender`` member whose value starts with ``@``: the value up to its first quote or
backslash (included), or its escaped ``@``."""
_SENDER_ESCAPES: Final = escapes_of(frozenset("sender")) or re.compile(b"(?!)")
"""Escapes that could spell a character of ``sender``."""
_QUOTE: Final = ord('"')
_COLON: Final = ord(":")
_WS: Final = b" \t\n\r"
_SENDER_KEY: Final = b'"sender"'
_SENDER: Final = frozenset("sender")
_VALUE: Final = methodcaller("group", 1)
_HAS_ESCAPE: Final = methodcaller("endswith", (b"\\", b"0"))
"""A ``_SENDER_MEMBER`` value with an escape: ending in a backslash, or ``\\u0040``."""
_START: Final = methodcaller("start")
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


def holds_no_ignored_event(body: bytes, ignored: frozenset[str]) -> bool:
    """True only if ``body`` (when it is JSON) certainly holds no event-shaped object
    without ``state_key`` sent by one of ``ignored``, anywhere: event content and
    redaction stubs included. False when that cannot be shown this way."""
    mentions = mentions_for(ignored)
    if not mentions.all_at:
        return False
    if mentions.short is not None:
        escapes = escapes_of(mentions.chars | _SENDER)
        if escapes is None or escapes.search(body) is None:
            return _no_hidden_short(body, ignored, mentions)
    if b"\\" in body and _SENDER_ESCAPES.search(body) is not None:
        return False
    members = list(_SENDER_MEMBER.finditer(body))
    values = list(map(_VALUE, members))
    # In C: the members whose value is an ID's minimal spelling, or has an escape.
    plain = compress(members, map(mentions.is_key, values))
    escaped = compress(members, map(_HAS_ESCAPE, values))
    judge = _Judge(body, ignored)
    for match in sorted(chain(plain, escaped), key=_START):
        if match.group(1)[-1] == _QUOTE:
            end = match.end() - 1
        else:
            try:
                decoded = mentions.decode_at(body, match.start(1))
            except ValueError:
                return False
            if decoded is None or decoded[0] not in ignored:
                continue
            end = decoded[1]
        if not judge.clear(match.start(), end):
            return False
    return True


def _no_hidden_short(body: bytes, ignored: frozenset[str], mentions: Mentions) -> bool:
    """``holds_no_ignored_event`` for a short list, in a body where no escape could
    spell a character of ``sender`` or of an ID: one search for the IDs' strings, and
    a look back from each for a ``sender`` key."""
    assert mentions.short is not None
    judge = _Judge(body, ignored)
    for match in mentions.short.finditer(body):
        key = _sender_key_before(body, match.start())
        if key >= 0 and not judge.clear(key, match.end() - 1):
            return False
    return True


class _Judge:
    """Judges the objects around ``sender`` members of a body, as the exact walk does."""

    __slots__ = ("body", "ignored", "text")

    def __init__(self, body: bytes, ignored: frozenset[str]) -> None:
        self.body = body
        self.ignored = ignored
        self.text: str | None = None

    def clear(self, key: int, value_end: int) -> bool:
        """False unless the object around the member whose key opens at ``key`` and
        whose value closes at ``value_end`` was found and is no hidden event."""
        if self.text is None:
            # str indexes equal to byte offsets, for the stdlib parser
            self.text = self.body.decode("latin-1")
        around = _object_around(self.body, self.text, key, value_end)
        if around is None:
            return False
        if around is _STATE:
            return True
        sender = event_sender(around)
        return sender is None or sender not in self.ignored or "state_key" in around


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
