"""Splitting JSON into one level of untouched ``msgspec.Raw`` values, and joining it back.

msgspec decodes only the level asked for and hands out the bytes of everything below it
as ``msgspec.Raw`` (slices of the input, no copies, no object graph for the collector).
Encoding a ``dict[str, Raw]`` / ``list[Raw]`` splices those bytes back verbatim.

msgspec rejects lone surrogate escapes (``"\\ud800"``) anywhere in a document, even inside
a value it would only skip. Such documents are valid JSON for stdlib ``json`` (and for
homeservers written in Python), so each level falls back to a slower splitter built on
the stdlib scanner, which also yields exact byte slices of its input.
"""

from __future__ import annotations

import json
from typing import Any, cast

import msgspec

__all__ = [
    "EMPTY",
    "RoomsTree",
    "SplitValue",
    "as_bytes",
    "decode_value",
    "encode_array",
    "encode_object",
    "key_len",
    "render",
    "render_edited",
    "split_array",
    "split_members",
    "split_object",
    "top_object",
]

Raw = msgspec.Raw
EMPTY = Raw()

_obj_decoder = msgspec.json.Decoder(dict[str, Raw])
_arr_decoder = msgspec.json.Decoder(list[Raw])
_any_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
_stdlib = json.JSONDecoder()
_WS = " \t\n\r"


def as_bytes(raw: Raw | bytes) -> bytes:
    return raw if isinstance(raw, bytes) else bytes(memoryview(raw))


def _first_byte(data: Raw | bytes) -> int:
    """The first non-whitespace byte of a JSON value, or -1."""
    view = memoryview(data)
    for b in view:
        if b not in b" \t\n\r":
            return b
    return -1


def _stdlib_valid(data: Raw | bytes) -> str | None:
    """The document as text if stdlib json accepts it, else None."""
    try:
        text = as_bytes(data).decode("utf-8", "surrogateescape")
        json.loads(text)
    except (ValueError, RecursionError):
        return None
    return text


def _skip_ws(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in _WS:
        i += 1
    return i


def _slow_split_object(text: str) -> dict[str, Raw]:
    """Split a stdlib-valid JSON object text into its members (last duplicate wins)."""
    out: dict[str, Raw] = {}
    i = _skip_ws(text, 0) + 1  # past "{"
    i = _skip_ws(text, i)
    if text[i] == "}":
        return out
    while True:
        key, i = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
        i = _skip_ws(text, i) + 1  # past ":"
        i = _skip_ws(text, i)
        _, end = _stdlib.raw_decode(text, i)
        out[key] = Raw(text[i:end].encode("utf-8", "surrogateescape"))
        i = _skip_ws(text, end)
        if text[i] == "}":
            return out
        i = _skip_ws(text, i + 1)  # past ","


def _slow_split_array(text: str) -> list[Raw]:
    out: list[Raw] = []
    i = _skip_ws(text, 0) + 1  # past "["
    i = _skip_ws(text, i)
    if text[i] == "]":
        return out
    while True:
        _, end = _stdlib.raw_decode(text, i)
        out.append(Raw(text[i:end].encode("utf-8", "surrogateescape")))
        i = _skip_ws(text, end)
        if text[i] == "]":
            return out
        i = _skip_ws(text, i + 1)


def split_object(data: Raw | bytes) -> dict[str, Raw] | None:
    """The members of a JSON object as raw values; None if ``data`` is not an object."""
    try:
        return _obj_decoder.decode(data)
    except msgspec.ValidationError:
        return None
    except (msgspec.DecodeError, RecursionError):
        if _first_byte(data) != ord("{"):
            return None
        text = _stdlib_valid(data)
        return None if text is None else _slow_split_object(text)


def split_array(data: Raw | bytes) -> list[Raw] | None:
    """The items of a JSON array as raw values; None if ``data`` is not an array."""
    try:
        return _arr_decoder.decode(data)
    except msgspec.ValidationError:
        return None
    except (msgspec.DecodeError, RecursionError):
        if _first_byte(data) != ord("["):
            return None
        text = _stdlib_valid(data)
        return None if text is None else _slow_split_array(text)


SplitValue = list[Raw] | dict[str, Raw] | str | int | bool | None
"""A value split one level: an array into raw items, an object into raw members, a
scalar decoded.

No floats: for everything else here msgspec writes the shortest text any JSON spelling
of the value can have (no whitespace, no escape it can do without), so a decoded tree
renders back to its input when the two have the same length (up to the case of hex
digits in ``\\u`` escapes of control characters): the check of ``render_edited``.
A float's text can be shorter than what msgspec writes for it (``1e2``, ``100.0``); a
body with one at these levels takes the generic path."""
RoomsTree = dict[str, dict[str, dict[str, dict[str, SplitValue]]]]
"""The ``rooms`` of a ``/sync`` answer split in one decode down to its sections' members
(``join`` -> room ID -> ``timeline`` -> ``events`` as a list of raw events)."""
_members_decoder = msgspec.json.Decoder(dict[str, SplitValue])


def split_members(data: Raw | bytes) -> dict[str, SplitValue] | None:
    """An object split into ``SplitValue``s (its arrays into raw items) in one pass; None if
    ``data`` is not such an object. Whether rendering them gives ``data`` back byte for
    byte is the caller's to check, by length once it has edited them (see ``SplitValue``)."""
    try:
        return _members_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None


def render_edited(tree: dict[str, Any], body: bytes, shrunk: int) -> bytes | None:
    """``tree``, a body split in one decode and then edited, rendered; or None when the
    rendering could differ from ``body`` anywhere the edits did not touch.

    The argument, the one place it is made: msgspec writes the shortest text any JSON
    spelling of a value can have (see ``SplitValue``), so the unedited tree renders at
    most as long as ``body``, and exactly as long only when it renders ``body`` itself.
    ``shrunk`` is what the edits took out of that compact text (each edit counts it as
    it is made); so when the edited rendering plus ``shrunk`` is as long as ``body``,
    the unedited tree rendered ``body`` byte for byte, and everything the edits left
    alone comes out as it came in. Otherwise the caller takes its generic path."""
    rendered = render(tree)
    return rendered if len(rendered) + shrunk == len(body) else None


def key_len(key: str) -> int:
    """The length of a key's minimal JSON spelling."""
    return len(_encoder.encode(key))


def top_object(body: bytes) -> dict[str, Raw]:
    """Split a response body that must be a JSON object; raise InvalidBody otherwise."""
    from .types import InvalidBody

    try:
        return _obj_decoder.decode(body)
    except msgspec.ValidationError:
        raise InvalidBody("the top level of the body is not a JSON object") from None
    except (msgspec.DecodeError, RecursionError):
        text = _stdlib_valid(body)
        if text is None:
            raise InvalidBody("the body is not valid JSON") from None
        if _first_byte(body) != ord("{"):
            raise InvalidBody("the top level of the body is not a JSON object") from None
        return _slow_split_object(text)


def decode_value(data: Raw | bytes) -> Any:
    """Fully decode one (small) raw value; stdlib fallback for what msgspec rejects."""
    try:
        return _any_decoder.decode(data)
    except (msgspec.DecodeError, RecursionError):
        text = _stdlib_valid(data)
        if text is None:
            return None
        return json.loads(text)


def encode_object(members: dict[str, Raw] | dict[str, dict[str, Raw]]) -> Raw:
    """A changed object, to take the place of its raw original.

    It is not serialised here: it stays the Python dict of (mostly raw) members, typed
    as Raw for its parent, until ``render`` serialises the whole tree in one pass. Each
    level re-encoding its children would copy the body once per level. A changed
    container is never split again (each member is edited at most once).
    """
    return cast(Raw, members)


def encode_array(items: list[Raw]) -> Raw:
    """A changed array, see ``encode_object``."""
    return cast(Raw, items)


def render(node: Raw | dict[str, Any] | list[Any]) -> bytes:
    """Serialise a (possibly changed) tree of raw values (and ``SplitValue``s) in one pass."""
    try:
        return _encoder.encode(node)
    except (UnicodeEncodeError, msgspec.EncodeError):
        # a key with a lone surrogate (only the stdlib fallback can produce one)
        return _slow_render(node)


def _slow_render(node: object) -> bytes:
    if isinstance(node, dict):
        members = (json.dumps(k).encode() + b":" + _slow_render(v) for k, v in node.items())
        return b"{" + b",".join(members) + b"}"
    if isinstance(node, list):
        return b"[" + b",".join(_slow_render(v) for v in node) + b"]"
    if isinstance(node, Raw):
        return bytes(memoryview(node))
    return _encoder.encode(node)  # a scalar msgspec decoded: it has no lone surrogate
