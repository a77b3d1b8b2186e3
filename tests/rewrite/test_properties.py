"""Property tests over generated bodies for every rewriter.

Events are rendered as raw bytes (with odd JSON: huge integers, lone surrogates, deep
nesting, duplicate keys, escaped and raw non-ASCII, escaped senders, junk items) and the
output is checked against an oracle built from the specs, parsed with stdlib json (which
accepts everything the generator writes).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ignore_proxy.rewrite import (
    IgnoreContext,
    Rewritten,
    SenderIgnored,
    guard_body,
    rewrite_context,
    rewrite_event_relationships,
    rewrite_events_stream,
    rewrite_initial_sync,
    rewrite_messages,
    rewrite_notifications,
    rewrite_relations,
    rewrite_room_initial_sync,
    rewrite_search,
    rewrite_single_event,
    rewrite_sliding_sync,
    rewrite_sync,
    rewrite_threads,
)
from tests.rewrite.factories import ALICE, BOB, CTX, IGNORED, ME, SPAM, TROLL

SENDERS = [SPAM, TROLL, ALICE, BOB, ME]
CONTENTS = [
    b'{"msgtype":"m.text","body":"hi"}',
    b'{"n":123456789012345678901234567890123456789,"m":-18446744073709551617}',
    b'{"body":"\\ud800 lone"}',
    b'{"body":"\\udfff\\ud800x"}',
    b'{"d":' + b"[" * 300 + b"]" * 300 + b"}",
    '{"body":"héllo ☃ 😀 日本"}'.encode(),
    b'{"body":"caf\\u00e9 \\ud83d\\ude00 \\/ \\" \\\\"}',
    b'{"a":1,"a":{"b":2},"a":3}',
    b'{"mention":"@spam:evil.example and \\u0040troll:evil.example"}',
    b'{"x":1.5e300,"y":-0.0,"z":[true,false,null],"e":1E-7}',
    b"[]",
]
JUNK = [b'"@spam:evil.example"', b"17", b"null", b'[{"sender":"@spam:evil.example"}]', b"{}"]


def _enc(s: str) -> bytes:
    return json.dumps(s).encode()


def _escaped(s: str) -> bytes:
    return _enc(s).replace(b"@", b"\\u0040").replace(b".", b"\\u002E")


@dataclass(frozen=True)
class Spec:
    sender: str
    escaped: bool
    state_key: str | None
    decoy: str | None
    content: int
    thread: str | None
    junk: int | None
    spaced: bool
    redactor: str | None = None

    @property
    def hidden(self) -> bool:
        return self.junk is None and self.sender in IGNORED and self.state_key is None

    @property
    def thread_hidden(self) -> bool:
        return self.junk is None and self.thread in IGNORED

    @property
    def redaction_hidden(self) -> bool:
        """Redacted by an ignored user: ``redacted_because`` becomes a stub."""
        return self.junk is None and self.redactor in IGNORED

    @property
    def fixes(self) -> int:
        """What the rewriters count for this event when they keep it."""
        return int(self.thread_hidden) + int(self.redaction_hidden)

    def expected(self, raw: bytes) -> Any:
        """The event as a rewriter keeps it."""
        out = json.loads(raw)
        if self.thread_hidden:
            del out["unsigned"]["m.relations"]
        if self.redaction_hidden:
            because = out["unsigned"]["redacted_because"]
            out["unsigned"]["redacted_because"] = {
                **{k: because[k] for k in ("type", "event_id", "origin_server_ts", "redacts")},
                "sender": self.redactor,
                "content": {"redacts": because["content"]["redacts"]},
            }
        return out

    def render(self, eid: str) -> bytes:
        if self.junk is not None:
            return JUNK[self.junk]
        parts = []
        if self.decoy is not None:
            parts.append(b'"sender":' + _enc(self.decoy))
        parts += [
            b'"type":"m.room.message"',
            b'"event_id":' + _enc(eid),
            b'"content":' + CONTENTS[self.content],
            b'"sender":' + (_escaped(self.sender) if self.escaped else _enc(self.sender)),
        ]
        if self.state_key is not None:
            parts.append(b'"state_key":' + _enc(self.state_key))
        unsigned = [b'"age":5']
        if self.thread is not None:
            latest = b'{"sender":' + _enc(self.thread) + b',"type":"m.room.message","content":{}}'
            unsigned.append(
                b'"m.relations":{"m.thread":{"latest_event":' + latest + b',"count":1}}'
            )
        if self.redactor is not None:
            redactor = _escaped(self.redactor) if self.escaped else _enc(self.redactor)
            unsigned.append(
                b'"redacted_because":{"type":"m.room.redaction","sender":'
                + redactor
                + b',"event_id":"$red","origin_server_ts":7,"redacts":'
                + _enc(eid)
                + b',"content":{"reason":"words of theirs","redacts":'
                + _enc(eid)
                + b'},"unsigned":{"age":1}}'
            )
        if len(unsigned) > 1:
            parts.append(b'"unsigned":{' + b",".join(unsigned) + b"}")
        sep = b" , " if self.spaced else b","
        return b"{" + sep.join(parts) + b"}"


specs = st.builds(
    Spec,
    sender=st.sampled_from(SENDERS),
    escaped=st.booleans(),
    state_key=st.none() | st.sampled_from(["", ME, SPAM]),
    decoy=st.none() | st.sampled_from(SENDERS),
    content=st.integers(0, len(CONTENTS) - 1),
    thread=st.none() | st.sampled_from(SENDERS),
    junk=st.none() | st.none() | st.none() | st.integers(0, len(JUNK) - 1),
    spaced=st.booleans(),
    redactor=st.none() | st.sampled_from(SENDERS),
)
event_lists = st.lists(specs, max_size=6)


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def eid(self) -> str:
        self.n += 1
        return f"$e{self.n}"


def render_list(items: list[Spec], c: Counter) -> tuple[bytes, list[tuple[Spec, bytes]]]:
    rendered = [(s, s.render(c.eid())) for s in items]
    return b"[" + b",".join(r for _, r in rendered) + b"]", rendered


def check_list(body: bytes, out_list: Any, rendered: list[tuple[Spec, bytes]]) -> int:
    """Check one filtered list; return how many removals it accounts for."""
    kept = [(s, r) for s, r in rendered if not s.hidden]
    assert isinstance(out_list, list)
    assert len(out_list) == len(kept)
    for got, (spec, raw) in zip(out_list, kept, strict=True):
        assert got == spec.expected(raw)
        if not spec.fixes:
            assert raw in body  # byte-identical
    return sum(s.hidden for s, _ in rendered) + sum(s.fixes for s, _ in kept)


def result_body(original: bytes, out: Rewritten | None, removed: int) -> bytes:
    if removed == 0:
        assert out is None
        final = original
    else:
        assert out is not None
        assert out.removed == removed
        final = out.body
    assert guard_body(final, CTX) is None  # the last line of defence finds nothing left
    return final


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(
    join=st.lists(event_lists, max_size=3),
    leave=st.lists(event_lists, max_size=2),
    room_state=event_lists,
    sticky=event_lists,
)
def test_sync_property(
    join: list[list[Spec]], leave: list[list[Spec]], room_state: list[Spec], sticky: list[Spec]
) -> None:
    c = Counter()
    state_raw, state_rendered = render_list([s for s in room_state if s.state_key is not None], c)
    rooms: dict[str, list[bytes]] = {"join": [], "leave": []}
    lists: list[tuple[str, str, list[tuple[Spec, bytes]]]] = []
    sticky_lists: list[tuple[str, list[tuple[Spec, bytes]]]] = []
    for section, groups in (("join", join), ("leave", leave)):
        for i, items in enumerate(groups):
            raw, rendered = render_list(items, c)
            room_id = f"!{section}{i}:x"
            lists.append((section, room_id, rendered))
            sticky_part = b""
            if section == "join":
                sticky_raw, sticky_rendered = render_list(sticky, c)
                sticky_lists.append((room_id, sticky_rendered))
                sticky_part = b',"msc4354_sticky":{"events":' + sticky_raw + b"}"
            rooms[section].append(
                _enc(room_id)
                + b':{"timeline":{"events":'
                + raw
                + b',"limited":true,"prev_batch":"pb\\ud800"},"state":{"events":'
                + state_raw
                + b"}"
                + sticky_part
                + b"}"
            )
    body = (
        b'{"next_batch":"nb_1","rooms":{"join":{'
        + b",".join(rooms["join"])
        + b'},"leave":{'
        + b",".join(rooms["leave"])
        + b'}},"presence":{"events":[{"sender":"@spam:evil.example","type":"m.presence"}]}}'
    )
    out = rewrite_sync(body, CTX)
    expected_removed = 0
    parsed_out = json.loads(out.body) if out is not None else json.loads(body)
    state_kept_thread = sum(s.fixes for s, _ in state_rendered)
    for section, room_id, rendered in lists:
        room = parsed_out["rooms"][section][room_id]
        assert room["timeline"]["prev_batch"] == "pb\ud800"
        assert room["timeline"]["limited"] is True
        expected_removed += check_list(
            out.body if out else body, room["timeline"]["events"], rendered
        )
        check_list(out.body if out else body, room["state"]["events"], state_rendered)
        expected_removed += state_kept_thread
    for room_id, rendered in sticky_lists:
        events = parsed_out["rooms"]["join"][room_id]["msc4354_sticky"]["events"]
        expected_removed += check_list(out.body if out else body, events, rendered)
    # the ignored user's presence goes too
    result_body(body, out, expected_removed + 1)
    assert parsed_out["next_batch"] == "nb_1"
    assert parsed_out["presence"] == {"events": []}


def _simple(
    rewriter: Callable[[bytes, IgnoreContext], Rewritten | None],
    template: Callable[[bytes], bytes],
    getter: Callable[[Any], Any],
    items: list[Spec],
) -> Any:
    raw, rendered = render_list(items, Counter())
    body = template(raw)
    out = rewriter(body, CTX)
    final = out.body if out is not None else body
    parsed = json.loads(final)
    removed = check_list(final, getter(parsed), rendered)
    result_body(body, out, removed)
    return parsed


@SETTINGS
@given(items=event_lists)
def test_messages_property(items: list[Spec]) -> None:
    parsed = _simple(
        rewrite_messages,
        lambda raw: b'{"start":"s\\u0040","chunk":' + raw + b',"end":"e","state":[]}',
        lambda p: p["chunk"],
        items,
    )
    assert (parsed["start"], parsed["end"], parsed["state"]) == ("s@", "e", [])


@SETTINGS
@given(items=event_lists, parent=st.none() | specs)
def test_relations_property(items: list[Spec], parent: Spec | None) -> None:
    c = Counter()
    raw, rendered = render_list(items, c)
    parent_raw = parent.render(c.eid()) if parent is not None else None
    body = b'{"chunk":' + raw + b',"next_batch":"n","prev_batch":"p","recursion_depth":1'
    if parent_raw is not None:
        body += b',"original_event":' + parent_raw
    body += b"}"
    if parent is not None and parent.hidden:
        with pytest.raises(SenderIgnored) as info:
            rewrite_relations(body, CTX)
        assert info.value.sender == parent.sender
        return
    out = rewrite_relations(body, CTX)
    final = out.body if out is not None else body
    parsed = json.loads(final)
    removed = check_list(final, parsed["chunk"], rendered)
    if parent is not None and parent_raw is not None:
        removed += check_list(final, [parsed["original_event"]], [(parent, parent_raw)])
    result_body(body, out, removed)
    assert (parsed["next_batch"], parsed["prev_batch"], parsed["recursion_depth"]) == ("n", "p", 1)


@SETTINGS
@given(items=event_lists)
def test_event_relationships_property(items: list[Spec]) -> None:
    parsed = _simple(
        rewrite_event_relationships,
        lambda raw: b'{"events":' + raw + b',"next_batch":"n\\u0040","limited":true}',
        lambda p: p["events"],
        items,
    )
    assert (parsed["next_batch"], parsed["limited"]) == ("n@", True)


@SETTINGS
@given(items=event_lists)
def test_events_stream_property(items: list[Spec]) -> None:
    # generated events are m.room.message, so the invite rule never applies here
    parsed = _simple(
        rewrite_events_stream,
        lambda raw: b'{"chunk":' + raw + b',"start":"a","end":"b"}',
        lambda p: p["chunk"],
        items,
    )
    assert (parsed["start"], parsed["end"]) == ("a", "b")


@SETTINGS
@given(before=event_lists, after=event_lists)
def test_context_property(before: list[Spec], after: list[Spec]) -> None:
    c = Counter()
    raw_b, rend_b = render_list(before, c)
    raw_a, rend_a = render_list(after, c)
    target = b'{"sender":"@alice:example.org","type":"m.room.message","event_id":"$t","content":{}}'
    body = (
        b'{"event":'
        + target
        + b',"events_before":'
        + raw_b
        + b',"events_after":'
        + raw_a
        + b',"state":[{"sender":"@spam:evil.example","state_key":"","type":"m.room.name"}],'
        + b'"start":"s","end":"e"}'
    )
    out = rewrite_context(body, CTX)
    final = out.body if out is not None else body
    parsed = json.loads(final)
    removed = check_list(final, parsed["events_before"], rend_b)
    removed += check_list(final, parsed["events_after"], rend_a)
    result_body(body, out, removed)
    assert parsed["state"] == json.loads(body)["state"]
    assert target in final


@SETTINGS
@given(spec=specs)
def test_single_event_property(spec: Spec) -> None:
    raw = spec.render("$x")
    if spec.junk is not None:
        return
    if spec.hidden:
        with pytest.raises(SenderIgnored) as info:
            rewrite_single_event(raw, CTX)
        assert info.value.sender == spec.sender
        return
    out = rewrite_single_event(raw, CTX)
    check_list(out.body if out else raw, [json.loads(out.body if out else raw)], [(spec, raw)])
    result_body(raw, out, spec.fixes)


@SETTINGS
@given(items=st.lists(specs, max_size=5), contexts=st.lists(event_lists, min_size=5, max_size=5))
def test_search_property(items: list[Spec], contexts: list[list[Spec]]) -> None:
    c = Counter()
    results: list[bytes] = []
    expected: list[tuple[Spec, bytes, list[tuple[Spec, bytes]]]] = []
    removed = 0
    for spec, ctx_items in zip(items, contexts, strict=False):
        if spec.junk is not None:
            continue
        ev = spec.render(c.eid())
        raw_ctx, rend_ctx = render_list(ctx_items, c)
        result = (
            b'{"rank":1,"result":'
            + ev
            + b',"context":{"events_before":'
            + raw_ctx
            + b',"events_after":[]}}'
        )
        results.append(result)
        if spec.hidden:
            removed += 1
        else:
            expected.append((spec, ev, rend_ctx))
    body = (
        b'{"search_categories":{"room_events":{"count":9,"highlights":["x"],"next_batch":"nb",'
        b'"results":['
        + b",".join(results)
        + b'],"groups":{"sender":{"@spam:evil.example":{"order":1},'
        b'"@alice:example.org":{"order":2}}}}}}'
    )
    out = rewrite_search(body, CTX)
    final = out.body if out is not None else body
    parsed = json.loads(final)["search_categories"]["room_events"]
    assert len(parsed["results"]) == len(expected)
    for got, (spec, ev, rend_ctx) in zip(parsed["results"], expected, strict=True):
        removed += check_list(final, [got["result"]], [(spec, ev)])
        removed += check_list(final, got["context"]["events_before"], rend_ctx)
    removed += 1  # the ignored group entry
    assert out is not None and out.removed == removed
    assert (parsed["count"], parsed["next_batch"], parsed["highlights"]) == (9, "nb", ["x"])
    assert list(parsed["groups"]["sender"]) == [ALICE]


@SETTINGS
@given(items=event_lists)
def test_notifications_property(items: list[Spec]) -> None:
    c = Counter()
    rendered = [(s, s.render(c.eid())) for s in items if s.junk is None]
    body = (
        b'{"next_token":"nt","notifications":['
        + b",".join(b'{"actions":[],"read":true,"event":' + r + b"}" for _, r in rendered)
        + b"]}"
    )
    out = rewrite_notifications(body, CTX)
    final = out.body if out is not None else body
    parsed = json.loads(final)
    removed = check_list(final, [n["event"] for n in parsed["notifications"]], rendered)
    result_body(body, out, removed)
    assert parsed["next_token"] == "nt"


@SETTINGS
@given(items=event_lists)
def test_threads_property(items: list[Spec]) -> None:
    parsed = _simple(
        rewrite_threads,
        lambda raw: b'{"chunk":' + raw + b',"next_batch":"nb"}',
        lambda p: p["chunk"],
        items,
    )
    assert parsed["next_batch"] == "nb"


@SETTINGS
@given(rooms=st.lists(event_lists, max_size=3))
def test_initial_sync_property(rooms: list[list[Spec]]) -> None:
    c = Counter()
    parts, rendered_all = [], []
    for i, items in enumerate(rooms):
        raw, rendered = render_list(items, c)
        rendered_all.append(rendered)
        parts.append(
            b'{"room_id":"!r'
            + str(i).encode()
            + b':x","membership":"join","messages":{"chunk":'
            + raw
            + b',"start":"s","end":"e"},"state":[]}'
        )
    body = b'{"rooms":[' + b",".join(parts) + b'],"presence":[],"end":"x"}'
    out = rewrite_initial_sync(body, CTX)
    final = out.body if out is not None else body
    parsed = json.loads(final)
    removed = 0
    for room, rendered in zip(parsed["rooms"], rendered_all, strict=True):
        removed += check_list(final, room["messages"]["chunk"], rendered)
        assert (room["messages"]["start"], room["messages"]["end"]) == ("s", "e")
    result_body(body, out, removed)


@SETTINGS
@given(items=event_lists)
def test_room_initial_sync_property(items: list[Spec]) -> None:
    _simple(
        rewrite_room_initial_sync,
        lambda raw: (
            b'{"room_id":"!r:x","messages":{"chunk":' + raw + b',"start":"s","end":"e"},"state":[]}'
        ),
        lambda p: p["messages"]["chunk"],
        items,
    )


@SETTINGS
@given(rooms=st.lists(event_lists, max_size=3), num_live=st.integers(0, 7), sticky=event_lists)
def test_sliding_sync_property(rooms: list[list[Spec]], num_live: int, sticky: list[Spec]) -> None:
    c = Counter()
    parts, rendered_all = [], []
    for i, items in enumerate(rooms):
        raw, rendered = render_list(items, c)
        rendered_all.append(rendered)
        parts.append(
            b'"!r'
            + str(i).encode()
            + b':x":{"timeline":'
            + raw
            + b',"num_live":'
            + str(num_live).encode()
            + b',"prev_batch":"pb","required_state":[]}'
        )
    sticky_raw, sticky_rendered = render_list(sticky, c)
    body = (
        b'{"pos":"p","rooms":{'
        + b",".join(parts)
        + b'},"extensions":{"org.matrix.msc4354.sticky_events":{"next_batch":"sb","rooms":'
        + b'{"!r0:x":{"events":'
        + sticky_raw
        + b"}}}}}"
    )
    out = rewrite_sliding_sync(body, CTX)
    final = out.body if out is not None else body
    parsed = json.loads(final)
    removed = 0
    for i, rendered in enumerate(rendered_all):
        room = parsed["rooms"][f"!r{i}:x"]
        removed += check_list(final, room["timeline"], rendered)
        live = rendered[-num_live:] if num_live else []
        assert room["num_live"] == num_live - sum(s.hidden for s, _ in live)
        assert room["prev_batch"] == "pb"
    extension = parsed["extensions"]["org.matrix.msc4354.sticky_events"]
    removed += check_list(final, extension["rooms"]["!r0:x"]["events"], sticky_rendered)
    assert extension["next_batch"] == "sb"
    result_body(body, out, removed)
    assert parsed["pos"] == "p"
