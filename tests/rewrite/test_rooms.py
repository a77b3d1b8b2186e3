from __future__ import annotations

from typing import Any

import pytest

from ignore_proxy.rewrite import (
    InvalidBody,
    SenderIgnored,
    rewrite_context,
    rewrite_events_stream,
    rewrite_initial_sync,
    rewrite_messages,
    rewrite_relations,
    rewrite_room_initial_sync,
    rewrite_single_event,
    rewrite_threads,
)
from tests.rewrite.factories import (
    ALICE,
    BOB,
    CTX,
    CTX_NO_EPHEMERAL,
    ME,
    SPAM,
    TROLL,
    dumps,
    event,
    ids,
    loads,
    member,
    receipt,
    state,
    thread_unsigned,
    typing,
)

# --- /messages ---------------------------------------------------------------------------


def test_messages_filters_chunk_keeps_state_and_tokens() -> None:
    keep, drop, st = event(ALICE), event(SPAM), state(SPAM)
    room_state = [member(SPAM, SPAM, "join")]
    body = dumps({"chunk": [keep, drop, st], "start": "t1", "end": "t2", "state": room_state})
    out = rewrite_messages(body, CTX)
    assert out is not None and out.removed == 1
    parsed = loads(out.body)
    assert ids(parsed["chunk"]) == ids([keep, st])
    assert (parsed["start"], parsed["end"], parsed["state"]) == ("t1", "t2", room_state)


def test_messages_keeps_tokens_when_chunk_ends_up_empty() -> None:
    body = dumps({"chunk": [event(SPAM), event(TROLL)], "start": "t1", "end": "t2"})
    out = rewrite_messages(body, CTX)
    assert out is not None and out.removed == 2
    assert loads(out.body) == {"chunk": [], "start": "t1", "end": "t2"}


def test_messages_nothing_to_do() -> None:
    assert rewrite_messages(dumps({"chunk": [event(ALICE)], "start": "a"}), CTX) is None
    assert rewrite_messages(dumps({"chunk": "x", "start": SPAM}), CTX) is None
    with pytest.raises(InvalidBody):
        rewrite_messages(b"[1]", CTX)


# --- /context ----------------------------------------------------------------------------


def _context(target: dict[str, Any]) -> dict[str, Any]:
    return {
        "event": target,
        "events_before": [event(SPAM), event(ALICE)],
        "events_after": [event(BOB), event(TROLL), state(TROLL)],
        "state": [state(SPAM)],
        "start": "s",
        "end": "e",
    }


def test_context_of_ignored_event_raises_sender_ignored() -> None:
    with pytest.raises(SenderIgnored) as info:
        rewrite_context(dumps(_context(event(SPAM))), CTX)
    assert info.value.sender == SPAM


def test_context_filters_around_events() -> None:
    body_obj = _context(event(ALICE))
    out = rewrite_context(dumps(body_obj), CTX)
    assert out is not None and out.removed == 2
    parsed = loads(out.body)
    assert ids(parsed["events_before"]) == ids(body_obj["events_before"][1:])
    assert ids(parsed["events_after"]) == ids(
        [body_obj["events_after"][0], body_obj["events_after"][2]]
    )
    for key in ("event", "state", "start", "end"):
        assert parsed[key] == body_obj[key]


def test_context_of_ignored_state_event_is_served() -> None:
    body_obj = _context(state(SPAM))
    out = rewrite_context(dumps(body_obj), CTX)
    assert out is not None
    assert loads(out.body)["event"] == body_obj["event"]


def test_context_fixes_thread_summary_of_target() -> None:
    target = event(ALICE, unsigned=thread_unsigned(SPAM))
    out = rewrite_context(dumps({"event": target, "events_before": [], "events_after": []}), CTX)
    assert out is not None and out.removed == 1
    assert loads(out.body)["event"]["unsigned"] == {"age": 1234}


# --- single event ------------------------------------------------------------------------


def test_single_event() -> None:
    with pytest.raises(SenderIgnored) as info:
        rewrite_single_event(dumps(event(TROLL)), CTX)
    assert info.value.sender == TROLL
    assert rewrite_single_event(dumps(event(ALICE)), CTX) is None
    assert rewrite_single_event(dumps(state(SPAM)), CTX) is None
    assert rewrite_single_event(dumps(event(ALICE, content={"body": SPAM})), CTX) is None
    with pytest.raises(InvalidBody):
        rewrite_single_event(b'["@spam:evil.example"]', CTX)


def test_single_event_with_lone_surrogate() -> None:
    body = b'{"sender":"@spam:evil.example","type":"m.room.message","content":{"body":"\\udc00"}}'
    with pytest.raises(SenderIgnored):
        rewrite_single_event(body, CTX)


def test_single_event_thread_summary() -> None:
    ev = event(ALICE, unsigned=thread_unsigned(SPAM))
    out = rewrite_single_event(dumps(ev), CTX)
    assert out is not None and out.removed == 1
    assert loads(out.body) == {**ev, "unsigned": {"age": 1234}}


# --- /relations --------------------------------------------------------------------------


def test_relations() -> None:
    keep, drop = event(ALICE), event(SPAM)
    body_obj = {"chunk": [drop, keep], "next_batch": "n", "prev_batch": "p", "recursion_depth": 3}
    out = rewrite_relations(dumps(body_obj), CTX)
    assert out is not None and out.removed == 1
    assert loads(out.body) == {**body_obj, "chunk": [keep]}


# --- /threads ----------------------------------------------------------------------------


def test_threads_drops_ignored_roots() -> None:
    root = event(
        SPAM, content={"msgtype": "m.text", "body": "spam!"}, unsigned=thread_unsigned(ALICE)
    )
    # the redaction algorithm would keep "join_rule": their text
    planted = event(TROLL, type="m.room.join_rules", content={"join_rule": "buy now"})
    state_root = state(SPAM)
    fine = event(ALICE, unsigned=thread_unsigned(BOB))
    body = dumps({"chunk": [root, planted, state_root, fine], "next_batch": "nb"})
    out = rewrite_threads(body, CTX)
    assert out is not None and out.removed == 2
    assert loads(out.body) == {"chunk": [state_root, fine], "next_batch": "nb"}
    assert b"buy now" not in out.body and b"spam!" not in out.body


def test_threads_ignored_latest_reply() -> None:
    root = event(SPAM, unsigned=thread_unsigned(TROLL))
    other = event(ALICE, unsigned=thread_unsigned(SPAM))
    out = rewrite_threads(dumps({"chunk": [root, other]}), CTX)
    assert out is not None and out.removed == 2
    (fixed,) = loads(out.body)["chunk"]
    assert fixed["unsigned"] == {"age": 1234}
    assert [t.root_id for t in out.stale_threads] == [other["event_id"]]


# --- /events (legacy stream) -------------------------------------------------------------


def test_events_stream() -> None:
    keep, drop, st = event(ALICE), event(SPAM), state(SPAM)
    bad_invite, good_invite = member(SPAM, ME, "invite"), member(ALICE, ME, "invite")
    other_invite = member(SPAM, BOB, "invite")
    chunk = [keep, drop, st, bad_invite, good_invite, other_invite, typing(SPAM, ALICE)]
    out = rewrite_events_stream(dumps({"chunk": chunk, "start": "a", "end": "b"}), CTX)
    assert out is not None and out.removed == 3
    parsed = loads(out.body)
    assert parsed["chunk"] == [keep, st, good_invite, other_invite, typing(ALICE)]
    assert (parsed["start"], parsed["end"]) == ("a", "b")
    out = rewrite_events_stream(dumps({"chunk": [typing(SPAM), receipt({})]}), CTX_NO_EPHEMERAL)
    assert out is None


# --- /initialSync ------------------------------------------------------------------------


def test_initial_sync() -> None:
    keep, drop = event(ALICE), event(SPAM)
    joined = {
        "room_id": "!j:x",
        "membership": "join",
        "messages": {"chunk": [keep, drop], "start": "s", "end": "e"},
        "state": [state(SPAM)],
    }
    invited_by_inviter = {"room_id": "!i1:x", "membership": "invite", "inviter": SPAM}
    invited_by_event = {
        "room_id": "!i2:x",
        "membership": "invite",
        "invite": member(TROLL, ME, "invite"),
    }
    invited_in_state = {
        "room_id": "!i3:x",
        "membership": "invite",
        "state": [member(SPAM, ME, "invite")],
    }
    invited_ok = {
        "room_id": "!i4:x",
        "membership": "invite",
        "inviter": ALICE,
        "invite": member(ALICE, ME, "invite"),
        "state": [state(SPAM)],
    }
    left = {"room_id": "!l:x", "membership": "leave", "inviter": SPAM}
    body_obj = {
        "rooms": [joined, invited_by_inviter, invited_by_event, invited_in_state, invited_ok, left],
        "presence": [{"type": "m.presence", "sender": SPAM, "content": {}}],
        "account_data": [],
        "end": "x",
    }
    out = rewrite_initial_sync(dumps(body_obj), CTX)
    assert out is not None and out.removed == 5
    parsed = loads(out.body)
    assert [r["room_id"] for r in parsed["rooms"]] == ["!j:x", "!i4:x", "!l:x"]
    assert parsed["rooms"][0]["messages"] == {"chunk": [keep], "start": "s", "end": "e"}
    assert parsed["rooms"][0]["state"] == joined["state"]
    assert parsed["presence"] == []  # an ignored user's presence is dropped
    assert parsed["rooms"][1] == invited_ok


def test_room_initial_sync() -> None:
    keep, drop = event(ALICE), event(SPAM)
    body_obj = {
        "room_id": "!j:x",
        "membership": "join",
        "messages": {"chunk": [keep, drop], "start": "s", "end": "e"},
        "state": [state(SPAM)],
        "presence": [],
    }
    out = rewrite_room_initial_sync(dumps(body_obj), CTX)
    assert out is not None and out.removed == 1
    assert loads(out.body) == {**body_obj, "messages": {"chunk": [keep], "start": "s", "end": "e"}}
