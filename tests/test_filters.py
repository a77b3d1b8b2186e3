"""filters.py: event_fields kept from the homeserver and applied by the proxy.

Expectations marked "Synapse" are ported from element-hq/synapse: tests/events/test_utils.py
(SerializeEventTestCase, SplitFieldTestCase, the latter now in rust/src/events/serialize.rs),
synapse/rest/client/sync.py (which lists are serialised with the filter's event_fields,
what an unreadable inline filter gets) and synapse/http/servlet.py,
synapse/api/filtering.py (what an unreadable filter body gets).
"""

from __future__ import annotations

import copy
import json
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ignore_proxy.filters import (
    FilterRefused,
    QueryFilter,
    filter_in_query,
    is_inline_filter,
    project_sync_body,
    split_event_fields,
    split_field,
    strip_event_fields_from_search,
    with_stored_filter,
)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ROOM = "!room:hs.test"


def enc(value: Any) -> bytes:
    return json.dumps(value).encode()


def sync_body(event: Any, *, section: str = "join", key: str = "timeline") -> bytes:
    return enc({"next_batch": "s1", "rooms": {section: {ROOM: {key: {"events": [event]}}}}})


def projected(event: Any, fields: tuple[str, ...], **where: str) -> Any:
    """The one event of a /sync body after projection."""
    section = where.get("section", "join")
    key = where.get("key", "timeline")
    out = json.loads(project_sync_body(sync_body(event, **where), fields))
    return out["rooms"][section][ROOM][key]["events"][0]


def escape(key: str) -> str:
    return key.replace("\\", "\\\\").replace(".", "\\.")


# -- split_field ---------------------------------------------------------------------

SPLIT_CASES = [  # Synapse's SplitFieldTestCase, case for case
    ("m", ["m"]),
    ("m.foo", ["m", "foo"]),
    ("m.foo.bar", ["m", "foo", "bar"]),
    (r"m\.foo", ["m.foo"]),
    (r"m\\.foo", ["m\\", "foo"]),
    (r"m\\\.foo", [r"m\.foo"]),
    (r"m\\\\.foo", ["m\\\\", "foo"]),
    (r"m\foo", [r"m\foo"]),
    (r"m\\foo", [r"m\foo"]),
    (r"m\\\foo", [r"m\\foo"]),
    (r"m\\\\foo", [r"m\\foo"]),
    ("m.foo\\", ["m", "foo\\"]),
    (r"m.foo\.", ["m", "foo."]),
    (r"m.foo\\.", ["m", "foo\\", ""]),
    (r"m.foo\\\.", ["m", r"foo\."]),
    (".m", ["", "m"]),
    ("..m", ["", "", "m"]),
    ("m.", ["m", ""]),
    ("m..", ["m", "", ""]),
    ("m..foo", ["m", "", "foo"]),
    (r"\m", [r"\m"]),
    ("", [""]),
    ("m\\\n.x", ["m\\\n", "x"]),
]


@pytest.mark.parametrize(("field", "keys"), SPLIT_CASES)
def test_split_field(field: str, keys: list[str]) -> None:
    assert split_field(field) == tuple(keys)


@SETTINGS
@given(st.lists(st.text(alphabet="ab.\\\n", max_size=6), min_size=1, max_size=4))
def test_split_field_reads_escaped_keys_back(keys: list[str]) -> None:
    assert split_field(".".join(escape(k) for k in keys)) == tuple(keys)


# -- project_sync_body: one event, as Synapse's only_fields ---------------------------

MESSAGE = {
    "type": "m.room.message",
    "sender": "@alice:hs.test",
    "event_id": "$e1",
    "origin_server_ts": 1,
    "content": {"body": "A message", "msgtype": "m.text"},
    "unsigned": {"age": 5},
}


def test_top_level_key() -> None:  # Synapse: test_event_fields_works_with_keys
    assert projected(MESSAGE, ("sender",)) == {"sender": "@alice:hs.test"}


def test_nested_key() -> None:  # Synapse: test_event_fields_works_with_nested_keys
    assert projected(MESSAGE, ("content.body",)) == {"content": {"body": "A message"}}


def test_dot_keys() -> None:  # Synapse: test_event_fields_works_with_dot_keys
    event = {**MESSAGE, "content": {"key.with.dots": {}}}
    assert projected(event, (r"content.key\.with\.dots",)) == {"content": {"key.with.dots": {}}}


def test_nested_dot_keys() -> None:  # Synapse: test_event_fields_works_with_nested_dot_keys
    event = {
        **MESSAGE,
        "content": {"not_me": 1, "nested.dot.key": {"leaf.key": 42, "not_me_either": 1}},
    }
    fields = (r"content.nested\.dot\.key.leaf\.key",)
    assert projected(event, fields) == {"content": {"nested.dot.key": {"leaf.key": 42}}}


def test_unknown_keys_are_skipped() -> None:  # Synapse: ..._nops_with_unknown_keys
    event = {**MESSAGE, "content": {"foo": "bar"}}
    fields = ("content.foo", "content.notexists", "nope", "nope.deeper")
    assert projected(event, fields) == {"content": {"foo": "bar"}}


def test_path_through_a_non_object() -> None:  # Synapse: ..._nops_with_non_dict_keys
    event = {**MESSAGE, "content": {"foo": ["I", "am", "an", "array"]}}
    assert projected(event, ("content.foo.am",)) == {}
    assert projected(event, ("content.foo.1",)) == {}  # ..._nops_with_array_keys
    assert projected(event, ("sender.x", "origin_server_ts.y")) == {}


def test_spec_example_escaped_key_with_backslash() -> None:
    event = {**MESSAGE, "content": {"a\\b": 1, "a\\": {"b": 2}}}
    assert projected(event, ("content.a\\b",)) == {"content": {"a\\b": 1}}
    assert projected(event, ("content.a\\\\.b",)) == {"content": {"a\\": {"b": 2}}}


def test_a_path_and_its_prefix_in_either_order() -> None:
    content = {"body": "A message", "msgtype": "m.text"}
    for fields in [("content", "content.body"), ("content.body", "content")]:
        assert projected(MESSAGE, fields) == {"content": content}


def test_empty_key_and_null_values() -> None:
    event = {"": {"": 1}, "content": {"x": None}, "sender": "@a:hs.test"}
    assert projected(event, (".",)) == {"": {"": 1}}
    assert projected(event, ("content.x",)) == {"content": {"x": None}}


def test_values_are_copied_byte_for_byte() -> None:
    body = (
        b'{"rooms":{"join":{"!r":{"timeline":{"events":['
        b'{"sender":"@a:b","content":{"n":1.50E+2,"s":"\\u00e9\\ud800","x":[1 , 2]}}'
        b"]}}}}}"
    )
    out = project_sync_body(body, ("content",))
    assert out == (
        b'{"rooms":{"join":{"!r":{"timeline":{"events":['
        b'{"content":{"n":1.50E+2,"s":"\\u00e9\\ud800","x":[1 , 2]}}'
        b"]}}}}}"
    )


def test_lone_surrogate_key() -> None:
    body = b'{"rooms":{"join":{"!r":{"timeline":{"events":[{"\\udc00":1,"sender":"@a:b"}]}}}}}'
    out = project_sync_body(body, ("\udc00",))
    assert json.loads(out)["rooms"]["join"]["!r"]["timeline"]["events"] == [{"\udc00": 1}]


# -- project_sync_body: which lists -------------------------------------------------


@pytest.mark.parametrize("section", ["join", "leave"])
@pytest.mark.parametrize(
    "key", ["timeline", "state", "org.matrix.msc4222.state_after", "state_after", "msc4354_sticky"]
)
def test_lists_synapse_projects(section: str, key: str) -> None:
    assert projected(MESSAGE, ("content.body",), section=section, key=key) == {
        "content": {"body": "A message"}
    }


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("join", "ephemeral"),
        ("join", "account_data"),
        ("leave", "account_data"),
        ("invite", "invite_state"),
        ("knock", "knock_state"),
        ("invite", "timeline"),
        ("knock", "state"),
        ("join", "timeline_not"),
    ],
)
def test_room_lists_synapse_leaves_whole(section: str, key: str) -> None:
    body = sync_body(MESSAGE, section=section, key=key)
    assert project_sync_body(body, ("content.body",)) is body


def test_top_level_lists_are_left_whole() -> None:
    event = {"type": "m.presence", "sender": "@a:hs.test", "content": {"presence": "online"}}
    body = enc(
        {
            "next_batch": "s1",
            "presence": {"events": [event]},
            "account_data": {"events": [event]},
            "to_device": {"events": [event]},
            "rooms": {"join": {ROOM: {"timeline": {"events": [event]}}}},
        }
    )
    out = json.loads(project_sync_body(body, ("content",)))
    for key in ("presence", "account_data", "to_device"):
        assert out[key] == {"events": [event]}
    assert out["rooms"]["join"][ROOM]["timeline"]["events"] == [{"content": event["content"]}]


def test_rest_of_a_room_is_kept() -> None:
    room = {
        "timeline": {"events": [MESSAGE], "limited": True, "prev_batch": "p1"},
        "ephemeral": {"events": [{"type": "m.typing", "content": {"user_ids": []}}]},
        "unread_notifications": {"highlight_count": 0},
        "summary": {"m.joined_member_count": 2},
    }
    out = json.loads(project_sync_body(enc({"rooms": {"join": {ROOM: room}}}), ("type",)))
    assert out["rooms"]["join"][ROOM] == {
        **room,
        "timeline": {"events": [{"type": "m.room.message"}], "limited": True, "prev_batch": "p1"},
    }


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b"not json",
        b'{"next_batch":"s"}',
        b'{"rooms":[]}',
        b'{"rooms":{"join":[]}}',
        b'{"rooms":{"join":{"!r":[]}}}',
        b'{"rooms":{"join":{"!r":{"timeline":[]}}}}',
        b'{"rooms":{"join":{"!r":{"timeline":{"limited":true}}}}}',
        b'{"rooms":{"join":{"!r":{"timeline":{"events":{}}}}}}',
    ],
)
def test_other_shapes_are_left(body: bytes) -> None:
    assert project_sync_body(body, ("content",)) is body


def test_events_that_are_not_objects_are_left() -> None:
    body = b'{"rooms":{"join":{"!r":{"timeline":{"events":[1,"x",null,[],{"type":"t"}]}}}}}'
    assert project_sync_body(body, ("content",)) == (
        b'{"rooms":{"join":{"!r":{"timeline":{"events":[1,"x",null,[],{}]}}}}}'
    )


def test_no_fields_means_all_fields() -> None:  # Synapse: ..._all_fields_if_empty
    body = sync_body(MESSAGE)
    assert project_sync_body(body, ()) is body


# -- project_sync_body: bundled aggregations, put back after projection (Synapse) -----

EDIT = {
    "type": "m.room.message",
    "sender": "@alice:hs.test",
    "event_id": "$edit",
    "content": {"body": "* fixed", "m.new_content": {"body": "fixed"}},
    "unsigned": {"age": 1},
}
REPLY = {
    "type": "m.room.message",
    "sender": "@bob:hs.test",
    "event_id": "$reply",
    "content": {"body": "reply"},
    "unsigned": {
        "age": 2,
        "m.relations": {"m.replace": {**EDIT, "event_id": "$edit2", "sender": "@bob:hs.test"}},
    },
}
RELATIONS = {
    "m.reference": {"chunk": [{"event_id": "$ref"}]},
    "m.replace": EDIT,
    "m.thread": {"latest_event": REPLY, "count": 3, "current_user_participated": True},
}
ROOT = {**MESSAGE, "unsigned": {"age": 5, "m.relations": RELATIONS}}


def test_aggregations_are_put_back_with_their_events_projected() -> None:
    assert projected(ROOT, ("content.body",)) == {
        "content": {"body": "A message"},
        "unsigned": {
            "m.relations": {
                "m.reference": {"chunk": [{"event_id": "$ref"}]},
                "m.replace": {"content": {"body": "* fixed"}},
                "m.thread": {
                    "latest_event": {
                        "content": {"body": "reply"},
                        "unsigned": {
                            "m.relations": {"m.replace": {"content": {"body": "* fixed"}}}
                        },
                    },
                    "count": 3,
                    "current_user_participated": True,
                },
            }
        },
    }


@pytest.mark.parametrize(
    "fields", [("unsigned.m\\.relations",), ("unsigned.m\\.relations.m\\.thread.count",)]
)
def test_aggregations_replace_what_the_fields_copied_of_them(fields: tuple[str, ...]) -> None:
    assert projected(ROOT, ("sender", *fields)) == {
        "sender": "@alice:hs.test",
        "unsigned": {
            "m.relations": {
                "m.reference": {"chunk": [{"event_id": "$ref"}]},
                "m.replace": {"sender": "@alice:hs.test"},
                "m.thread": {
                    "latest_event": {
                        "sender": "@bob:hs.test",
                        "unsigned": {"m.relations": {"m.replace": {"sender": "@bob:hs.test"}}},
                    },
                    "count": 3,
                    "current_user_participated": True,
                },
            }
        },
    }


def test_aggregations_in_a_copied_unsigned() -> None:
    out = projected(ROOT, ("type", "unsigned"))
    edit = {"type": "m.room.message", "unsigned": {"age": 1}}
    latest = {
        "type": "m.room.message",
        "unsigned": {"age": 2, "m.relations": {"m.replace": edit}},
    }
    assert out == {
        "type": "m.room.message",
        "unsigned": {
            "age": 5,
            "m.relations": {
                "m.reference": {"chunk": [{"event_id": "$ref"}]},
                "m.replace": edit,
                "m.thread": {"latest_event": latest, "count": 3, "current_user_participated": True},
            },
        },
    }


def test_aggregations_of_other_shapes_are_kept() -> None:
    relations = {"m.annotation": {"chunk": []}, "m.replace": 5, "m.thread": {"count": 1}}
    event = {**MESSAGE, "unsigned": {"m.relations": relations}}
    assert projected(event, ("type",)) == {
        "type": "m.room.message",
        "unsigned": {"m.relations": relations},
    }
    empty: Any
    for empty in ({}, [], "x"):
        event = {**MESSAGE, "unsigned": {"m.relations": empty}}
        assert projected(event, ("type",)) == {"type": "m.room.message"}


def test_redacted_because_is_not_projected_on_its_own() -> None:
    # Synapse's Rust serializer filters the event after adding redacted_because (its
    # Python one filtered redacted_because too)
    redaction = {"type": "m.room.redaction", "sender": "@a:hs.test", "content": {}}
    event = {"type": "m.room.message", "content": {}, "unsigned": {"redacted_because": redaction}}
    assert projected(event, ("type", "unsigned")) == {
        "type": "m.room.message",
        "unsigned": {"redacted_because": redaction},
    }


# -- project_sync_body: properties ----------------------------------------------------

KEYS = st.sampled_from(["content", "sender", "type", "body", "a.b", "a", "b", "", "\\", "x\\.y"])
SCALARS: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=4),
    st.floats(allow_nan=False, allow_infinity=False),
)
VALUES: st.SearchStrategy[Any] = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)


def has_relations(event: dict[str, Any]) -> bool:
    return isinstance(event.get("unsigned"), dict) and "m.relations" in event["unsigned"]


EVENTS: st.SearchStrategy[dict[str, Any]] = st.dictionaries(
    KEYS | st.just("unsigned"), VALUES, max_size=6
).filter(lambda e: not has_relations(e))
FIELD_PARTS = KEYS.map(escape) | st.text(alphabet="ab.\\", max_size=4)
FIELDS = st.lists(
    st.lists(FIELD_PARTS, min_size=1, max_size=3).map(".".join), min_size=1, max_size=5
).map(tuple)


@st.composite
def event_and_fields(
    draw: st.DrawFn, events: st.SearchStrategy[dict[str, Any]] = EVENTS
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """An event and fields, most of them paths into it (prefixes of each other often)."""
    event = draw(events)
    fields = list(draw(FIELDS))
    for _ in range(draw(st.integers(0, 5))):
        node: Any = event
        path: list[str] = []
        while isinstance(node, dict) and node and (not path or draw(st.booleans())):
            key = draw(st.sampled_from(sorted(node)))
            path.append(escape(key))
            node = node[key]
        if path:
            fields.insert(draw(st.integers(0, len(fields))), ".".join(path))
    return event, tuple(fields)


def only_fields(event: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """An oracle: Synapse's only_fields over decoded dicts."""
    out: dict[str, Any] = {}
    for field in fields:
        *parents, last = split_field(field)
        node: Any = event
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node:
            continue
        dst = out
        for key in parents:
            dst = dst.setdefault(key, {})
        dst[last] = copy.deepcopy(node[last])
    return out


def is_part_of(small: Any, big: Any) -> bool:
    if isinstance(small, dict) and small is not big:
        return isinstance(big, dict) and all(
            k in big and is_part_of(v, big[k]) for k, v in small.items()
        )
    return bool(small == big)


@SETTINGS
@given(event_and_fields())
def test_projection_is_synapses_only_fields(case: tuple[dict[str, Any], tuple[str, ...]]) -> None:
    event, fields = case
    assert projected(event, fields) == only_fields(event, fields)


@SETTINGS
@given(event_and_fields(EVENTS | st.just(ROOT)))
def test_projection_never_adds(case: tuple[dict[str, Any], tuple[str, ...]]) -> None:
    event, fields = case
    assert is_part_of(projected(event, fields), event)


@SETTINGS
@given(EVENTS, st.lists(KEYS.map(escape) | st.text(max_size=3), max_size=3))
def test_projecting_every_top_level_key_is_identity(
    event: dict[str, Any], extra: list[str]
) -> None:
    fields = (*extra, *(escape(k) for k in event))
    if fields:
        assert projected(event, fields) == event


@SETTINGS
@given(event_and_fields(EVENTS | st.just(ROOT)))
def test_projection_is_idempotent(case: tuple[dict[str, Any], tuple[str, ...]]) -> None:
    event, fields = case
    once = project_sync_body(sync_body(event), fields)
    # The same JSON (members may come in another order: bundled aggregations are put
    # back after the fields are copied).
    assert json.loads(project_sync_body(once, fields)) == json.loads(once)


# -- split_event_fields ---------------------------------------------------------------


def test_no_event_fields_gives_the_input_back() -> None:
    raw = b'{ "room" : {"timeline": {"limit": 10}} }'
    stripped, fields = split_event_fields(raw)
    assert stripped is raw
    assert fields is None
    assert split_event_fields('{"presence": {}}') == (b'{"presence": {}}', None)


def test_top_level_event_fields() -> None:
    raw = '{"room":{"timeline":{"limit":10}},"event_fields":["content.body","type"],"x":1}'
    assert split_event_fields(raw) == (
        b'{"room":{"timeline":{"limit":10}},"x":1}',
        ("content.body", "type"),
    )


def test_empty_event_fields() -> None:
    assert split_event_fields(b'{"event_fields":[]}') == (b"{}", ())


@pytest.mark.parametrize(
    "path",
    [
        ("room",),
        ("room", "timeline"),
        ("room", "state"),
        ("room", "ephemeral"),
        ("room", "account_data"),
        ("presence",),
        ("account_data",),
    ],
)
def test_nested_event_fields_are_stripped(path: tuple[str, ...]) -> None:
    inner: dict[str, Any] = {"limit": 1, "event_fields": ["content"], "types": ["m.*"]}
    for key in reversed(path):
        inner = {"not_rooms": [], key: inner}
    stripped, fields = split_event_fields(enc(inner))
    assert fields is None
    expected: Any = json.loads(stripped)
    for key in path:
        expected = expected[key]
    assert expected == {"limit": 1, "types": ["m.*"]}


@pytest.mark.parametrize(
    "raw",
    [
        b'{"room":{"rooms":{"event_fields":1}}}',
        b'{"room":{"timeline":{"x":{"event_fields":1}}}}',
        b'{"presence":{"not_types":["event_fields"]},"types":"event_fields"}',
        b'{"room":["event_fields"],"presence":5}',
        b'{"x":{"event_fields":1}}',
    ],
)
def test_event_fields_elsewhere_are_left(raw: bytes) -> None:
    assert split_event_fields(raw) == (raw, None)


def test_the_rest_is_kept_byte_for_byte_and_in_order() -> None:
    raw = (
        b'{"z":1.0e1, "event_fields":["a"],"room":{"state":{"lazy_load_members":true},'
        b'"timeline":{"event_fields":[],"limit":1E2,"types":["\\u00e9\\ud800"]}},'
        b'"a":{"b" : [1, 2]}}'
    )
    stripped, fields = split_event_fields(raw)
    assert fields == ("a",)
    assert stripped == (
        b'{"z":1.0e1,"room":{"state":{"lazy_load_members":true},'
        b'"timeline":{"limit":1E2,"types":["\\u00e9\\ud800"]}},'
        b'"a":{"b" : [1, 2]}}'
    )


def test_duplicate_keys_last_wins_as_for_synapse() -> None:
    assert split_event_fields(b'{"event_fields":[1],"event_fields":["b"],"a":1,"a":2}') == (
        b'{"a":2}',
        ("b",),
    )
    with pytest.raises(FilterRefused):
        split_event_fields(b'{"event_fields":["b"],"event_fields":[1]}')


def test_big_numbers_are_kept() -> None:
    raw = b'{"event_fields":["a"],"x":123456789012345678901234567890,"y":1e400}'
    assert split_event_fields(raw) == (b'{"x":123456789012345678901234567890,"y":1e400}', ("a",))


def test_lone_surrogates_are_json() -> None:
    raw = b'{"event_fields":["content.\\udc00"],"types":["\\ud800"]}'
    assert split_event_fields(raw) == (b'{"types":["\\ud800"]}', ("content.\udc00",))


SCHEMA_ERRORS = [  # Synapse: check_valid_filter's jsonschema message, first line
    ('{"event_fields":"content"}', "'content' is not of type 'array'"),
    ('{"event_fields":null}', "None is not of type 'array'"),
    ('{"event_fields":{}}', "{} is not of type 'array'"),
    ('{"event_fields":["a",1]}', "1 is not of type 'string'"),
    ('{"event_fields":["a",{"x":true}]}', "{'x': True} is not of type 'string'"),
]


@pytest.mark.parametrize(("raw", "message"), SCHEMA_ERRORS)
@pytest.mark.parametrize("source", ["query", "body"])
def test_event_fields_not_an_array_of_strings(raw: str, message: str, source: Any) -> None:
    with pytest.raises(FilterRefused) as refused:
        split_event_fields(raw, source=source)
    assert (refused.value.status, refused.value.errcode, refused.value.error) == (
        400,
        "M_UNKNOWN",
        message,
    )


NOT_JSON = ["{", '{"a":1} x', '{"a":NaN}', '{"a":-Infinity}', "{'a':1}", '{"a":1,}', "{" * 100_000]
NOT_JSON += ['{"a":' + "[" * 100_000 + "]" * 100_000 + "}"]  # Python's json: RecursionError
NOT_JSON += ['{"a":' + "1" * 5000 + "}"]  # Python's json: more digits than int() takes


@pytest.mark.parametrize("raw", NOT_JSON)
def test_not_json_in_a_query(raw: str) -> None:
    with pytest.raises(FilterRefused) as refused:
        split_event_fields(raw)
    assert (refused.value.status, refused.value.errcode, refused.value.error) == (
        400,
        "M_NOT_JSON",
        "Invalid filter JSON",
    )


@pytest.mark.parametrize("raw", [*(r.encode() for r in NOT_JSON), b"", b'{"a":"\xff"}'])
def test_not_json_in_a_body(raw: bytes) -> None:
    with pytest.raises(FilterRefused) as refused:
        split_event_fields(raw, source="body")
    assert (refused.value.status, refused.value.errcode, refused.value.error) == (
        400,
        "M_NOT_JSON",
        "Content not JSON.",
    )


@pytest.mark.parametrize("raw", [b"[]", b"1", b'"{}"', b"null"])
def test_not_an_object_in_a_body(raw: bytes) -> None:
    with pytest.raises(FilterRefused) as refused:
        split_event_fields(raw, source="body")
    assert (refused.value.status, refused.value.errcode, refused.value.error) == (
        400,
        "M_BAD_JSON",
        "Content must be a JSON object.",
    )


def test_whitespace_around_an_object_is_json() -> None:
    assert split_event_fields(b' \n{"event_fields":["a"]}\t', source="body") == (b"{}", ("a",))


@pytest.mark.parametrize(
    ("value", "inline"),
    [('{"room":{}}', True), ("{", True), ("1", False), (" {}", False), ("", False), ("%7B", False)],
)
def test_is_inline_filter(value: str, inline: bool) -> None:
    assert is_inline_filter(value) is inline


# -- split_event_fields: properties ---------------------------------------------------

WHERE = [(), ("room",), ("room", "timeline"), ("room", "state"), ("room", "ephemeral")]
WHERE += [("room", "account_data"), ("presence",), ("account_data",)]
FILTER_KEYS = KEYS | st.sampled_from(["limit", "types", "rooms", "not_senders", "x"])
OBJECTS = st.dictionaries(FILTER_KEYS, VALUES, max_size=4)


@st.composite
def filters(draw: st.DrawFn) -> dict[str, Any]:
    top: dict[str, Any] = draw(OBJECTS)
    for path in draw(st.lists(st.sampled_from(WHERE), max_size=4)):
        node = top
        for key in path:
            if not isinstance(node.get(key), dict):
                node[key] = draw(OBJECTS)
            node = node[key]
        node["event_fields"] = draw(st.lists(st.text(max_size=5), max_size=3))
    return top


def at(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


@SETTINGS
@given(filters())
def test_split_leaves_no_event_fields_where_read(filter_: dict[str, Any]) -> None:
    stripped, fields = split_event_fields(enc(filter_))
    out = json.loads(stripped)
    for path in WHERE:
        node = at(out, path)
        assert not (isinstance(node, dict) and "event_fields" in node)
    assert fields == (tuple(filter_["event_fields"]) if "event_fields" in filter_ else None)
    expected = copy.deepcopy(filter_)
    for path in WHERE:
        node = at(expected, path)
        if isinstance(node, dict):
            node.pop("event_fields", None)
    assert out == expected


@SETTINGS
@given(filters())
def test_split_is_idempotent(filter_: dict[str, Any]) -> None:
    stripped, _ = split_event_fields(enc(filter_))
    again, fields = split_event_fields(stripped)
    assert again is stripped
    assert fields is None


# -- strip_event_fields_from_search ---------------------------------------------------


def test_search_filter_event_fields_are_stripped() -> None:
    body = (
        b'{"search_categories":{"room_events":{"search_term":"x","filter":'
        b'{"limit":5,"event_fields":"anything","rooms":["!r"]},"keys":["content.body"]}}}'
    )
    assert strip_event_fields_from_search(body) == (
        b'{"search_categories":{"room_events":{"search_term":"x","filter":'
        b'{"limit":5,"rooms":["!r"]},"keys":["content.body"]}}}'
    )


@pytest.mark.parametrize(
    "body",
    [
        b'{"search_categories":{"room_events":{"search_term":"x","filter":{"limit":5}}}}',
        b'{"search_categories":{"room_events":{"search_term":"x"}}}',
        b'{"search_categories":{"room_events":{"filter":["event_fields"]}}}',
        b'{"search_categories":{"room_events":[]}}',
        b'{"search_categories":[],"event_fields":["a"]}',
        b'{"event_fields":["a"]}',
        b"{}",
    ],
)
def test_search_without_event_fields_in_its_filter(body: bytes) -> None:
    assert strip_event_fields_from_search(body) is body


@pytest.mark.parametrize(
    ("body", "errcode", "error"),
    [
        (b"", "M_NOT_JSON", "Content not JSON."),
        (b"{", "M_NOT_JSON", "Content not JSON."),
        (b'{"a":NaN}', "M_NOT_JSON", "Content not JSON."),
        (b"\xff", "M_NOT_JSON", "Content not JSON."),
        (b"[]", "M_BAD_JSON", "Content must be a JSON object."),
    ],
)
def test_search_body_not_a_json_object(body: bytes, errcode: str, error: str) -> None:
    with pytest.raises(FilterRefused) as refused:
        strip_event_fields_from_search(body)
    assert (refused.value.status, refused.value.errcode, refused.value.error) == (
        400,
        errcode,
        error,
    )


# --- the `filter` query parameter ---------------------------------------------------------


def test_a_query_without_event_fields_is_forwarded_as_it_is() -> None:
    query = b"since=s1&filter=%7B%22room%22%3A%7B%7D%7D&timeout=0"
    assert filter_in_query(query, stored_allowed=True) == QueryFilter(query)
    assert filter_in_query(b"timeout=0", stored_allowed=True) == QueryFilter(b"timeout=0")


def test_inline_event_fields_are_taken_out_and_kept() -> None:
    query = b"a=1&filter=" + quote(b'{"event_fields":["content"],"room":{}}').encode() + b"&b=2"
    found = filter_in_query(query, stored_allowed=True)
    assert found.fields == ("content",)
    assert found.query == b"a=1&filter=" + quote(b'{"room":{}}', safe="").encode() + b"&b=2"
    # An encoded parameter name is the same parameter to every homeserver.
    encoded = b"%66ilter=" + quote(b'{"event_fields":["content"]}').encode()
    assert filter_in_query(encoded, stored_allowed=False).fields == ("content",)


def test_a_filter_id_is_read_only_where_ids_are_allowed() -> None:
    assert filter_in_query(b"filter=12", stored_allowed=True).stored_id == "12"
    with pytest.raises(FilterRefused) as caught:
        filter_in_query(b"filter=12", stored_allowed=False)
    assert caught.value.errcode == "M_NOT_JSON"


@pytest.mark.parametrize(
    "query",
    [
        b"filter=1&filter=2",
        b"x=1;filter=" + quote(b'{"event_fields":["content"]}').encode(),
        b"filter=" + quote(b'{"room":{}}').encode() + b";filter=2",
        b"filter=%FF",
    ],
)
def test_a_filter_homeservers_could_read_otherwise_is_refused(query: bytes) -> None:
    with pytest.raises(FilterRefused):
        filter_in_query(query, stored_allowed=True)


def test_a_stored_filter_with_event_fields_is_forwarded_inline() -> None:
    query = b"since=s&filter=7"
    assert with_stored_filter(query, b'{"room":{}}') == QueryFilter(query)
    found = with_stored_filter(query, b'{"event_fields":["content.body"],"room":{}}')
    assert found.fields == ("content.body",)
    assert found.query == b"since=s&filter=" + quote(b'{"room":{}}', safe="").encode()
