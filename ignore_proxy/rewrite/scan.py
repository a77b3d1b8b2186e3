"""Which of a set of user IDs a JSON body holds as strings (object keys or values).

A user ID can reach a JSON body in many spellings: the minimal one (what
``msgspec.json.encode`` writes: raw UTF-8, ``\\"``, ``\\\\``, short escapes for control
characters), or with any character written as ``\\uXXXX`` (hex digits in any case,
characters outside the BMP as surrogate pairs), ``/`` as ``\\/``, and so on.

What the rewriters act on is a string that decodes to an ignored ID as a whole (a
``sender``, a ``state_key``, a receipt's key, a typing list's item), never an ID inside
a longer text. So this looks at whole strings only, and the cost of a search does not
depend on how many IDs are searched for: one byte scan finds every string that starts
with ``@`` and takes the bytes up to its first quote or backslash; a set lookup keeps
those that are one of the IDs' minimal spellings (with their closing quote). A string
with an escape in it, or that starts with ``\\u0040`` (the only other spelling of ``@``),
is decoded whole and its value looked up: that is exact, whatever the escapes spell.

Why every string that decodes to an ID is seen, in a body that is JSON: its first
character decodes to ``@`` (every ID here starts with it, ``ids.is_user_id``), so it
is spelled ``@`` or ``\\u0040`` right after the string's opening quote, and an opening
quote is never preceded by a backslash (a quote with one before it is inside a string
or, after ``\\\\``, a closing quote, which no ``@`` or ``\\`` may follow). Each such start
is found however the strings before it end: the scan reads from the ``@``, never from a
quote, and stops at the first quote or backslash after it.

A body that is not JSON holds no strings, and the answer for it is only as good as the
rule above (the rewriters refuse such a body when the search sends it to them). IDs not
starting with ``@`` (constants such as an account-data type, searched with the same
functions) are searched as bytes anywhere, with any escape that could spell one of their
characters counting as a mention, as conservative as that is.

A short list (``_SHORT_LIST`` IDs or fewer) is searched faster with one regex of their
minimal spellings as whole strings, where no escape in the body could spell one of
their characters (then every string that is one of them is spelled minimally); where
one could, the strings are looked up as for a long list.

The cost: two passes over the body's bytes, one set lookup per distinct string that
starts with ``@``, a decode of each string that starts so and has an escape (at most as
many bytes as the longest spelling of an ID: a longer string is none of them). What
grows with the number of IDs is only the set, built once per list (``mentions_for``),
and the parts of a body found to hold many of them are searched string by string too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from itertools import compress, count
from operator import methodcaller, not_
from typing import Final

import msgspec

__all__ = ["Found", "Mentions", "escapes_of", "found_in", "mentions_any", "mentions_for"]

_SHORT_ESCAPES = {
    '"': '"',
    "\\": "\\",
    "/": "/",
    "\b": "b",
    "\f": "f",
    "\n": "n",
    "\r": "r",
    "\t": "t",
}

_AT_STRING: Final = re.compile(rb'@(?<="@)(?<!\\"@)[^"\\]*+["\\]')
"""A string starting with ``@``, up to its first quote or backslash (included). It
starts the scan at the ``@`` (a literal, found fast) and then checks the quote before."""
_ESCAPED_STRING: Final = re.compile(rb'@(?<="@)(?<!\\"@)[^"\\]*+\\')
"""A string starting with ``@`` with an escape in it, up to its first backslash."""
_ENDS_IN_BACKSLASH: Final = methodcaller("endswith", b"\\")
_ESCAPED_AT: Final = re.compile(rb'\\u0040(?<="\\u0040)(?<!\\"\\u0040)')
"""A string starting with ``@`` spelled ``\\u0040`` (its digits have no case)."""
_STRING_REST: Final = re.compile(rb'(?:[^"\\]++|\\.)*+"', re.DOTALL)
"""The rest of a string up to its closing quote (match with an ``endpos`` as bound)."""
_stdlib = json.JSONDecoder()


def _either_case(digit: str) -> str:
    return f"[{digit}{digit.upper()}]" if digit.isalpha() else digit


def _hex_trie(suffixes: set[str]) -> str:
    """A regex for these equally long lowercase hex strings, in either case, sharing
    their common prefixes: Synapse writes every non-ASCII character as ``\\uXXXX``, and
    the search tries each alternative at each of them; shared digits are tried once."""
    if len(next(iter(suffixes))) == 1:
        if len(suffixes) == 1:
            return _either_case(next(iter(suffixes)))
        return "[" + "".join(d + d.upper() if d.isalpha() else d for d in sorted(suffixes)) + "]"
    heads: dict[str, set[str]] = {}
    for suffix in suffixes:
        heads.setdefault(suffix[0], set()).add(suffix[1:])
    parts = [_either_case(h) + _hex_trie(rest) for h, rest in sorted(heads.items())]
    return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"


def _escape_alternatives(chars: Iterable[str]) -> list[str]:
    codes: set[str] = set()
    for ch in chars:
        code = ord(ch)
        if code > 0xFFFF:
            code -= 0x10000
            codes.add(f"{0xD800 + (code >> 10):04x}")
            codes.add(f"{0xDC00 + (code & 0x3FF):04x}")
        else:
            codes.add(f"{code:04x}")
    out = [r"\\u" + _hex_trie(codes)] if codes else []
    shorts = sorted(re.escape(_SHORT_ESCAPES[ch]) for ch in set(chars) if ch in _SHORT_ESCAPES)
    if shorts:
        out.append(r"\\(?:" + "|".join(shorts) + ")")
    return out


@lru_cache(maxsize=256)
def escapes_of(chars: frozenset[str]) -> re.Pattern[bytes] | None:
    """A search for every escape sequence that may spell one of ``chars`` (None: no
    character has one). Backslash parity is ignored (``\\\\u0040`` is a backslash and
    the text ``u0040``), which can only find more."""
    alternatives = _escape_alternatives(chars)
    return re.compile("|".join(alternatives).encode("ascii")) if alternatives else None


def _minimal_spelling(user_id: str) -> bytes:
    """What msgspec writes between the quotes (the stdlib's ASCII spelling for a string
    msgspec cannot encode: one with a lone surrogate)."""
    try:
        return msgspec.json.encode(user_id)[1:-1]
    except (UnicodeEncodeError, msgspec.EncodeError):
        return json.dumps(user_id).encode("ascii")[1:-1]


def _scan_key(spelling: bytes) -> bytes:
    """What ``_AT_STRING`` yields for a string spelled so: up to its first backslash,
    else all of it and the closing quote."""
    cut = spelling.find(b"\\")
    return spelling + b'"' if cut < 0 else spelling[: cut + 1]


def _decode(spelling: bytes) -> str | None:
    """The value of a string's spelling; None if it is no JSON string."""
    try:
        value, _ = _stdlib.raw_decode('"' + spelling.decode("utf-8") + '"')
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, str) else None


class Found:
    """What a search found in one body: the IDs it holds, and a test for parts of it
    (or of a body made from its parts) that may hold one of them."""

    __slots__ = ("_escaped_at", "_keys", "_search", "always", "ids")

    def __init__(self, ids: frozenset[str], keys: frozenset[bytes], always: bool) -> None:
        self.ids = ids
        """The IDs held (all of them when ``always``)."""
        self.always = always
        """Every part may hold one: it could not be decided from the bytes."""
        self._keys = keys
        """What ``_AT_STRING`` yields for each spelling of them the body has, and for
        their minimal spellings (what a rewriter writes anew)."""
        self._escaped_at = any(key.startswith(b"\\") for key in keys)
        self._search = _bytes_search(keys) if len(keys) <= _FEW else None

    def relevant(self, part: bytes | memoryview | msgspec.Raw) -> bool:
        """False if ``part`` certainly holds none of the IDs as a string."""
        if self.always:
            return True
        if self._search is not None:
            return self._search(part) is not None
        return not self._keys.isdisjoint(_AT_STRING.findall(part)) or (
            self._escaped_at and _ESCAPED_AT.search(part) is not None
        )

    def relevant_indexes(self, parts: Sequence[bytes | msgspec.Raw]) -> list[int]:
        """Indexes of the ``parts`` that may hold one of the IDs (ascending); one search
        each, in C (unless a ``\\u0040`` spelling is to be heeded among many IDs)."""
        if self.always:
            return list(range(len(parts)))
        if self._search is not None:
            return list(compress(count(), map(self._search, parts)))
        if self._escaped_at:
            return [index for index, part in enumerate(parts) if self.relevant(part)]
        held = map(not_, map(self._keys.isdisjoint, map(_AT_STRING.findall, parts)))
        return list(compress(count(), held))


_FEW: Final = 16
"""Up to this many spellings, parts are searched for them as bytes (one regex, faster
than taking out every string: it stops at the first and makes nothing); beyond, each
alternative would cost a try at every ``@``, and the strings are taken out and looked up."""


@lru_cache(maxsize=256)
def _bytes_search(keys: frozenset[bytes]) -> Callable[..., re.Match[bytes] | None]:
    """A search for any of ``keys`` as bytes (a ``\\u0040`` spelling's key stands for
    every string starting so); never matches when there are none."""
    needles = sorted(b"\\u0040" if key == b"\\" else key for key in keys)
    if not needles:
        return re.compile(b"(?!)").search
    return re.compile(b"|".join(map(re.escape, needles))).search


_NOTHING: Final = Found(frozenset(), frozenset(), False)
_NEVER: Final = re.compile(b"(?!)")
_SHORT_LIST: Final = 32
"""Up to this many IDs, one regex with an alternative per ID finds their strings (what
each alternative costs at each ``@`` is less than taking out every string); beyond,
each string is taken out and looked up."""


class Mentions:
    """A search for a set of user IDs (cache one per ignore list: ``mentions_for``)."""

    __slots__ = (
        "_by_key",
        "_longest",
        "_others",
        "_others_escapes",
        "_others_only",
        "_short",
        "all_at",
        "chars",
        "ids",
        "is_key",
        "short",
        "short_escapes",
    )

    def __init__(self, user_ids: Iterable[str]) -> None:
        self.ids = frozenset(user_ids)
        by_key: dict[bytes, str] = {}
        others: list[str] = []
        for uid in self.ids:
            if not uid.startswith("@"):
                others.append(uid)
                continue
            spelling = _minimal_spelling(uid)
            if b"\\" not in spelling:
                by_key[spelling + b'"'] = uid
        self._by_key = by_key
        """IDs by what ``_AT_STRING`` yields for their minimal spelling (for those with no
        escape in it: the others are found by decoding)."""
        self.is_key = by_key.__contains__
        """Is this (an ``_AT_STRING`` match) the minimal spelling of one of the IDs?"""
        # each character as `\uXXXX`, or as two (a surrogate pair) outside the BMP
        self._longest = 12 * max(map(len, self.ids), default=0)
        """Bytes between the quotes of the longest spelling of an ID, or more."""
        self.all_at = not others
        """Every ID starts with ``@`` (as every user ID does)."""
        at_ids = [uid for uid in self.ids if uid.startswith("@")]
        self._others_only = not at_ids
        self.chars = frozenset("".join(at_ids))
        """The characters of the IDs that start with ``@``."""
        self.short: re.Pattern[bytes] | None = None
        """For a short list: a search for the IDs' minimal spellings as whole strings
        (as ``_AT_STRING`` finds them), valid where ``short_escapes`` finds nothing."""
        self.short_escapes = escapes_of(self.chars) or _NEVER
        """Escapes that could spell a character of an ID."""
        self._short: dict[bytes, str] = {}
        if 0 < len(at_ids) <= _SHORT_LIST:
            self._short = {_minimal_spelling(uid) + b'"': uid for uid in at_ids}
            rests = b"|".join(re.escape(key[1:]) for key in sorted(self._short))
            self.short = re.compile(rb'@(?<="@)(?<!\\"@)(?:' + rests + b")")
        self._others: re.Pattern[bytes] | None = None
        self._others_escapes: re.Pattern[bytes] | None = None
        if others:
            needles = sorted(re.escape(_minimal_spelling(uid)) for uid in others)
            self._others = re.compile(b"|".join(needles))
            self._others_escapes = escapes_of(frozenset("".join(others)))

    def found(self, data: bytes | memoryview | msgspec.Raw) -> Found:
        """Which of the IDs ``data`` holds as strings."""
        if self._others is not None:
            if self._others_found(data):
                return Found(self.ids, frozenset(), True)
            if self._others_only:
                return _NOTHING  # no ID starts with "@": nothing more to look for
        if self.short is not None and self.short_escapes.search(data) is None:
            # no escape could spell a character of an ID: each is spelled minimally
            short = set(self.short.findall(data))
            ids = set(map(self._short.__getitem__, short))
            keys = frozenset(map(_scan_key, (key[:-1] for key in short)))
            return Found(frozenset(ids), keys, False) if ids else _NOTHING
        return self.found_by_strings(data)

    def found_by_strings(self, data: bytes | memoryview | msgspec.Raw) -> Found:
        """``found`` for a list of any length (each string starting with ``@`` looked up)."""
        strings = set(_AT_STRING.findall(data))
        keys = self._by_key.keys() & strings  # iterates the smaller
        ids = set(map(self._by_key.__getitem__, keys))
        if any(map(_ENDS_IN_BACKSLASH, strings)) or _ESCAPED_AT.search(data) is not None:
            try:
                self._decode_escaped(bytes(memoryview(data)), ids, keys)
            except ValueError:
                return Found(self.ids, frozenset(), True)
        return Found(frozenset(ids), frozenset(keys), False) if ids else _NOTHING

    def _others_found(self, data: bytes | memoryview | msgspec.Raw) -> bool:
        assert self._others is not None
        if self._others.search(data) is not None:
            return True
        escapes = self._others_escapes
        return escapes is not None and escapes.search(data) is not None

    def _decode_escaped(self, data: bytes, ids: set[str], keys: set[bytes]) -> None:
        """Add the IDs that strings with an escape in them decode to, and the keys of
        their spellings (and of their minimal ones). ValueError if one such string does
        not end or decode as JSON."""
        starts = [m.start() for m in _ESCAPED_STRING.finditer(data)]
        starts += [m.start() for m in _ESCAPED_AT.finditer(data)]
        for start in starts:
            decoded = self.decode_at(data, start)
            if decoded is not None and decoded[0] in self.ids:
                ids.add(decoded[0])
                keys.add(_scan_key(data[start : decoded[1]]))
                keys.add(_scan_key(_minimal_spelling(decoded[0])))

    def decode_at(self, data: bytes, start: int) -> tuple[str, int] | None:
        """The value of the string whose spelling starts at ``start`` and where its
        closing quote is; None if it is longer than any spelling of an ID. ValueError
        if it does not end or decode as JSON."""
        bound = start + self._longest + 1
        rest = _STRING_REST.match(data, start, bound)
        if rest is None:
            if bound < len(data):
                return None
            raise ValueError("a string that does not end")
        value = _decode(data[start : rest.end() - 1])
        if value is None:
            raise ValueError("a string that does not decode")
        return value, rest.end() - 1


@lru_cache(maxsize=64)
def mentions_for(user_ids: frozenset[str]) -> Mentions:
    return Mentions(user_ids)


_recent: tuple[bytes, Mentions, Found] | None = None
"""The last search of a body: the proxy searches an answer to learn whether to rewrite
it, and the rewriter searches the same bytes again. One body at most is kept."""


def found_in(body: bytes, user_ids: frozenset[str]) -> Found:
    """``mentions_for(user_ids).found(body)``, once for the same bytes object in a row."""
    global _recent
    mentions = mentions_for(user_ids)
    recent = _recent
    if recent is not None and recent[0] is body and recent[1] is mentions:
        return recent[2]
    found = mentions.found(body)
    if type(body) is bytes:  # immutable: the same object holds the same bytes
        _recent = (body, mentions, found)
    return found


def mentions_any(body: bytes, user_ids: Iterable[str]) -> bool:
    """False only if ``body`` certainly holds none of ``user_ids`` (in any JSON spelling)."""
    ids = user_ids if isinstance(user_ids, frozenset) else frozenset(user_ids)
    if not ids:
        return False
    found = found_in(body, ids)
    return found.always or bool(found.ids)
