"""The byte search the rewriters used before ``ignore_proxy.rewrite.scan``, kept as a test
oracle: it finds an ID anywhere in the bytes (inside longer strings too), and counts any
escape that could spell one of the IDs' characters as a mention of all of them. One
regular expression with an alternative per ID: its cost grows with the list's length
times the body's size, which is why it was replaced.

A user ID can reach a JSON body in many spellings: the minimal one (what
``msgspec.json.encode`` writes: raw UTF-8, ``\\"``, ``\\\\``, short escapes for control
characters), or with any character written as ``\\uXXXX`` (hex digits in any case,
characters outside the BMP as surrogate pairs), ``/`` as ``\\/``, and so on.

Every spelling other than the minimal one contains at least one escape sequence that
decodes to a character of the ID. So: the body cannot contain the ID if it contains
neither the minimal spelling nor any escape sequence decoding to one of the ID's
characters. That is a little sharper than "any ``\\u`` at all means maybe", which
matters because Synapse writes every non-ASCII character as ``\\uXXXX``: with that
rule no real body would ever skip the parse. The escape search ignores backslash
parity (``\\\\u0040`` is a backslash and the text ``u0040``), which can only make
the answer a conservative True.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

import msgspec

__all__ = ["Mentions", "escapes_of", "mentions_any"]

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


class Mentions:
    """A compiled search for a set of user IDs (cache one per ignore list)."""

    __slots__ = ("_alternatives", "_escapes", "_needle_set", "_needles", "_patterns", "always")

    def __init__(self, user_ids: Iterable[str]) -> None:
        ids = sorted(set(user_ids))
        needles: list[bytes] = []
        self.always = False
        for uid in ids:
            try:
                needles.append(msgspec.json.encode(uid)[1:-1])
            except (UnicodeEncodeError, msgspec.EncodeError):
                # A lone surrogate in a Python string cannot be searched for as bytes.
                self.always = True
        self._needles = tuple(needles)
        self._needle_set = frozenset(needles)
        chars = {ch for uid in ids for ch in uid}
        alternatives = _escape_alternatives(chars)
        self._alternatives = alternatives
        self._escapes = re.compile("|".join(alternatives).encode("ascii")) if alternatives else None
        self._patterns: dict[bool, re.Pattern[bytes]] = {}

    def pattern(self, escapes: bool) -> re.Pattern[bytes]:
        """One regex for the IDs' minimal spellings (and, if ``escapes``, for every escape
        sequence that may spell one of their characters). It searches any buffer
        (``msgspec.Raw`` included) without copying it."""
        if escapes in self._patterns:
            return self._patterns[escapes]
        if self.always:
            compiled = re.compile(b"")
        else:
            parts = [re.escape(n) for n in self._needles]
            if escapes:
                parts += [a.encode("ascii") for a in self._alternatives]
            compiled = re.compile(b"|".join(parts)) if parts else re.compile(b"(?!)")
        self._patterns[escapes] = compiled
        return compiled

    def in_bytes(self, data: bytes) -> bool:
        """True unless ``data`` certainly contains none of the IDs."""
        return self.pattern(False).search(data) is not None or self.escapes_in(data)

    def escapes_in(self, data: bytes) -> bool:
        """True if ``data`` has an escape sequence that could spell part of an ID."""
        return self.always or (
            self._escapes is not None and b"\\" in data and self._escapes.search(data) is not None
        )

    def present(self, data: bytes, user_ids: frozenset[str]) -> tuple[frozenset[str], bool]:
        """Those of ``user_ids`` (the IDs this was built for) that may occur in ``data``,
        and whether ``data`` has escapes that could spell one (then: all of them).
        Two regex scans (minimal spellings, escapes), however many IDs."""
        if self.escapes_in(data):
            return user_ids, True
        found: set[bytes] = set()
        wanted = len(self._needle_set)
        for match in self.pattern(False).finditer(data):
            found.add(match.group())
            if len(found) == wanted:  # all found: the rest of the scan cannot add any
                break
        pairs = zip(sorted(user_ids), self._needles, strict=True)
        return frozenset(uid for uid, needle in pairs if needle in found), False


@lru_cache(maxsize=256)
def escapes_of(chars: frozenset[str]) -> re.Pattern[bytes] | None:
    """A search for every escape sequence that may spell one of ``chars`` (None: no
    character has one); as ``Mentions.escapes_in``, backslash parity is ignored."""
    alternatives = _escape_alternatives(chars)
    return re.compile("|".join(alternatives).encode("ascii")) if alternatives else None


@lru_cache(maxsize=256)
def mentions_for(user_ids: frozenset[str]) -> Mentions:
    return Mentions(user_ids)


def mentions_any(body: bytes, user_ids: Iterable[str]) -> bool:
    """False only if ``body`` certainly contains none of ``user_ids`` (in any JSON spelling)."""
    ids = user_ids if isinstance(user_ids, frozenset) else frozenset(user_ids)
    if not ids:
        return False
    return mentions_for(ids).in_bytes(body)
