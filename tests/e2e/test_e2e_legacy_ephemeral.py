"""The legacy endpoints (``GET /events``, global ``GET /initialSync``), typing and read
receipts in /sync's ephemeral section, ``ignore.reject_invites``, and the ignore list
learned from sliding sync's account_data extension.

These run on fewer targets than the rest (the proxy plain in front of both homeservers,
and ``ignore-proxy-selected.conf``, whose regex routes are the ones that can miss a path):
the all-client nginx config sends everything to the proxy anyway.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from .conftest import Stack, World
from .harness.matrix import CS, JSON, Actor, event_ids, non_state, q, senders

pytestmark = pytest.mark.e2e

LEGACY_TARGETS = pytest.mark.parametrize(
    "target",
    [("stock", "proxy"), ("no-ignore", "proxy"), ("no-ignore", "nginx-selected")],
    indirect=True,
    ids=["stock-proxy", "no-ignore-proxy", "no-ignore-nginx-selected"],
)


async def _typing(actor: Actor, room_id: str) -> None:
    resp = await actor.request(
        "PUT",
        f"{CS}/rooms/{q(room_id)}/typing/{q(actor.user_id)}",
        json={"typing": True, "timeout": 30000},
    )
    assert resp.status_code == 200, f"typing: {resp.status_code} {resp.text}"


async def _read_receipt(actor: Actor, room_id: str, event_id: str) -> None:
    resp = await actor.request(
        "POST", f"{CS}/rooms/{q(room_id)}/receipt/m.read/{q(event_id)}", json={}
    )
    assert resp.status_code == 200, f"receipt: {resp.status_code} {resp.text}"


def _typing_users(events: list[JSON], room_id: str | None = None) -> set[str]:
    return {
        uid
        for e in events
        if e.get("type") == "m.typing" and (room_id is None or e.get("room_id") == room_id)
        for uid in e.get("content", {}).get("user_ids", [])
    }


def _receipt_users(events: list[JSON], event_id: str) -> set[str]:
    users: set[str] = set()
    for e in events:
        if e.get("type") == "m.receipt":
            for receipt_type in e.get("content", {}).get(event_id, {}).values():
                users |= set(receipt_type)
    return users


def _ephemeral(sync: JSON, room_id: str) -> list[JSON]:
    room = sync.get("rooms", {}).get("join", {}).get(room_id, {})
    events: list[JSON] = room.get("ephemeral", {}).get("events", [])
    return events


async def _sync_ephemeral_until(
    actor: Actor, room_id: str, ready: Any, deadline_s: float = 10.0
) -> list[JSON]:
    """Initial syncs until ``ready(ephemeral_events)``; returns the last ephemeral events."""
    end = time.monotonic() + deadline_s
    while True:
        events = _ephemeral(await actor.sync(), room_id)
        if ready(events) or time.monotonic() > end:
            return events
        await asyncio.sleep(0.2)


@LEGACY_TARGETS
async def test_typing_and_read_receipts_of_ignored_user_in_sync(world: World) -> None:
    w = world
    c1 = await w.charlie.send_text(w.room_id, "read me")
    await _read_receipt(w.bob, w.room_id, c1)
    await _read_receipt(w.charlie, w.room_id, c1)
    await _typing(w.bob, w.room_id)
    await _typing(w.charlie, w.room_id)

    def charlie_arrived(events: list[JSON]) -> bool:
        return w.charlie.user_id in _typing_users(events) and w.charlie.user_id in _receipt_users(
            events, c1
        )

    # Charlie's typing and receipt are the sentinels.
    alice_eph = await _sync_ephemeral_until(w.alice, w.room_id, charlie_arrived)
    assert w.charlie.user_id in _typing_users(alice_eph), alice_eph
    assert w.charlie.user_id in _receipt_users(alice_eph, c1), alice_eph
    assert w.bob.user_id not in _typing_users(alice_eph), alice_eph
    assert w.bob.user_id not in _receipt_users(alice_eph, c1), alice_eph

    # Charlie, who ignores nobody, sees bob typing and bob's receipt.
    def bob_arrived(events: list[JSON]) -> bool:
        return w.bob.user_id in _typing_users(events) and w.bob.user_id in _receipt_users(
            events, c1
        )

    charlie_eph = await _sync_ephemeral_until(w.charlie, w.room_id, bob_arrived)
    assert {w.bob.user_id, w.charlie.user_id} <= _typing_users(charlie_eph), charlie_eph
    assert {w.bob.user_id, w.charlie.user_id} <= _receipt_users(charlie_eph, c1), charlie_eph


async def _events_stream_until(
    actor: Actor, since: str, done: Any, deadline_s: float = 15.0
) -> list[JSON]:
    """Legacy ``GET /events`` polls from ``since`` until ``done(everything_seen)``."""
    seen: list[JSON] = []
    token = since
    end = time.monotonic() + deadline_s
    while True:
        body = await actor.get_json(f"{CS}/events", params={"from": token, "timeout": "1000"})
        seen += body.get("chunk", [])
        token = body.get("end", token)
        if done(seen):
            return seen
        if time.monotonic() > end:
            raise AssertionError(f"the legacy event stream never delivered the sentinels: {seen}")


@LEGACY_TARGETS
async def test_legacy_events_stream(world: World) -> None:
    w = world
    alice_from = (await w.alice.sync())["next_batch"]
    charlie_from = (await w.charlie.sync())["next_batch"]

    b1 = await w.bob.send_text(w.room_id, "bob in the stream")
    bob_room = await w.bob.create_room(name="bob invites alice")
    await w.bob.invite(bob_room, w.alice.user_id)
    charlie_room = await w.charlie.create_room(name="charlie invites alice")
    await w.charlie.invite(charlie_room, w.alice.user_id)
    await _typing(w.bob, w.room_id)
    await _typing(w.charlie, w.room_id)
    c1 = await w.charlie.send_text(w.room_id, "charlie, the sentinel")

    def invite_rooms(events: list[JSON]) -> set[str]:
        return {
            e["room_id"]
            for e in events
            if e.get("type") == "m.room.member"
            and e.get("state_key") == w.alice.user_id
            and e.get("content", {}).get("membership") == "invite"
        }

    def alice_done(events: list[JSON]) -> bool:
        return (
            c1 in event_ids(events)
            and charlie_room in invite_rooms(events)
            and w.charlie.user_id in _typing_users(events, w.room_id)
        )

    seen = await _events_stream_until(w.alice, alice_from, alice_done)
    assert b1 not in event_ids(seen)
    assert w.bob.user_id not in senders(non_state(seen))
    assert bob_room not in invite_rooms(seen), "bob's invite delivered"
    assert w.bob.user_id not in _typing_users(seen), "bob's typing delivered"

    def charlie_done(events: list[JSON]) -> bool:
        return c1 in event_ids(events) and w.bob.user_id in _typing_users(events, w.room_id)

    seen = await _events_stream_until(w.charlie, charlie_from, charlie_done)
    assert b1 in event_ids(seen)


@LEGACY_TARGETS
async def test_legacy_global_initial_sync(world: World) -> None:
    w = world
    b1 = await w.bob.send_text(w.room_id, "bob")
    c1 = await w.charlie.send_text(w.room_id, "charlie")
    bob_room = await w.bob.create_room(name="bob invites alice")
    await w.bob.invite(bob_room, w.alice.user_id)
    charlie_room = await w.charlie.create_room(name="charlie invites alice")
    await w.charlie.invite(charlie_room, w.alice.user_id)

    body = await w.alice.get_json(f"{CS}/initialSync", params={"limit": "20"})
    rooms = {r["room_id"]: r for r in body["rooms"]}
    assert rooms[charlie_room]["membership"] == "invite", rooms[charlie_room]
    assert bob_room not in rooms, f"bob's invite delivered: {rooms[bob_room]}"
    main = rooms[w.room_id]
    assert main["membership"] == "join"
    chunk = main["messages"]["chunk"]
    assert c1 in event_ids(chunk)
    assert b1 not in event_ids(chunk)
    assert w.bob.user_id not in senders(non_state(chunk))
    # Bob's state stays.
    assert any(e["type"] == "m.room.create" for e in main["state"])

    body = await w.charlie.get_json(f"{CS}/initialSync", params={"limit": "20"})
    rooms = {r["room_id"]: r for r in body["rooms"]}
    assert {b1, c1} <= event_ids(rooms[w.room_id]["messages"]["chunk"])


@pytest.mark.parametrize("target", [("no-ignore", "direct")], indirect=True, ids=["no-ignore"])
async def test_reject_invites_leaves_rooms_ignored_users_invite_to(
    world: World, stack: Stack
) -> None:
    """With ``IGNORE_PROXY_IGNORE_REJECT_INVITES=true`` the proxy, on seeing a hidden
    invite in alice's sync, leaves the room on her behalf: bob sees her membership go
    from ``invite`` to ``leave``. Charlie's invite is left alone."""
    w = world
    alice = w.actor(w.alice.user, base_url=stack.rejecting_proxy("no-ignore").url)
    bob_room = await w.bob.create_room(name="bob invites alice")
    await w.bob.invite(bob_room, w.alice.user_id)
    charlie_room = await w.charlie.create_room(name="charlie invites alice")
    await w.charlie.invite(charlie_room, w.alice.user_id)

    invites = (await alice.sync()).get("rooms", {}).get("invite", {})
    assert charlie_room in invites
    assert bob_room not in invites

    async def membership(actor: Actor, room_id: str) -> str:
        got = await actor.get_json(
            f"{CS}/rooms/{q(room_id)}/state/m.room.member/{q(w.alice.user_id)}"
        )
        value: str = got["membership"]
        return value

    # The rejection runs in the background, after the sync was answered.
    for _ in range(50):
        state = await membership(w.bob, bob_room)
        if state != "invite":
            break
        await asyncio.sleep(0.2)
    assert state == "leave", f"alice's membership in bob's room: {state}"
    assert await membership(w.charlie, charlie_room) == "invite"


SLIDING_SYNC = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"


async def _sliding_timeline(actor: Actor, room_id: str) -> list[JSON]:
    body = {
        "lists": {"all": {"ranges": [[0, 19]], "timeline_limit": 50, "required_state": []}},
        "extensions": {"account_data": {"enabled": True}},
    }
    resp = await actor.request("POST", SLIDING_SYNC, json=body)
    assert resp.status_code == 200, f"sliding sync: {resp.status_code} {resp.text}"
    events: list[JSON] = resp.json().get("rooms", {}).get(room_id, {}).get("timeline", [])
    return events


@pytest.mark.parametrize("target", [("no-ignore", "proxy")], indirect=True, ids=["no-ignore"])
async def test_ignore_list_learned_from_sliding_sync_account_data(
    make_world: Any,
) -> None:
    """The proxy knows alice ignores nobody; she then ignores bob through another client,
    straight at the homeserver. Her next sliding sync carries the new list in its
    account_data extension, and the proxy applies it to that very answer."""
    w: World = await make_world(alice_ignores_bob=False)
    early = await w.bob.send_text(w.room_id, "before the ignore")
    assert early in event_ids(await _sliding_timeline(w.alice, w.room_id))

    direct = w.actor(w.alice.user, base_url=w.target.synapse.url)
    await direct.set_ignored([w.bob.user_id])
    bob_msg = await w.bob.send_text(w.room_id, "after the ignore")
    sentinel = await w.charlie.send_text(w.room_id, "sentinel")

    tl = await _sliding_timeline(w.alice, w.room_id)
    assert sentinel in event_ids(tl)
    assert not {early, bob_msg} & event_ids(tl)
    assert w.bob.user_id not in senders(non_state(tl))
