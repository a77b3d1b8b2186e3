"""The guard's byte-level fast path against the exact walk, on generated JSON texts."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ignore_proxy.rewrite.guard import IgnoredEventLeft, guard_body, guard_body_exact
from ignore_proxy.rewrite.sender_scan import _SENDER_ESCAPES, holds_no_ignored_event
from tests.rewrite.factories import ALICE, BOB, CTX, IGNORED, SPAM, TROLL
from tests.rewrite.test_properties import SETTINGS


@dataclass
class Obj:
    """A JSON object as written: its members in order, duplicate keys allowed."""

    pairs: list[tuple[str, Any]]


_STRINGS = [SPAM, TROLL, ALICE, SPAM + ".org", "", "{", "}{", "\\", "\ud800", "caf\u00e9",
            "\U0001f600", 'x","sender":"' + SPAM, "\\u0040spam", "a/b", "\n"]  # fmt: skip
_KEYS = st.sampled_from(["a", "content", "unsigned", "events", "sender", "state_key",
                         "redacted_because", "x/y", "é"])  # fmt: skip
_SENDERS = st.sampled_from([SPAM, TROLL, ALICE, BOB, SPAM + ".org", "@spam"])
_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(_STRINGS)
    | st.text(max_size=4)
)


def _stub(sender: str) -> Obj:
    return Obj([("type", "m.room.redaction"), ("event_id", "$r"), ("sender", sender),
                ("redacts", "$t"), ("content", Obj([("redacts", "$t")]))])  # fmt: skip


@st.composite
def _events(draw: st.DrawFn, children: st.SearchStrategy[Any]) -> Obj:
    sender = draw(_SENDERS)
    pairs: list[tuple[str, Any]] = [
        ("event_id", draw(st.sampled_from(["$e", "$f", 7]))),
        ("sender", sender),
        ("type", draw(st.sampled_from(["m.room.message", "m.room.member"]))),
    ]
    if draw(st.booleans()):
        pairs.append(("state_key", draw(st.sampled_from(["", sender, None]))))
    if draw(st.booleans()):
        pairs.append(("content", draw(children)))
    unsigned = st.just(Obj([("redacted_because", _stub(draw(_SENDERS)))])) | children
    if draw(st.booleans()):
        pairs.append(("unsigned", draw(unsigned)))
    if draw(st.integers(0, 3)) == 0:  # a duplicate: the last one counts
        pairs.append(("sender", draw(_SENDERS)))
    return Obj(draw(st.permutations(pairs)))


def _extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    objects = st.lists(st.tuples(_KEYS, children), max_size=4).map(Obj)
    return st.lists(children, max_size=4) | objects | _events(children)


trees = st.recursive(_leaves | _events(_leaves), _extend, max_leaves=30)

_SHORT = {'"': '\\"', "\\": "\\\\", "/": "\\/", "\b": "\\b", "\f": "\\f", "\n": "\\n",
          "\r": "\\r", "\t": "\\t"}  # fmt: skip


class Writer:
    """Writes a generated tree as JSON, choosing its spelling at random: whitespace,
    escapes (``escapes``: any character may be written as one), number forms."""

    def __init__(self, rng: random.Random, escapes: bool) -> None:
        self.rng = rng
        self.escapes = escapes

    def ws(self) -> str:
        return self.rng.choice(["", "", "", " ", "\n  ", "\t", "\r\n"])

    def _u(self, code: int) -> str:
        digits = f"{code:04x}"
        return "\\u" + (digits.upper() if self.rng.random() < 0.5 else digits)

    def _escape(self, ch: str) -> str:
        if ch in _SHORT and self.rng.random() < 0.5:
            return _SHORT[ch]
        code = ord(ch)
        if code > 0xFFFF:
            code -= 0x10000
            return self._u(0xD800 + (code >> 10)) + self._u(0xDC00 + (code & 0x3FF))
        return self._u(code)

    def string(self, s: str) -> str:
        mode = self.rng.choice(["some", "all"] if self.escapes else ["none", "non-ascii"])
        out = []
        for ch in s:
            code = ord(ch)
            must = ch in '"\\' or code < 0x20 or 0xD800 <= code < 0xE000
            may = (
                mode == "all"
                or (mode == "some" and self.rng.random() < 0.3)
                or (mode == "non-ascii" and code > 0x7F)  # as Synapse writes
            )
            out.append(self._escape(ch) if must or may else ch)
        return '"' + "".join(out) + '"'

    def number(self, value: int | float) -> str:
        if isinstance(value, int) or not value.is_integer() or abs(value) > 1e15:
            return json.dumps(value)
        return self.rng.choice([f"{int(value)}.0", f"{int(value)}e0", f"{int(value)}.00E+0"])

    def write(self, node: Any) -> str:
        if isinstance(node, Obj):
            members = [
                self.ws() + self.string(k) + self.ws() + ":" + self.ws() + self.write(v) + self.ws()
                for k, v in node.pairs
            ]
            return "{" + ",".join(members) + "}" if members else "{" + self.ws() + "}"
        if isinstance(node, list):
            items = [self.ws() + self.write(v) + self.ws() for v in node]
            return "[" + ",".join(items) + "]" if items else "[" + self.ws() + "]"
        if isinstance(node, str):
            return self.string(node)
        if isinstance(node, bool) or node is None:
            return json.dumps(node)
        return self.number(node)


def _is_hidden(node: dict[str, Any]) -> bool:
    shaped = all(isinstance(node.get(k), str) for k in ("event_id", "sender", "type"))
    return shaped and node["sender"] in IGNORED and "state_key" not in node


def _hidden_anywhere(value: Any) -> bool:
    """Is there an ignored user's event-shaped object without ``state_key`` anywhere in
    a decoded value (content and redaction stubs included)?"""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if _is_hidden(node):
                return True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


class _Members(list[tuple[str, Any]]):
    """An object's members as written, duplicates included."""


def _hidden_in_text(data: bytes) -> bool:
    """``_hidden_anywhere``, also in the objects a later duplicate key hides from the
    decoded value (they are in the text: the byte-level path cannot tell them apart)."""
    stack = [json.loads(data, object_pairs_hook=_Members)]
    while stack:
        node = stack.pop()
        if isinstance(node, _Members):
            if _is_hidden(dict(node)):
                return True
            stack.extend(value for _, value in node)
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _outcome(fn: Any, body: bytes) -> tuple[str, Any]:
    try:
        result = fn(body, CTX)
    except IgnoredEventLeft as left:
        return "left", left.path
    return "ok", None if result is None else (result.body, result.removed)


@SETTINGS
@given(tree=trees, rng=st.randoms(use_true_random=False), escapes=st.booleans(),
       wrap=st.booleans())  # fmt: skip
def test_fast_path_agrees_with_the_walk(
    tree: Any, rng: random.Random, escapes: bool, wrap: bool
) -> None:
    writer = Writer(rng, escapes)
    node = Obj([("top", tree)]) if wrap else tree
    data = (writer.ws() + writer.write(node) + writer.ws()).encode()
    value = json.loads(data)
    shown = holds_no_ignored_event(data, IGNORED)
    if shown:
        assert not _hidden_anywhere(value)
    if _SENDER_ESCAPES.search(data) is None and data.count(b"{") < 32:
        # where its preconditions hold, the fast path decides every body
        assert shown == (not _hidden_in_text(data))
    assert _outcome(guard_body, data) == _outcome(guard_body_exact, data)


def _event(sender: str, **more: Any) -> dict[str, Any]:
    return {"content": {"body": "x"}, "event_id": "$e", "sender": sender,
            "type": "m.room.message", **more}  # fmt: skip


def test_state_events_of_ignored_users_need_no_walk() -> None:
    state = _event(SPAM, state_key=SPAM)
    body = json.dumps({"rooms": [[state, _event(ALICE)], {"a": state}]}, indent=1).encode()
    assert holds_no_ignored_event(body, IGNORED)
    assert not holds_no_ignored_event(body.replace(b'"state_key"', b'"state_kez"'), IGNORED)


@pytest.mark.parametrize(
    "spelling",
    [
        b'{"event_id":"$e","s\\u0065nder":"@spam:evil.example","type":"t"}',
        b'{"event_id":"$e","sender":"\\u0040spam:evil.example","type":"t"}',
        b'{"event_id":"$e","sender":"@spam:evil\\u002Eexample","type":"t"}',
        b'{"event_id":"$e","sender" :\n "@spam:evil.example","type":"t"}',
        b'{"event_id":"$e","sender":"@alice:example.org","sender":"@spam:evil.example","type":"t"}',
    ],
)
def test_spellings_of_an_ignored_sender(spelling: bytes) -> None:
    assert not holds_no_ignored_event(spelling, IGNORED)
    body = b'{"chunk":[' + spelling + b"]}"
    out = guard_body(body, CTX)
    assert out is not None and out.removed == 1 and json.loads(out.body) == {"chunk": []}


def test_many_braces_before_the_sender_fall_back_to_the_walk() -> None:
    content: Any = "{{{"
    for _ in range(40):
        content = {"k": content}
    event = {"content": content, "event_id": "$e", "sender": SPAM, "type": "t"}
    body = json.dumps({"chunk": [event, {**event, "state_key": ""}]}).encode()
    assert not holds_no_ignored_event(body, IGNORED)
    out = guard_body(body, CTX)
    assert out is not None and out.removed == 1
