"""Sync (classic and sliding) through the proxy, plain and behind nginx, in front of
stock Synapse and of Synapse without ignore support."""

from __future__ import annotations

import asyncio
import json

import pytest

from .conftest import World, WorldFactory
from .harness.expect import assert_hidden_by_stock_synapse, assert_sender_ignored
from .harness.matrix import (
    CS,
    JSON,
    Actor,
    event_ids,
    login_new_device,
    non_state,
    q,
    room_state,
    senders,
    sync_until,
    timeline,
)

pytestmark = pytest.mark.e2e

# Large enough that a whole test room fits in the timeline of an initial sync.
LONG_TIMELINE = json.dumps({"room": {"timeline": {"limit": 100}}})
# Hides account data: the proxy cannot learn ignore-list changes from the sync itself.
NO_ACCOUNT_DATA = json.dumps({"account_data": {"not_types": ["*"]}})

SLIDING_SYNC = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"


def assert_no_ignored_messages(events: list[JSON], ignored: str) -> None:
    leaked = [e for e in non_state(events) if e.get("sender") == ignored]
    assert not leaked, f"ignored sender's events delivered: {leaked}"


async def test_initial_and_incremental_sync(world: World) -> None:
    w = world
    b1 = await w.bob.send_text(w.room_id, "bob 1")
    c1 = await w.charlie.send_text(w.room_id, "charlie 1")
    name = await w.bob.put_state(w.room_id, "m.room.name", {"name": "renamed by bob"})
    b2 = await w.bob.send_text(w.room_id, "bob 2")
    c2 = await w.charlie.send_text(w.room_id, "charlie 2")

    initial = await w.alice.sync(filter_json=LONG_TIMELINE)
    tl = timeline(initial, w.room_id)
    assert {c1, c2} <= event_ids(tl)
    assert not {b1, b2} & event_ids(tl + room_state(initial, w.room_id))
    assert_no_ignored_messages(tl, w.bob.user_id)
    # State events from the ignored user stay.
    everything = tl + room_state(initial, w.room_id)
    assert name in event_ids(everything)
    assert any(e["type"] == "m.room.create" and e["sender"] == w.bob.user_id for e in everything)

    # The bystander sees everything.
    charlie_tl = timeline(await w.charlie.sync(filter_json=LONG_TIMELINE), w.room_id)
    assert {b1, b2, c1, c2, name} <= event_ids(charlie_tl)

    b3 = await w.bob.send_text(w.room_id, "bob 3")
    topic = await w.bob.put_state(w.room_id, "m.room.topic", {"topic": "set by bob"})
    c3 = await w.charlie.send_text(w.room_id, "charlie 3")
    seen, _ = await sync_until(w.alice, initial["next_batch"], w.room_id, c3)
    assert b3 not in event_ids(seen)
    assert topic in event_ids(seen)
    assert_no_ignored_messages(seen, w.bob.user_id)


async def test_invite_from_ignored_user_is_not_delivered(world: World) -> None:
    w = world
    first = await w.alice.sync()
    bob_room = await w.bob.create_room(name="from bob")
    await w.bob.invite(bob_room, w.alice.user_id)
    charlie_room = await w.charlie.create_room(name="from charlie")
    await w.charlie.invite(charlie_room, w.alice.user_id)

    invites: JSON = {}
    for _ in range(10):
        body = await w.alice.sync(first["next_batch"], timeout_ms=1000)
        invites = body.get("rooms", {}).get("invite", {})
        if charlie_room in invites:
            break
    assert charlie_room in invites, "charlie's invite (sentinel) never arrived"
    assert bob_room not in invites

    initial_invites = (await w.alice.sync()).get("rooms", {}).get("invite", {})
    assert charlie_room in initial_invites
    assert bob_room not in initial_invites

    sliding = await sliding_sync(w.alice, {})
    assert charlie_room in sliding.get("rooms", {})
    assert bob_room not in sliding.get("rooms", {})


async def test_ignore_applies_at_once_to_a_running_long_poll(make_world: WorldFactory) -> None:
    w = await make_world(alice_ignores_bob=False)
    first = await w.alice.sync(filter_json=NO_ACCOUNT_DATA)
    # The poll hides account data, so Synapse keeps it waiting across the ignore-list
    # write: it is still running when bob's message arrives.
    poll = asyncio.create_task(
        w.alice.sync(first["next_batch"], timeout_ms=8000, filter_json=NO_ACCOUNT_DATA)
    )
    await asyncio.sleep(0.5)
    assert not poll.done(), f"long-poll returned early: {poll.result()}"
    await w.alice.set_ignored([w.bob.user_id])
    await asyncio.sleep(0.2)
    bob_msg = await w.bob.send_text(w.room_id, "sent after the ignore")
    sentinel = await w.charlie.send_text(w.room_id, "sentinel")

    body = await poll
    seen = timeline(body, w.room_id)
    if sentinel not in event_ids(seen):
        more, _ = await sync_until(
            w.alice, body["next_batch"], w.room_id, sentinel, filter_json=NO_ACCOUNT_DATA
        )
        seen += more
    assert bob_msg not in event_ids(seen)
    assert_no_ignored_messages(seen, w.bob.user_id)


async def test_ignore_applies_at_once_to_the_users_other_device(
    make_world: WorldFactory,
) -> None:
    w = await make_world(alice_ignores_bob=False)
    phone: Actor = await login_new_device(w.http, w.target.url, w.alice.user)
    w.actors.append(phone)
    first = await phone.sync()
    poll = asyncio.create_task(phone.sync(first["next_batch"], timeout_ms=8000))
    await asyncio.sleep(0.5)
    # The first device writes the ignore list; the phone's stream is already running.
    await w.alice.set_ignored([w.bob.user_id])
    bob_msg = await w.bob.send_text(w.room_id, "sent after the ignore")
    sentinel = await w.charlie.send_text(w.room_id, "sentinel")

    body = await poll
    seen = timeline(body, w.room_id)
    if sentinel not in event_ids(seen):
        more, _ = await sync_until(phone, body["next_batch"], w.room_id, sentinel)
        seen += more
    assert bob_msg not in event_ids(seen)
    assert_no_ignored_messages(seen, w.bob.user_id)


async def test_unignore_shows_new_messages_without_replaying_missed_ones(world: World) -> None:
    w = world
    first = await w.alice.sync()
    missed = await w.bob.send_text(w.room_id, "sent while ignored")
    c1 = await w.charlie.send_text(w.room_id, "sentinel 1")
    seen, token = await sync_until(w.alice, first["next_batch"], w.room_id, c1)
    assert missed not in event_ids(seen)

    await w.alice.set_ignored([])
    fresh = await w.bob.send_text(w.room_id, "sent after the un-ignore")
    c2 = await w.charlie.send_text(w.room_id, "sentinel 2")
    seen, _ = await sync_until(w.alice, token, w.room_id, c2)
    assert fresh in event_ids(seen)
    assert missed not in event_ids(seen)

    # No longer ignored: single-event fetch works again.
    resp = await w.alice.request("GET", f"{CS}/rooms/{q(w.room_id)}/event/{q(fresh)}")
    assert resp.status_code == 200, resp.text


async def test_ignore_list_written_straight_to_the_homeserver_is_honoured(
    make_world: WorldFactory,
) -> None:
    w = await make_world(alice_ignores_bob=False)
    # Warm the proxy: it has seen alice, with nobody ignored.
    first = await w.alice.sync()
    early = await w.bob.send_text(w.room_id, "before the ignore")
    resp = await w.alice.request("GET", f"{CS}/rooms/{q(w.room_id)}/event/{q(early)}")
    assert resp.status_code == 200, resp.text

    # Another client of alice's writes the ignore list without going through the proxy.
    direct = w.actor(w.alice.user, base_url=w.target.synapse.url)
    await direct.set_ignored([w.bob.user_id])

    bob_msg = await w.bob.send_text(w.room_id, "after the ignore")
    sentinel = await w.charlie.send_text(w.room_id, "sentinel")
    seen, _ = await sync_until(w.alice, first["next_batch"], w.room_id, sentinel)
    assert bob_msg not in event_ids(seen)
    assert_no_ignored_messages(seen, w.bob.user_id)

    resp = await w.alice.request("GET", f"{CS}/rooms/{q(w.room_id)}/event/{q(bob_msg)}")
    if w.target.filtering_upstream:
        assert_hidden_by_stock_synapse(resp, w.bob.user_id, {404})
    else:
        assert_sender_ignored(resp, w.bob.user_id)


@pytest.mark.parametrize(
    ("prefix", "token_in_query"),
    [("/_matrix/client/r0", False), ("/_matrix/client/r0", True), (CS, True)],
    ids=["r0-header", "r0-query-token", "v3-query-token"],
)
async def test_r0_paths_and_query_access_token(
    world: World, prefix: str, token_in_query: bool
) -> None:
    w = world
    bob_msg = await w.bob.send_text(w.room_id, "bob")
    sentinel = await w.charlie.send_text(w.room_id, "charlie")

    initial = await w.alice.sync(
        prefix=prefix, token_in_query=token_in_query, filter_json=LONG_TIMELINE
    )
    tl = timeline(initial, w.room_id)
    assert sentinel in event_ids(tl)
    assert bob_msg not in event_ids(tl)
    assert_no_ignored_messages(tl, w.bob.user_id)

    b2 = await w.bob.send_text(w.room_id, "bob again")
    s2 = await w.charlie.send_text(w.room_id, "charlie again")
    seen, _ = await sync_until(
        w.alice, initial["next_batch"], w.room_id, s2, prefix=prefix, token_in_query=token_in_query
    )
    assert b2 not in event_ids(seen)

    resp = await w.alice.request(
        "GET",
        f"{prefix}/rooms/{q(w.room_id)}/event/{q(bob_msg)}",
        token_in_query=token_in_query,
    )
    if w.target.filtering_upstream:
        assert_hidden_by_stock_synapse(resp, w.bob.user_id, {404})
    else:
        assert_sender_ignored(resp, w.bob.user_id)


async def sliding_sync(actor: Actor, params: dict[str, str], timeline_limit: int = 50) -> JSON:
    body = {
        "lists": {
            "all": {
                "ranges": [[0, 19]],
                "timeline_limit": timeline_limit,
                "required_state": [["m.room.name", ""], ["m.room.topic", ""]],
            }
        }
    }
    resp = await actor.request("POST", SLIDING_SYNC, json=body, params=params)
    assert resp.status_code == 200, f"sliding sync: {resp.status_code} {resp.text}"
    answer: JSON = resp.json()
    return answer


def sliding_timeline(body: JSON, room_id: str) -> list[JSON]:
    events: list[JSON] = body.get("rooms", {}).get(room_id, {}).get("timeline", [])
    return events


async def test_sliding_sync(world: World) -> None:
    w = world
    b1 = await w.bob.send_text(w.room_id, "bob 1")
    name = await w.bob.put_state(w.room_id, "m.room.name", {"name": "renamed by bob"})
    c1 = await w.charlie.send_text(w.room_id, "charlie 1")

    first = await sliding_sync(w.alice, {})
    tl = sliding_timeline(first, w.room_id)
    assert c1 in event_ids(tl)
    assert b1 not in event_ids(tl)
    assert_no_ignored_messages(tl, w.bob.user_id)
    required_state = first["rooms"][w.room_id].get("required_state", [])
    assert name in event_ids(required_state) | event_ids(tl)

    charlie_tl = sliding_timeline(await sliding_sync(w.charlie, {}), w.room_id)
    assert {b1, c1} <= event_ids(charlie_tl)

    b2 = await w.bob.send_text(w.room_id, "bob 2")
    c2 = await w.charlie.send_text(w.room_id, "charlie 2")
    pos = first["pos"]
    seen: list[JSON] = []
    for _ in range(10):
        body = await sliding_sync(w.alice, {"pos": pos, "timeout": "1000"})
        pos = body["pos"]
        seen += sliding_timeline(body, w.room_id)
        if c2 in event_ids(seen):
            break
    assert c2 in event_ids(seen), "charlie's sentinel never arrived"
    assert b2 not in event_ids(seen)
    assert w.bob.user_id not in senders(non_state(seen))
