"""The last line of defence: ignored users' events found anywhere in an answer."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ignore_proxy.rewrite.guard import (
    IgnoredEventLeft,
    find_ignored_events,
    guard_body,
    guard_body_exact,
    json_pointer,
    remove_ignored_events,
)
from tests.rewrite.factories import ALICE, BOB, CTX, IGNORED, SPAM, TROLL
from tests.rewrite.test_properties import SETTINGS


def _ignored_event(n: int, sender: str = SPAM) -> dict[str, Any]:
    return {"event_id": f"$i{n}", "sender": sender, "type": "m.room.message",
            "content": {"body": "their words"}}  # fmt: skip


def _stub(sender: str) -> dict[str, Any]:
    return {"type": "m.room.redaction", "event_id": "$r", "sender": sender,
            "origin_server_ts": 1, "redacts": "$t", "content": {"redacts": "$t"}}  # fmt: skip


def test_removes_from_arrays_and_keeps_the_rest() -> None:
    kept = {"event_id": "$k", "sender": ALICE, "type": "m.room.message", "content": {}}
    state = {"event_id": "$s", "sender": SPAM, "type": "m.room.name", "state_key": ""}
    body = {"a": [_ignored_event(1), kept, state, [_ignored_event(2, TROLL)]], "n": 1}
    original = copy.deepcopy(body)
    out, removed = remove_ignored_events(body, IGNORED)
    assert removed == 2
    assert out == {"a": [kept, state, []], "n": 1}
    assert body == original  # the input is not changed
    assert out["a"][1] is state  # untouched parts are shared, not copied
    assert remove_ignored_events(out, IGNORED) == (out, 0)


def test_raises_with_the_path_not_the_content() -> None:
    body = {"rooms": {"!r/x": {"latest": _ignored_event(1)}}}
    with pytest.raises(IgnoredEventLeft) as info:
        remove_ignored_events(body, IGNORED)
    assert info.value.path == ("rooms", "!r/x", "latest")
    assert str(info.value) == "an ignored user's event is left at /rooms/!r~1x/latest"
    assert "their words" not in str(info.value) and SPAM not in str(info.value)
    with pytest.raises(IgnoredEventLeft) as info:
        remove_ignored_events(_ignored_event(1), IGNORED)
    assert info.value.path == ()


def test_redaction_stub_content_and_non_events_allowed() -> None:
    by_alice = {"event_id": "$k", "sender": ALICE, "type": "m.room.message",
                "content": {"quoted": _ignored_event(1), "list": [_ignored_event(2)]},
                "unsigned": {"redacted_because": _stub(SPAM)}}  # fmt: skip
    not_events = [{"sender": SPAM}, {"event_id": 1, "sender": SPAM, "type": "t"}, SPAM]
    body = {"chunk": [by_alice], "other": not_events}
    assert remove_ignored_events(body, IGNORED) == (body, 0)
    full = {**by_alice, "unsigned": {"redacted_because": {**_stub(SPAM), "reason": "r"}}}
    with pytest.raises(IgnoredEventLeft) as info:
        remove_ignored_events({"chunk": [full]}, IGNORED)
    assert info.value.path == ("chunk", 0, "unsigned", "redacted_because")
    misplaced = {"chunk": [{**by_alice, "unsigned": {"x": _stub(SPAM)}}]}
    with pytest.raises(IgnoredEventLeft):
        remove_ignored_events(misplaced, IGNORED)


def test_any_depth() -> None:
    body: Any = [_ignored_event(0)]
    for depth in range(5000):
        body = {"k": [body, depth]} if depth % 2 else [body]
    out, removed = remove_ignored_events(body, IGNORED)
    assert removed == 1
    assert json_pointer(find_ignored_events(body, IGNORED)[0]).endswith("/0/0")
    assert out is not body


# --- generated answers -------------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "events", "chunk", "unsigned", "rooms", "!r:x", "x/y~z"])
_BENIGN = [
    {"event_id": "$a", "sender": ALICE, "type": "m.room.message", "content": {"b": 1}},
    {"event_id": "$s", "sender": SPAM, "type": "m.room.name", "state_key": "", "content": {}},
    {
        "event_id": "$q",
        "sender": BOB,
        "type": "m.room.message",
        "content": {"quote": _ignored_event(99)},
        "unsigned": {"redacted_because": _stub(TROLL)},
    },
]
_benign_events = st.sampled_from(_BENIGN)
_leaves = st.none() | st.booleans() | st.integers() | st.text(max_size=4) | _benign_events
trees = st.recursive(
    _leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=25,
)


def _containers(node: Any, out: list[Any]) -> list[Any]:
    """The arrays and objects of a generated tree, generated events left out (opaque)."""
    if isinstance(node, list):
        out.append(node)
        for child in node:
            _containers(child, out)
    elif isinstance(node, dict) and "event_id" not in node:
        out.append(node)
        for child in node.values():
            _containers(child, out)
    return out


def _at(node: Any, path: tuple[str | int, ...]) -> Any:
    for step in path:
        node = node[step]
    return node


@SETTINGS
@given(tree=trees, data=st.data())
def test_generated_answers(tree: Any, data: st.DataObject) -> None:
    root: Any = {"top": tree}
    expected = copy.deepcopy(root)
    containers = _containers(root, [])
    inserted_in_arrays: list[dict[str, Any]] = []
    inserted_in_objects: list[dict[str, Any]] = []
    for n in range(data.draw(st.integers(0, 4))):
        where = data.draw(st.sampled_from(containers))
        event = _ignored_event(n, data.draw(st.sampled_from(sorted(IGNORED))))
        if isinstance(where, list):
            where.insert(data.draw(st.integers(0, len(where))), event)
            inserted_in_arrays.append(event)
        else:
            where[f"ins{n}"] = event
            inserted_in_objects.append(event)
    before = copy.deepcopy(root)
    separators = data.draw(st.sampled_from([(",", ":"), (", ", ": ")]))
    body = json.dumps(root, separators=separators, ensure_ascii=False).encode()
    if data.draw(st.booleans()):  # escaped spellings of the IDs
        body = body.replace(b"@", b"\\u0040")
    if inserted_in_objects:
        with pytest.raises(IgnoredEventLeft) as info:
            remove_ignored_events(root, IGNORED)
        assert any(_at(root, info.value.path) is e for e in inserted_in_objects)
        with pytest.raises(IgnoredEventLeft) as info:
            guard_body(body, CTX)
        assert any(_at(root, info.value.path) is e for e in inserted_in_objects)
    else:
        out, removed = remove_ignored_events(root, IGNORED)
        assert removed == len(inserted_in_arrays)
        assert out == expected
        if not removed:
            assert out is root
        raw_out = guard_body(body, CTX)
        if removed:
            assert raw_out is not None and raw_out.removed == removed
            assert json.loads(raw_out.body) == expected
        else:
            assert raw_out is None
    assert root == before


def test_guard_body_splices_untouched_parts() -> None:
    kept = b'{"event_id":"$k", "sender":"@alice:example.org","type":"t","content":{"x":1.50}}'
    body = (
        b'{"a": [' + kept + b', {"event_id":"$i","sender":"@spam:evil.example","type":"t"}],'
        b' "b": "\\u0040troll:evil.example"}'
    )
    out = guard_body(body, CTX)
    assert out is not None and out.removed == 1
    assert out.body == b'{"a":[' + kept + b'],"b":"\\u0040troll:evil.example"}'
    assert guard_body(b'{"a": 1}', CTX) is None
    assert guard_body(b"not json @spam:evil.example", CTX) is None
    with pytest.raises(IgnoredEventLeft):
        guard_body(json.dumps(_ignored_event(1)).encode(), CTX)
    deep = b"[" * 900 + json.dumps(_ignored_event(1)).encode() + b"]" * 900
    out = guard_body(deep, CTX)  # deeper than its own recursion: the decoded walk
    assert out is not None and out.removed == 1
    assert out.body == b"[" * 900 + b"]" * 900
    event = json.dumps(_ignored_event(1)).encode()
    too_deep = b'{"a":' + b"[" * 3000 + event + b"]" * 3000 + b"}"
    with pytest.raises(IgnoredEventLeft):  # unreadable, and it holds an ignored user's event
        guard_body(too_deep, CTX)
    mention = b'{"a":' + b"[" * 3000 + b'"@spam:evil.example"' + b"]" * 3000 + b"}"
    with pytest.raises(IgnoredEventLeft):  # the walk cannot read it
        guard_body_exact(mention, CTX)
    assert guard_body(mention, CTX) is None  # the bytes show no event of theirs
