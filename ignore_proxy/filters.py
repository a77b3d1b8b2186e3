"""A client's ``event_fields``, kept from the homeserver and applied by the proxy.

``event_fields`` in a filter makes the homeserver leave out of every event all the fields
it does not name, ``sender`` among them, and without a sender the proxy cannot tell whose
an event is. So on the routes it filters the proxy removes ``event_fields`` from every
filter it forwards (``split_event_fields``, ``strip_event_fields_from_search``) and
applies them itself to the answer once the ignored users' events are out of it
(``project_sync_body``).

Pure: no I/O. Answers are bounded by the caller.

What Synapse answers for a filter it cannot read (``FilterRefused``):

- inline ``/sync?filter={...}`` that is not JSON: 400 ``M_NOT_JSON`` "Invalid filter
  JSON" (``synapse/rest/client/sync.py``);
- ``POST /user/{userId}/filter`` or ``POST /search`` body that is not JSON: 400
  ``M_NOT_JSON`` "Content not JSON."; JSON but not an object: 400 ``M_BAD_JSON``
  "Content must be a JSON object." (``parse_json_object_from_request``);
- a filter breaking ``USER_FILTER_SCHEMA`` (``event_fields`` not an array of strings,
  among others): 400 ``M_UNKNOWN`` with the jsonschema message
  (``Filtering.check_valid_filter`` raises ``SynapseError(400, str(e))``, whose default
  errcode is ``M_UNKNOWN``).

"Not JSON" is what Python's ``json`` with Synapse's decoder refuses: invalid UTF-8,
trailing data, ``NaN``/``Infinity``, nesting deeper than the interpreter's recursion
limit. Lone surrogate escapes (``"\\ud800"``) are JSON to it and so here. Duplicate keys
are accepted and the last one wins, as for Synapse, on the levels read here too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote_from_bytes, unquote_to_bytes

from .rewrite.raw import Raw, encode_array, encode_object, render, split_array, split_object

__all__ = [
    "FilterRefused",
    "FilterSource",
    "QueryFilter",
    "filter_in_query",
    "is_inline_filter",
    "project_sync_body",
    "split_event_fields",
    "split_field",
    "strip_event_fields_from_search",
    "with_stored_filter",
]

EVENT_FIELDS = "event_fields"

FilterSource = Literal["query", "body"]
"""Where a filter came from: a ``filter`` query value or a request body (the refusals'
texts differ, as Synapse's do)."""

_Where = dict[str, "_Where"]
# The filters inside a Filter event_fields is stripped from, as a tree of keys. Only the
# top level's is read by the spec and Synapse; the others are stripped defensively.
_STRIPPED: _Where = {
    "room": {key: {} for key in ("timeline", "state", "ephemeral", "account_data")},
    "presence": {},
    "account_data": {},
}

# The event lists of a joined or left room that Synapse serialises with the filter's
# event_fields (SyncRestServlet.encode_room). "state_after" is the stable name of
# MSC4222's list, which Synapse only sends as "org.matrix.msc4222.state_after".
_PROJECTED_LISTS = (
    "timeline",
    "state",
    "org.matrix.msc4222.state_after",
    "state_after",
    "msc4354_sticky",
)
_PROJECTED_SECTIONS = ("join", "leave")


class FilterRefused(Exception):
    """A client's filter the proxy cannot read; answer ``status`` with
    ``{"errcode": errcode, "error": error}`` instead of forwarding the request."""

    def __init__(self, status: int, errcode: str, error: str) -> None:
        super().__init__(status, errcode, error)
        self.status = status
        self.errcode = errcode
        self.error = error


def is_inline_filter(value: str) -> bool:
    """Is a ``filter`` query value a filter definition (else a filter ID)?

    Synapse's rule (``SyncRestServlet.on_GET``): the value starts with ``{``, no
    whitespace allowed before it. Dendrite's is the same; ruma-based servers (Conduit,
    continuwuity) try JSON first and take the value as an ID if that fails.
    """
    return value.startswith("{")


def _reject_constant(value: str) -> None:
    raise ValueError(f"Invalid JSON value: {value!r}")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)


def _not_json(source: FilterSource) -> FilterRefused:
    if source == "query":
        return FilterRefused(400, "M_NOT_JSON", "Invalid filter JSON")
    return FilterRefused(400, "M_NOT_JSON", "Content not JSON.")


def _parse_object(data: bytes | str, source: FilterSource) -> tuple[bytes, dict[str, Any]]:
    """The document as UTF-8 bytes and decoded, if Synapse would take it as a JSON
    object; FilterRefused as Synapse answers otherwise."""
    try:
        if isinstance(data, str):
            text, raw = data, data.encode("utf-8")
        else:
            text, raw = data.decode("utf-8"), data
        value = _decoder.decode(text)
    except (ValueError, RecursionError):  # UnicodeError and JSONDecodeError among them
        raise _not_json(source) from None
    if not isinstance(value, dict):
        if source == "query":
            raise _not_json(source)
        raise FilterRefused(400, "M_BAD_JSON", "Content must be a JSON object.")
    return raw, value


def _schema_error(message: str) -> FilterRefused:
    return FilterRefused(400, "M_UNKNOWN", message)


def _event_fields(filter_: dict[str, Any]) -> tuple[str, ...] | None:
    """The top-level ``event_fields``, checked as ``USER_FILTER_SCHEMA`` does."""
    if EVENT_FIELDS not in filter_:
        return None
    fields = filter_[EVENT_FIELDS]
    if not isinstance(fields, list):
        raise _schema_error(f"{fields!r} is not of type 'array'")
    for field in fields:
        if not isinstance(field, str):
            raise _schema_error(f"{field!r} is not of type 'string'")
    return tuple(fields)


def _has_event_fields(filter_: dict[str, Any], where: _Where) -> bool:
    return EVENT_FIELDS in filter_ or any(
        isinstance(inner := filter_.get(key), dict) and _has_event_fields(inner, below)
        for key, below in where.items()
    )


def _strip(raw: Raw | bytes, decoded: dict[str, Any], where: _Where) -> Raw:
    """A filter object (which has ``event_fields`` here or below) without them, here
    and in the filters ``where`` names; members with none are kept as they were."""
    members = split_object(raw)
    if members is None:  # pragma: no cover - decoded as an object
        raise ValueError("not an object")
    members.pop(EVENT_FIELDS, None)
    for key, below in where.items():
        inner = decoded.get(key)
        if isinstance(inner, dict) and _has_event_fields(inner, below):
            members[key] = _strip(members[key], inner, below)
    return encode_object(members)


def split_event_fields(
    filter_json: bytes | str, *, source: FilterSource = "query"
) -> tuple[bytes, tuple[str, ...] | None]:
    """A Filter without ``event_fields``, and the client's ``event_fields``.

    ``filter_json`` is a Filter object: an inline ``filter`` query value (one
    ``is_inline_filter`` accepts) or a ``POST /user/{userId}/filter`` body
    (``source="body"``). FilterRefused, with Synapse's answer, if it is not a JSON
    object or its ``event_fields`` is not an array of strings.

    ``event_fields`` is removed from the top level (the only place the spec and Synapse
    read it) and, defensively, from ``room``, ``room.timeline``, ``room.state``,
    ``room.ephemeral``, ``room.account_data``, ``presence`` and ``account_data``. All
    else is kept: values byte for byte and keys in their order (on the levels edited,
    whitespace between members goes and of duplicate keys only the last stays, the one
    the homeserver reads). If there was no ``event_fields`` in any of those places, the
    input comes back as it was (bytes: the same object; str: its UTF-8 encoding).

    The fields are None when the top level had no ``event_fields`` and ``()`` when it
    was empty, which Synapse takes as "all fields" (see ``project_sync_body``).
    """
    raw, decoded = _parse_object(filter_json, source)
    fields = _event_fields(decoded)
    if not _has_event_fields(decoded, _STRIPPED):
        return raw, fields
    return render(_strip(raw, decoded, _STRIPPED)), fields


def strip_event_fields_from_search(body: bytes) -> bytes:
    """A ``POST /search`` body without ``search_categories.room_events.filter.event_fields``;
    the same bytes if there is none there.

    Synapse reads no ``event_fields`` there (its search filter is a plain ``Filter``),
    so nothing is validated: any value is removed. FilterRefused as Synapse answers if
    the body is not a JSON object. Other shapes (no ``search_categories``, a ``filter``
    that is not an object) are left for the homeserver to judge.
    """
    _, decoded = _parse_object(body, "body")
    categories = decoded.get("search_categories")
    room_events = categories.get("room_events") if isinstance(categories, dict) else None
    filter_ = room_events.get("filter") if isinstance(room_events, dict) else None
    if not isinstance(filter_, dict) or EVENT_FIELDS not in filter_:
        return body
    top = split_object(body)
    if top is None:  # pragma: no cover - decoded as an object above
        return body
    cats = split_object(top["search_categories"])
    room = split_object(cats["room_events"]) if cats is not None else None
    filt = split_object(room["filter"]) if room is not None else None
    if cats is None or room is None or filt is None:  # pragma: no cover - as decoded
        return body
    del filt[EVENT_FIELDS]
    room["filter"] = encode_object(filt)
    cats["room_events"] = encode_object(room)
    top["search_categories"] = encode_object(cats)
    return render(top)


def split_field(field: str) -> tuple[str, ...]:
    """The keys of a dotted ``event_fields`` entry, as Synapse reads it.

    A dot preceded by an odd number of backslashes is part of the key; then, in each
    key, ``\\\\`` and ``\\.`` stand for the second character and any other backslash
    stays as it is. So ``content.body`` is ``("content", "body")``, ``m\\.foo`` is
    ``("m.foo",)``, ``m\\\\.foo`` is ``("m\\\\", "foo")`` and ``.m`` is ``("", "m")``.
    """
    keys: list[str] = []
    start = 0
    backslashes = 0
    for i, char in enumerate(field):
        if char == "\\":
            backslashes += 1
            continue
        if char == "." and backslashes % 2 == 0:
            keys.append(_unescape(field[start:i]))
            start = i + 1
        backslashes = 0
    keys.append(_unescape(field[start:]))
    return tuple(keys)


def _unescape(part: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(part):
        char = part[i]
        if char == "\\" and i + 1 < len(part) and part[i + 1] in "\\.":
            out.append(part[i + 1])
            i += 2
            continue
        out.append(char)
        i += 1
    return "".join(out)


# A projected event: a tree of dicts whose leaves are raw values of the original.
_Tree = dict[str, Any]


def _copy_path(src: dict[str, Raw], dst: _Tree, path: tuple[str, ...]) -> None:
    """Copy the value at ``path`` in ``src`` to the same path in ``dst``, making the
    objects on the way; nothing if ``src`` has no value there or a value on the way
    is not an object."""
    *parents, last = path
    node = src
    for key in parents:
        value = node.get(key)
        inner = None if value is None else split_object(value)
        if inner is None:
            return
        node = inner
    if last not in node:
        return
    out = dst
    for key in parents:
        child = out.get(key)
        if child is None:
            child = out[key] = {}
        elif not isinstance(child, dict):
            # a raw copy of this whole object from src: it holds the value already
            return
        out = child
    out[last] = node[last]


def _members_tree(value: Any) -> _Tree | None:
    """A projected value as an editable object: a built dict as it is, a raw copy split."""
    if isinstance(value, dict):
        return value
    return split_object(value)


def _project_event(event: Raw, paths: tuple[tuple[str, ...], ...]) -> Raw:
    """One event with only the fields at ``paths`` (from ``split_field``), as Synapse's
    ``only_fields``; a value that is not an object comes back as it was.

    Then, as Synapse does after filtering, the bundled aggregations the event had
    (``unsigned["m.relations"]``) are put back: the edit (``m.replace``) and the
    thread's ``latest_event`` projected the same way, everything else as it was.
    """
    members = split_object(event)
    if members is None:
        return event
    out: _Tree = {}
    for path in paths:
        _copy_path(members, out, path)
    relations = _relations(members)
    if relations:
        # whatever of m.relations the paths copied is replaced, key by key, below
        unsigned = _members_tree(out["unsigned"]) if "unsigned" in out else {}
        if unsigned is None:  # pragma: no cover - a copy of the object relations came from
            unsigned = {}
        unsigned["m.relations"] = _project_relations(relations, paths)
        out["unsigned"] = unsigned
    return encode_object(out)


def _relations(members: dict[str, Raw]) -> dict[str, Raw] | None:
    unsigned = members.get("unsigned")
    unsigned_members = None if unsigned is None else split_object(unsigned)
    relations = None if unsigned_members is None else unsigned_members.get("m.relations")
    return None if relations is None else split_object(relations)


def _project_relations(
    relations: dict[str, Raw], paths: tuple[tuple[str, ...], ...]
) -> dict[str, Any]:
    out: dict[str, Any] = dict(relations)
    edit = relations.get("m.replace")
    if edit is not None:
        out["m.replace"] = _project_event(edit, paths)
    thread = relations.get("m.thread")
    summary = None if thread is None else split_object(thread)
    if summary is not None and "latest_event" in summary:
        projected: dict[str, Any] = dict(summary)
        projected["latest_event"] = _project_event(summary["latest_event"], paths)
        out["m.thread"] = projected
    return out


def _project_list(raw: Raw, paths: tuple[tuple[str, ...], ...]) -> Raw | None:
    """``{"events": [...], ...}`` with its events projected; None if not that shape."""
    container = split_object(raw)
    if container is None or "events" not in container:
        return None
    events = split_array(container["events"])
    if events is None:
        return None
    container["events"] = encode_array([_project_event(event, paths) for event in events])
    return encode_object(container)


def project_sync_body(body: bytes, fields: tuple[str, ...]) -> bytes:
    """A ``GET /sync`` answer with the client's ``event_fields`` applied, as Synapse
    applies them (``SyncRestServlet.encode_response``/``encode_room``).

    Projected, for every room in ``rooms.join`` and ``rooms.leave``: ``timeline.events``,
    ``state.events``, ``org.matrix.msc4222.state_after.events`` (and its stable name
    ``state_after``) and ``msc4354_sticky.events``. Left whole, as Synapse leaves them:
    ``ephemeral``, room and global ``account_data``, ``presence``, ``to_device``,
    ``rooms.invite.*.invite_state`` and ``rooms.knock.*.knock_state`` (serialised
    without the filter's fields), and everything that is not an event list.

    Each event as ``_project_event``. An empty ``fields`` means all fields (Synapse), so
    the body comes back as it was; so does a body with nothing to project. Anything of
    another shape than expected (not an object, not a list, an event that is not an
    object) is left as it is: the ignore rewriter has judged the body already.
    """
    if not fields:
        return body
    paths = tuple(split_field(field) for field in fields)
    top = split_object(body)
    rooms = None if top is None else top.get("rooms")
    sections = None if rooms is None else split_object(rooms)
    if top is None or sections is None:
        return body
    changed = False
    for section in _PROJECTED_SECTIONS:
        raw_rooms = sections.get(section)
        by_id = None if raw_rooms is None else split_object(raw_rooms)
        if by_id is None:
            continue
        section_changed = False
        for room_id, raw_room in by_id.items():
            room = split_object(raw_room)
            if room is None:
                continue
            room_changed = False
            for key in _PROJECTED_LISTS:
                value = room.get(key)
                projected = None if value is None else _project_list(value, paths)
                if projected is not None:
                    room[key] = projected
                    room_changed = True
            if room_changed:
                by_id[room_id] = encode_object(room)
                section_changed = True
        if section_changed:
            sections[section] = encode_object(by_id)
            changed = True
    if not changed:
        return body
    top["rooms"] = encode_object(sections)
    return render(top)


# --- the `filter` query parameter ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueryFilter:
    """What becomes of a request's `filter` query parameter."""

    query: bytes  # the query string to forward
    fields: tuple[str, ...] | None = None  # the client's event_fields, applied afterwards
    stored_id: str | None = None  # a stored filter the proxy must read before forwarding


_FILTER_PARAM = b"filter"


def filter_in_query(query: bytes, *, stored_allowed: bool) -> QueryFilter:
    """The query to forward with `event_fields` taken out of an inline `filter`.

    `stored_allowed` (`/sync`): a value that is not inline JSON is a stored filter's ID,
    returned in `stored_id` for the caller to read (`with_stored_filter`); elsewhere it
    is refused as Synapse refuses it. FilterRefused also when the homeservers could read
    different `filter` values out of the query (given twice, or read differently when
    `;` separates parameters as in Twisted) or when the filter is not JSON.
    """
    if b"filter" not in query and b"%" not in query:  # `%66ilter` is `filter` too
        return QueryFilter(query)
    items = query.split(b"&")
    found = [n for n, item in enumerate(items) if _param_name(item) == _FILTER_PARAM]
    if b";" in query:
        by_semicolon = [
            item for item in query.replace(b";", b"&").split(b"&")
            if _param_name(item) == _FILTER_PARAM
        ]  # fmt: skip
        if by_semicolon != [items[n] for n in found]:
            raise FilterRefused(400, "M_INVALID_PARAM", "The filter parameter is ambiguous")
    if not found:
        return QueryFilter(query)
    if len(found) > 1:
        raise FilterRefused(400, "M_INVALID_PARAM", "The filter parameter is given twice")
    _, _, raw_value = items[found[0]].partition(b"=")
    try:
        value = unquote_to_bytes(raw_value.replace(b"+", b" ")).decode("utf-8")
    except UnicodeDecodeError:
        raise _not_json("query") from None
    if not is_inline_filter(value):
        if stored_allowed:
            return QueryFilter(query, stored_id=value)
        raise _not_json("query")
    forwarded, fields = split_event_fields(value, source="query")
    if forwarded == value.encode("utf-8"):
        return QueryFilter(query, fields)
    return QueryFilter(_with_filter(items, found[0], forwarded), fields)


def with_stored_filter(query: bytes, stored: bytes) -> QueryFilter:
    """The query to forward for a stored filter (the body of `GET
    /user/{userId}/filter/{filterId}`): the ID as it was when the filter has no
    `event_fields`, else the filter inline without them. Filters never change once
    stored, so the homeserver reads what the proxy read."""
    forwarded, fields = split_event_fields(stored, source="body")
    if fields is None and forwarded is stored:
        return QueryFilter(query)
    items = query.split(b"&")
    found = next(n for n, item in enumerate(items) if _param_name(item) == _FILTER_PARAM)
    return QueryFilter(_with_filter(items, found, forwarded), fields)


def _param_name(item: bytes) -> bytes:
    return unquote_to_bytes(item.partition(b"=")[0].replace(b"+", b" "))


def _with_filter(items: list[bytes], index: int, filter_json: bytes) -> bytes:
    replaced = list(items)
    replaced[index] = _FILTER_PARAM + b"=" + quote_from_bytes(filter_json, safe="").encode()
    return b"&".join(replaced)
