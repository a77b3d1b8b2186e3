"""Endpoints other than sync, through the proxy (plain and behind nginx), in front of
stock Synapse and of Synapse without ignore support."""

from __future__ import annotations

import time
import uuid

import pytest

from .conftest import World
from .harness.expect import assert_hidden_by_stock_synapse, assert_sender_ignored
from .harness.matrix import CS, JSON, event_ids, non_state, q, senders

pytestmark = pytest.mark.e2e

V1 = "/_matrix/client/v1"


def thread_reply(root: str) -> JSON:
    return {
        "m.relates_to": {
            "rel_type": "m.thread",
            "event_id": root,
            "is_falling_back": True,
            "m.in_reply_to": {"event_id": root},
        }
    }


def reaction(target: str, key: str) -> JSON:
    return {"m.relates_to": {"rel_type": "m.annotation", "event_id": target, "key": key}}


async def test_versions_advertises_msc4406(world: World) -> None:
    body = await world.alice.get_json("/_matrix/client/versions")
    assert body["unstable_features"].get("uk.timedout.msc4406") is True, body
    assert body["versions"], body


async def test_single_event_fetch(world: World) -> None:
    w = world
    bob_msg = await w.bob.send_text(w.room_id, "bob")
    bob_state = await w.bob.put_state(w.room_id, "m.room.topic", {"topic": "bob's topic"})
    charlie_msg = await w.charlie.send_text(w.room_id, "charlie")
    room = q(w.room_id)

    for path, synapse_status in (
        (f"{CS}/rooms/{room}/event/{q(bob_msg)}", 404),
        # The legacy endpoint: stock Synapse answers 403 M_FORBIDDEN there.
        (f"{CS}/events/{q(bob_msg)}", 403),
    ):
        resp = await w.alice.request("GET", path)
        if w.target.filtering_upstream:
            assert_hidden_by_stock_synapse(resp, w.bob.user_id, {synapse_status})
        else:
            assert_sender_ignored(resp, w.bob.user_id)

    # State events of ignored users are not hidden.
    got = await w.alice.get_json(f"{CS}/rooms/{room}/event/{q(bob_state)}")
    assert got["event_id"] == bob_state
    got = await w.alice.get_json(f"{CS}/rooms/{room}/event/{q(charlie_msg)}")
    assert got["event_id"] == charlie_msg
    # Bob's message is there for charlie.
    got = await w.charlie.get_json(f"{CS}/rooms/{room}/event/{q(bob_msg)}")
    assert got["sender"] == w.bob.user_id


async def test_messages(world: World) -> None:
    w = world
    b1 = await w.bob.send_text(w.room_id, "bob 1")
    c1 = await w.charlie.send_text(w.room_id, "charlie 1")
    b2 = await w.bob.send_text(w.room_id, "bob 2")
    c2 = await w.charlie.send_text(w.room_id, "charlie 2")
    b3 = await w.bob.send_text(w.room_id, "bob 3, the latest")
    path = f"{CS}/rooms/{q(w.room_id)}/messages"

    body = await w.alice.get_json(path, params={"dir": "b", "limit": "100"})
    chunk = body["chunk"]
    assert {c1, c2} <= event_ids(chunk)
    assert not {b1, b2, b3} & event_ids(chunk)
    assert w.bob.user_id not in senders(non_state(chunk))
    # Bob's state events (he created the room) stay.
    assert any(e["type"] == "m.room.create" for e in chunk)
    assert "start" in body

    # A page holding only bob's latest message: filtered empty, still paginable.
    body = await w.alice.get_json(path, params={"dir": "b", "limit": "1"})
    assert b3 not in event_ids(body["chunk"])
    assert "start" in body
    if "end" in body:
        more = await w.alice.get_json(
            path, params={"dir": "b", "limit": "100", "from": body["end"]}
        )
        assert c2 in event_ids(more["chunk"]) | event_ids(body["chunk"])
        assert not {b1, b2, b3} & event_ids(more["chunk"])

    charlie_chunk = (await w.charlie.get_json(path, params={"dir": "b", "limit": "100"}))["chunk"]
    assert {b1, b2, b3, c1, c2} <= event_ids(charlie_chunk)


async def test_context(world: World) -> None:
    w = world
    b1 = await w.bob.send_text(w.room_id, "bob before")
    c1 = await w.charlie.send_text(w.room_id, "charlie in the middle")
    b2 = await w.bob.send_text(w.room_id, "bob after")
    c2 = await w.charlie.send_text(w.room_id, "charlie after")
    room = q(w.room_id)

    body = await w.alice.get_json(f"{CS}/rooms/{room}/context/{q(c1)}", params={"limit": "10"})
    assert body["event"]["event_id"] == c1
    around = body.get("events_before", []) + body.get("events_after", [])
    assert c2 in event_ids(around)
    assert not {b1, b2} & event_ids(around)
    assert w.bob.user_id not in senders(non_state(around))

    resp = await w.alice.request("GET", f"{CS}/rooms/{room}/context/{q(b1)}")
    if w.target.filtering_upstream:
        # Stock Synapse: 403 M_FORBIDDEN of its own, without the sender.
        assert_hidden_by_stock_synapse(resp, w.bob.user_id, {403})
    else:
        assert_sender_ignored(resp, w.bob.user_id)

    # Charlie sees bob's event and its context.
    body = await w.charlie.get_json(f"{CS}/rooms/{room}/context/{q(b1)}")
    assert body["event"]["event_id"] == b1


async def test_relations(world: World) -> None:
    w = world
    bob_parent = await w.bob.send_text(w.room_id, "bob's parent")
    await w.charlie.send_event(w.room_id, "m.reaction", reaction(bob_parent, "c"))
    charlie_parent = await w.charlie.send_text(w.room_id, "charlie's parent")
    bob_reaction = await w.bob.send_event(w.room_id, "m.reaction", reaction(charlie_parent, "b"))
    charlie_reaction = await w.charlie.send_event(
        w.room_id, "m.reaction", reaction(charlie_parent, "c")
    )
    room = q(w.room_id)

    for suffix in ("", "/m.annotation", "/m.annotation/m.reaction"):
        resp = await w.alice.request("GET", f"{V1}/rooms/{room}/relations/{q(bob_parent)}{suffix}")
        if w.target.filtering_upstream:
            # Stock Synapse: 403 M_FORBIDDEN of its own, without the sender.
            assert_hidden_by_stock_synapse(resp, w.bob.user_id, {403})
        else:
            assert_sender_ignored(resp, w.bob.user_id)

        body = await w.alice.get_json(f"{V1}/rooms/{room}/relations/{q(charlie_parent)}{suffix}")
        assert charlie_reaction in event_ids(body["chunk"])
        assert bob_reaction not in event_ids(body["chunk"])

    body = await w.charlie.get_json(f"{V1}/rooms/{room}/relations/{q(charlie_parent)}")
    assert {bob_reaction, charlie_reaction} <= event_ids(body["chunk"])


async def _two_threads(w: World) -> tuple[str, str, str, str]:
    """bob's thread (charlie replied) and charlie's thread (charlie, then bob replied)."""
    bob_root = await w.bob.send_text(w.room_id, "bob's thread root")
    await w.charlie.send_event(
        w.room_id,
        "m.room.message",
        {"msgtype": "m.text", "body": "charlie in bob's thread", **thread_reply(bob_root)},
    )
    charlie_root = await w.charlie.send_text(w.room_id, "charlie's thread root")
    charlie_reply = await w.charlie.send_event(
        w.room_id,
        "m.room.message",
        {"msgtype": "m.text", "body": "charlie in own thread", **thread_reply(charlie_root)},
    )
    bob_reply = await w.bob.send_event(
        w.room_id,
        "m.room.message",
        {"msgtype": "m.text", "body": "bob in charlie's thread", **thread_reply(charlie_root)},
    )
    return bob_root, charlie_root, charlie_reply, bob_reply


def _thread_summary(event: JSON) -> JSON | None:
    summary: JSON | None = event.get("unsigned", {}).get("m.relations", {}).get("m.thread")
    return summary


async def test_threads(world: World) -> None:
    w = world
    bob_root, charlie_root, _, bob_reply = await _two_threads(w)
    room = q(w.room_id)

    body = await w.alice.get_json(f"{V1}/rooms/{room}/threads", params={"include": "all"})
    roots = {e["event_id"]: e for e in body["chunk"]}
    assert charlie_root in roots
    # The ignored user's thread root: dropped (Synapse) or redacted (the spec's wording).
    if bob_root in roots:
        assert not roots[bob_root].get("content"), roots[bob_root]
    assert bob_reply not in roots
    summary = _thread_summary(roots[charlie_root])
    if summary is not None:
        assert summary["latest_event"]["sender"] != w.bob.user_id, summary

    # Charlie sees both threads, bob's reply as the latest.
    body = await w.charlie.get_json(f"{V1}/rooms/{room}/threads")
    roots = {e["event_id"]: e for e in body["chunk"]}
    assert {bob_root, charlie_root} <= set(roots)
    latest = roots[charlie_root]["unsigned"]["m.relations"]["m.thread"]["latest_event"]
    assert latest["event_id"] == bob_reply


async def test_bundled_thread_summary_points_at_latest_unignored_reply(world: World) -> None:
    """Spec, threading module: ``latest_event`` is the latest event not from an ignored
    user, and ``count`` does not count them. Dropping the summary is not enough: the
    thread would vanish from the client although it has a visible reply."""
    w = world
    _, charlie_root, charlie_reply, _ = await _two_threads(w)
    room = q(w.room_id)

    threads = await w.alice.get_json(f"{V1}/rooms/{room}/threads", params={"include": "all"})
    roots = {e["event_id"]: e for e in threads["chunk"]}
    fetched = await w.alice.get_json(f"{CS}/rooms/{room}/event/{q(charlie_root)}")
    for where, event in (("/threads", roots[charlie_root]), ("/event", fetched)):
        summary = _thread_summary(event)
        assert summary is not None, f"{where}: thread summary dropped: {event}"
        assert summary["latest_event"]["event_id"] == charlie_reply, (where, summary)
        assert summary["count"] == 1, (where, summary)


async def test_search(world: World) -> None:
    w = world
    needle = "needle" + uuid.uuid4().hex[:8]
    b1 = await w.bob.send_text(w.room_id, f"bob says {needle}")
    c1 = await w.charlie.send_text(w.room_id, f"charlie says {needle}")
    b2 = await w.bob.send_text(w.room_id, "bob's chatter right after")
    c2 = await w.charlie.send_text(w.room_id, "charlie's chatter after that")
    query = {
        "search_categories": {
            "room_events": {
                "search_term": needle,
                "filter": {"rooms": [w.room_id]},
                "event_context": {"before_limit": 5, "after_limit": 5},
            }
        }
    }

    resp = await w.alice.request("POST", f"{CS}/search", json=query)
    assert resp.status_code == 200, resp.text
    results = resp.json()["search_categories"]["room_events"]["results"]
    found = [r["result"] for r in results]
    assert c1 in event_ids(found)
    assert b1 not in event_ids(found)
    for r in results:
        ctx = r.get("context", {})
        around = ctx.get("events_before", []) + ctx.get("events_after", [])
        assert not {b1, b2} & event_ids(around), ctx
        assert w.bob.user_id not in senders(non_state(around))
        if r["result"]["event_id"] == c1:
            assert c2 in event_ids(around)

    resp = await w.charlie.request("POST", f"{CS}/search", json=query)
    found = [r["result"] for r in resp.json()["search_categories"]["room_events"]["results"]]
    assert {b1, c1} <= event_ids(found)


async def test_notifications(world: World) -> None:
    w = world
    b1 = await w.bob.send_text(w.room_id, f"bob pings {w.alice.user_id}")
    c1 = await w.charlie.send_text(w.room_id, f"charlie pings {w.alice.user_id}")

    body = await w.alice.get_json(f"{CS}/notifications")
    events = [n["event"] for n in body["notifications"]]
    assert c1 in event_ids(events), body
    assert b1 not in event_ids(events)
    assert w.bob.user_id not in senders(non_state(events))


async def test_room_initial_sync(world: World) -> None:
    w = world
    b1 = await w.bob.send_text(w.room_id, "bob")
    c1 = await w.charlie.send_text(w.room_id, "charlie")

    body = await w.alice.get_json(f"{CS}/rooms/{q(w.room_id)}/initialSync")
    chunk = body["messages"]["chunk"]
    assert c1 in event_ids(chunk)
    assert b1 not in event_ids(chunk)
    assert w.bob.user_id not in senders(non_state(chunk))
    # Bob's state stays.
    assert any(e["type"] == "m.room.create" for e in body["state"])


async def test_timestamp_to_event_skips_ignored_sender(world: World) -> None:
    w = world
    c1 = await w.charlie.send_text(w.room_id, "charlie")
    b1 = await w.bob.send_text(w.room_id, "bob, the latest")
    path = f"{V1}/rooms/{q(w.room_id)}/timestamp_to_event"
    now = int(time.time() * 1000) + 5_000

    body = await w.alice.get_json(path, params={"ts": str(now), "dir": "b"})
    assert body["event_id"] != b1, body
    assert body["event_id"] == c1, body

    body = await w.charlie.get_json(path, params={"ts": str(now), "dir": "b"})
    assert body["event_id"] == b1, body


async def test_thread_count_leaves_out_ignored_replies_when_the_latest_is_visible(
    world: World,
) -> None:
    """Spec, threading module: `count` does not count ignored users' replies, also when
    the latest reply is someone else's (no ignored ID need appear in the answer)."""
    w = world
    root = await w.charlie.send_text(w.room_id, "charlie's root")
    for who, text in ((w.bob, "bob 1"), (w.charlie, "charlie 1"), (w.bob, "bob 2")):
        await who.send_event(
            w.room_id, "m.room.message", {"msgtype": "m.text", "body": text, **thread_reply(root)}
        )
    latest = await w.charlie.send_event(
        w.room_id,
        "m.room.message",
        {"msgtype": "m.text", "body": "charlie 2", **thread_reply(root)},
    )
    room = q(w.room_id)
    for _ in range(2):  # the second time from the proxy's cache
        threads = await w.alice.get_json(f"{V1}/rooms/{room}/threads", params={"include": "all"})
        fetched = await w.alice.get_json(f"{CS}/rooms/{room}/event/{q(root)}")
        messages = await w.alice.get_json(
            f"{CS}/rooms/{room}/messages", params={"dir": "b", "limit": "50"}
        )
        in_messages = next(e for e in messages["chunk"] if e["event_id"] == root)
        in_threads = next(e for e in threads["chunk"] if e["event_id"] == root)
        for where, event in (
            ("/threads", in_threads),
            ("/event", fetched),
            ("/messages", in_messages),
        ):
            summary = _thread_summary(event)
            assert summary is not None, where
            assert summary["latest_event"]["event_id"] == latest, (where, summary)
            assert summary["count"] == 2, (where, summary)
    # charlie, who ignores nobody, counts all four.
    theirs = await w.charlie.get_json(f"{CS}/rooms/{room}/event/{q(root)}")
    assert _thread_summary(theirs)["count"] == 4  # type: ignore[index]
