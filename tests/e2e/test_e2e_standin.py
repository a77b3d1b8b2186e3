"""The "no-ignore" Synapse really stands in for a homeserver without ignore support.

Straight at Synapse, no proxy: the patched Synapse delivers an ignored sender's events
and invites, stock Synapse does not.
"""

from __future__ import annotations

import pytest

from .conftest import World
from .harness.matrix import CS, event_ids, q, sync_until, timeline

pytestmark = pytest.mark.e2e

DIRECT = pytest.mark.parametrize(
    "target",
    [("stock", "direct"), ("no-ignore", "direct")],
    indirect=True,
    ids=["stock-direct", "no-ignore-direct"],
)


@DIRECT
async def test_ignored_message_reaches_alice_only_without_ignore_support(world: World) -> None:
    w = world
    first = await w.alice.sync()
    bob_msg = await w.bob.send_text(w.room_id, "hello from bob")
    sentinel = await w.charlie.send_text(w.room_id, "hello from charlie")

    seen, _ = await sync_until(w.alice, first["next_batch"], w.room_id, sentinel)
    initial = timeline(await w.alice.sync(), w.room_id)
    fetched = await w.alice.request("GET", f"{CS}/rooms/{q(w.room_id)}/event/{q(bob_msg)}")

    if w.target.mode == "no-ignore":
        assert bob_msg in event_ids(seen)
        assert bob_msg in event_ids(initial)
        assert fetched.status_code == 200, fetched.text
    else:
        assert bob_msg not in event_ids(seen)
        assert bob_msg not in event_ids(initial)
        assert fetched.status_code == 404, fetched.text
        assert fetched.json()["errcode"] == "M_NOT_FOUND"
        assert "sender" not in fetched.json()


@DIRECT
async def test_invite_from_ignored_user_reaches_alice_only_without_ignore_support(
    world: World,
) -> None:
    w = world
    first = await w.alice.sync()
    bob_room = await w.bob.create_room(name="bob's invite")
    await w.bob.invite(bob_room, w.alice.user_id)
    charlie_room = await w.charlie.create_room(name="charlie's invite")
    await w.charlie.invite(charlie_room, w.alice.user_id)
    for _ in range(10):
        body = await w.alice.sync(first["next_batch"], timeout_ms=1000)
        invites = body.get("rooms", {}).get("invite", {})
        if charlie_room in invites:
            break
    else:
        raise AssertionError("charlie's invite never arrived")
    assert (bob_room in invites) == (w.target.mode == "no-ignore"), invites
