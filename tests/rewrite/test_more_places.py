"""Events hidden in less obvious places: ``original_event`` of ``/relations``,
``unsigned.redacted_because``, ``/threads`` roots, MSC4354 sticky events, sliding sync
``stripped_state``, MSC2836 ``/event_relationships``."""

from __future__ import annotations

from typing import Any

import pytest

from ignore_proxy.rewrite import (
    IgnoreContext,
    SenderIgnored,
    guard_body,
    rewrite_context,
    rewrite_event_relationships,
    rewrite_messages,
    rewrite_notifications,
    rewrite_relations,
    rewrite_search,
    rewrite_single_event,
    rewrite_sliding_sync,
    rewrite_sync,
    rewrite_threads,
)
from ignore_proxy.rewrite.events import redaction_stub
from ignore_proxy.rewrite.raw import Raw, render
from tests.rewrite.factories import (
    ALICE,
    BOB,
    CTX,
    IGNORED,
    ME,
    SPAM,
    TROLL,
    dumps,
    event,
    ids,
    loads,
    state,
    sync_body,
    thread_unsigned,
)

# --- /relations: original_event ----------------------------------------------------------


@pytest.mark.parametrize("spaced", [False, True])
def test_relations_original_event_of_ignored_sender(spaced: bool) -> None:
    body = dumps({"chunk": [event(ALICE)], "original_event": event(SPAM), "next_batch": "n"})
    if spaced:  # not compact: the level-by-level path
        body = body.replace(b'"chunk":', b'"chunk": ', 1)
    with pytest.raises(SenderIgnored) as info:
        rewrite_relations(body, CTX)
    assert info.value.sender == SPAM


def test_relations_original_event_state_or_unignored_is_kept() -> None:
    for parent in (state(SPAM), event(ALICE)):
        body_obj = {"chunk": [event(SPAM), event(ALICE)], "original_event": parent}
        out = rewrite_relations(dumps(body_obj), CTX)
        assert out is not None and out.removed == 1
        assert loads(out.body)["original_event"] == parent


@pytest.mark.parametrize("spaced", [False, True])
def test_relations_original_event_thread_summary_fixed(spaced: bool) -> None:
    parent = event(ALICE, unsigned=thread_unsigned(SPAM))
    body = dumps({"chunk": [], "original_event": parent, "next_batch": "n"})
    if spaced:
        body = body.replace(b'"chunk":', b'"chunk": ', 1)
    out = rewrite_relations(body, CTX)
    assert out is not None and out.removed == 1
    assert loads(out.body) == {
        "chunk": [],
        "original_event": {**parent, "unsigned": {"age": 1234}},
        "next_batch": "n",
    }


# --- unsigned.redacted_because -----------------------------------------------------------


def _redaction(sender: str, redacts: str = "$target") -> dict[str, Any]:
    return event(
        sender,
        type="m.room.redaction",
        content={"reason": "the words of " + sender, "redacts": redacts},
        redacts=redacts,
        unsigned={"age": 3, "transaction_id": "t"},
    )


def _redacted(sender: str, redactor: str, **kw: Any) -> dict[str, Any]:
    return event(sender, content={}, unsigned={"redacted_because": _redaction(redactor)}, **kw)


def _stub(redaction: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "m.room.redaction",
        "sender": redaction["sender"],
        "event_id": redaction["event_id"],
        "room_id": redaction["room_id"],
        "origin_server_ts": redaction["origin_server_ts"],
        "content": {"redacts": redaction["content"]["redacts"]},
        "redacts": redaction["redacts"],
    }


def _stubbed(ev: dict[str, Any]) -> dict[str, Any]:
    return {**ev, "unsigned": {"redacted_because": _stub(ev["unsigned"]["redacted_because"])}}


@pytest.mark.parametrize("spaced", [False, True])
def test_messages_redacted_because_stubbed(spaced: bool) -> None:
    by_spam, by_bob = _redacted(ALICE, SPAM), _redacted(ALICE, BOB)
    state_by_troll = {**state(ALICE), "unsigned": {"redacted_because": _redaction(TROLL)}}
    body = dumps({"chunk": [by_spam, by_bob, state_by_troll], "start": "s", "state": []})
    if spaced:
        body = body.replace(b'"start":', b'"start": ', 1)
    out = rewrite_messages(body, CTX)
    assert out is not None and out.removed == 2
    parsed = loads(out.body)
    assert parsed["chunk"] == [_stubbed(by_spam), by_bob, _stubbed(state_by_troll)]
    assert b"the words of" + SPAM.encode() not in out.body
    assert dumps(by_bob) in out.body  # untouched, byte for byte


@pytest.mark.parametrize("spaced", [False, True])
def test_sync_redacted_because_in_timeline_and_state(spaced: bool) -> None:
    in_timeline = _redacted(ALICE, SPAM)
    in_state = {**state(BOB), "unsigned": {"redacted_because": _redaction(TROLL)}}
    body = dumps(sync_body({"!a:x": [in_timeline, event(SPAM)]}, room_state={"!a:x": [in_state]}))
    if spaced:
        body = body.replace(b'"join":', b'"join": ', 1)
    out = rewrite_sync(body, CTX)
    assert out is not None and out.removed == 3
    room = loads(out.body)["rooms"]["join"]["!a:x"]
    assert room["timeline"]["events"] == [_stubbed(in_timeline)]
    assert room["state"]["events"] == [_stubbed(in_state)]


def test_redacted_because_in_thread_summary_latest_event() -> None:
    unsigned = thread_unsigned(ALICE)
    latest = unsigned["m.relations"]["m.thread"]["latest_event"]
    latest["unsigned"] = {"redacted_because": _redaction(SPAM)}
    root = event(BOB, unsigned=unsigned)
    out = rewrite_single_event(dumps(root), CTX)
    assert out is not None and out.removed == 1
    got = loads(out.body)["unsigned"]["m.relations"]["m.thread"]["latest_event"]
    assert got == _stubbed(latest)


def test_redacted_because_in_replacement_summary() -> None:
    latest = _redacted(ALICE, SPAM)
    summary = {"latest_event": latest, "count": 1, "current_user_participated": False}
    root = event(BOB, unsigned=thread_unsigned(TROLL))
    ctx = IgnoreContext(IGNORED, ME, thread_summaries={root["event_id"]: dumps(summary)})
    out = rewrite_single_event(dumps(root), ctx)
    assert out is not None and out.removed == 2
    got = loads(out.body)["unsigned"]["m.relations"]["m.thread"]
    assert got == {**summary, "latest_event": _stubbed(latest)}


def test_redacted_because_everywhere_else() -> None:
    ev = _redacted(ALICE, SPAM)
    expected = _stubbed(ev)
    out = rewrite_context(dumps({"event": ev, "events_before": [ev], "events_after": []}), CTX)
    assert out is not None and out.removed == 2
    assert loads(out.body)["event"] == loads(out.body)["events_before"][0] == expected
    out = rewrite_relations(dumps({"chunk": [ev], "original_event": ev}), CTX)
    assert out is not None and loads(out.body) == {"chunk": [expected], "original_event": expected}
    result = {"rank": 1, "result": ev, "context": {"events_before": [ev], "events_after": []}}
    search = {"search_categories": {"room_events": {"results": [result], "count": 1}}}
    out = rewrite_search(dumps(search), CTX)
    assert out is not None
    got = loads(out.body)["search_categories"]["room_events"]["results"][0]
    assert got["result"] == got["context"]["events_before"][0] == expected
    out = rewrite_notifications(dumps({"notifications": [{"event": ev, "read": True}]}), CTX)
    assert out is not None and loads(out.body)["notifications"][0]["event"] == expected
    out = rewrite_threads(dumps({"chunk": [ev]}), CTX)
    assert out is not None and loads(out.body)["chunk"] == [expected]
    sliding = {"pos": "p", "rooms": {"!r:x": {"timeline": [ev], "required_state": [ev]}}}
    out = rewrite_sliding_sync(dumps(sliding), CTX)
    assert out is not None
    room = loads(out.body)["rooms"]["!r:x"]
    assert room["timeline"] == room["required_state"] == [expected]


def test_redaction_stub_shapes() -> None:
    old_style = {"type": "m.room.redaction", "sender": SPAM, "event_id": "$r", "redacts": "$t",
                 "origin_server_ts": 1, "content": {"reason": "why"}}  # fmt: skip
    stub = redaction_stub(Raw(dumps(old_style)))
    assert stub is not None
    stub_obj = loads(render(stub))
    assert stub_obj == {**old_style, "content": {}}
    assert redaction_stub(Raw(render(stub))) is None  # a stub already: unchanged
    no_content = {k: v for k, v in old_style.items() if k != "content"}
    assert loads(render(redaction_stub(Raw(dumps(no_content))) or Raw(b"0")))["content"] == {}
    weird = {**old_style, "content": "a string"}
    assert loads(render(redaction_stub(Raw(dumps(weird))) or Raw(b"0")))["content"] == {}
    assert redaction_stub(Raw(b"[]")) is None


def test_redaction_by_unignored_or_of_ignored_event() -> None:
    assert rewrite_messages(dumps({"chunk": [_redacted(ALICE, BOB)]}), CTX) is None
    out = rewrite_messages(dumps({"chunk": [_redacted(SPAM, SPAM), event(ALICE)]}), CTX)
    assert out is not None and out.removed == 1
    assert len(ids(loads(out.body)["chunk"])) == 1


# --- MSC4354 sticky events ---------------------------------------------------------------


@pytest.mark.parametrize("key", ["msc4354_sticky", "sticky"])
@pytest.mark.parametrize("spaced", [False, True])
def test_sync_sticky_events(key: str, spaced: bool) -> None:
    keep, drop, st = event(ALICE), event(SPAM), state(TROLL)
    body_obj = sync_body({"!a:x": [event(BOB)]})
    body_obj["rooms"]["join"]["!a:x"][key] = {"events": [drop, keep, st]}
    body = dumps(body_obj)
    if spaced:
        body = body.replace(b'"join":', b'"join": ', 1)
    out = rewrite_sync(body, CTX)
    assert out is not None and out.removed == 1
    assert loads(out.body)["rooms"]["join"]["!a:x"][key] == {"events": [keep, st]}


@pytest.mark.parametrize("ephemeral", [True, False])
def test_sliding_sync_sticky_extension(ephemeral: bool) -> None:
    keep, drop = event(ALICE, unsigned=thread_unsigned(TROLL)), event(SPAM)
    del keep["room_id"]  # as sliding sync sends events: the stale thread is named by the key
    ext: dict[str, Any] = {
        "org.matrix.msc4354.sticky_events": {
            "next_batch": "s1",
            "rooms": {"!a:x": {"events": [drop, keep]}, "!b:x": {"events": [event(BOB)]}},
        }
    }
    ctx = IgnoreContext(IGNORED, ME, filter_ephemeral=ephemeral)
    out = rewrite_sliding_sync(dumps({"pos": "p", "extensions": ext}), ctx)
    assert out is not None and out.removed == 2
    got = loads(out.body)["extensions"]["org.matrix.msc4354.sticky_events"]
    assert got["next_batch"] == "s1"
    assert got["rooms"]["!a:x"] == {"events": [{**keep, "unsigned": {"age": 1234}}]}
    assert got["rooms"]["!b:x"] == ext["org.matrix.msc4354.sticky_events"]["rooms"]["!b:x"]
    assert [(t.room_id, t.root_id) for t in out.stale_threads] == [("!a:x", keep["event_id"])]


# --- sliding sync stripped_state ---------------------------------------------------------


def _stripped(*members: tuple[str, str]) -> list[dict[str, Any]]:
    """Stripped state: a room name, then ``(sender, membership)`` events of the user."""
    name = {"type": "m.room.name", "sender": ALICE, "state_key": "", "content": {"name": "R"}}
    return [name] + [
        {"type": "m.room.member", "sender": sender, "state_key": ME,
         "content": {"membership": membership}}
        for sender, membership in members
    ]  # fmt: skip


def test_sliding_stripped_state_only_invites_by_ignored_users_dropped() -> None:
    rooms = {
        "!invite:x": {"stripped_state": _stripped((SPAM, "invite"), (SPAM, "invite"))},
        "!old:x": {"invite_state": _stripped((TROLL, "invite"))},
        "!knock:x": {"stripped_state": _stripped((SPAM, "invite"), (ME, "knock"))},
        "!rejected:x": {"stripped_state": _stripped((SPAM, "invite"), (ME, "leave"))},
        "!alice:x": {"stripped_state": _stripped((ALICE, "invite"))},
        "!other:x": {"stripped_state": [*_stripped((ME, "knock")), state(SPAM)]},
    }
    out = rewrite_sliding_sync(dumps({"pos": "p", "rooms": rooms}), CTX)
    assert out is not None and out.removed == 2
    assert set(out.hidden_invites) == {"!invite:x", "!old:x"}
    kept = loads(out.body)["rooms"]
    assert list(kept) == ["!knock:x", "!rejected:x", "!alice:x", "!other:x"]
    assert kept == {k: v for k, v in rooms.items() if k in kept}


# --- MSC2836 /event_relationships (Dendrite) ---------------------------------------------


@pytest.mark.parametrize("spaced", [False, True])
def test_event_relationships(spaced: bool) -> None:
    keep, drop, st = event(ALICE), event(SPAM), state(TROLL)
    redacted = _redacted(BOB, TROLL)
    body_obj = {"events": [keep, drop, st, redacted], "next_batch": "nb", "limited": True}
    body = dumps(body_obj)
    if spaced:
        body = body.replace(b'"events":', b'"events": ', 1)
    out = rewrite_event_relationships(body, CTX)
    assert out is not None and out.removed == 2
    assert loads(out.body) == {**body_obj, "events": [keep, st, _stubbed(redacted)]}
    assert rewrite_event_relationships(dumps({"events": [keep], "limited": False}), CTX) is None


@pytest.mark.parametrize("spaced", [False, True])
def test_a_top_level_redacted_because_is_stubbed_too(spaced: bool) -> None:
    """Synapse copies `redacted_because` to the redacted event's top level as well."""
    redaction = _redaction(SPAM)
    by_spam = {**event(ALICE, content={}), "redacted_because": redaction,
               "unsigned": {"redacted_because": redaction}}  # fmt: skip
    body = dumps({"chunk": [by_spam], "start": "s"})
    if spaced:
        body = body.replace(b'"start":', b'"start": ', 1)
    for out in (
        rewrite_messages(body, CTX),
        rewrite_sync(dumps(sync_body({"!a:x": [by_spam]})), CTX),
    ):
        assert out is not None
        assert b"the words of" not in out.body
        assert guard_body(out.body, CTX) is None  # nothing left for the guard
