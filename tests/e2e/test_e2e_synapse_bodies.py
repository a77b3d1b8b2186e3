"""Real Synapse answers take the rewriters' fast paths.

The `/sync` and `/messages` rewriters decode a body once, down to its events, and keep
that only if the body is exactly what msgspec writes for it; anything else is split again
level by level, at about twice the cost. Synapse's own bodies must never need that.
"""

from __future__ import annotations

import asyncio
import json
from unittest import mock

import pytest

from ignore_proxy.rewrite import IgnoreContext, rewrite_messages, rewrite_sync, rooms, sync

from .conftest import World
from .harness.matrix import CS, event_ids, q, timeline

pytestmark = pytest.mark.e2e

LONG_TIMELINE = json.dumps({"room": {"timeline": {"limit": 100}}})


def typing(body: bytes) -> int:
    """How many users the first joined room's m.typing names."""
    rooms = json.loads(body).get("rooms", {}).get("join", {})
    for room in rooms.values():
        for event in room.get("ephemeral", {}).get("events", []):
            if event.get("type") == "m.typing":
                return len(event["content"]["user_ids"])
    return 0


@pytest.mark.parametrize("target", [("no-ignore", "direct")], indirect=True, ids=["no-ignore"])
async def test_a_synapse_sync_is_rewritten_in_one_decode(world: World) -> None:
    """Straight from Synapse without ignore support (so bob's events are in it): bob
    typing, a thread reply, non-ASCII text, an invite from bob."""
    w = world
    root = await w.charlie.send_text(w.room_id, "a thread, caf\u00e9 \U0001f600")
    thread = {"rel_type": "m.thread", "event_id": root}
    bob_reply = await w.bob.send_text(w.room_id, "bob in the thread", **{"m.relates_to": thread})
    bob_msg = await w.bob.send_text(w.room_id, "hello from bob \u2603")
    sentinel = await w.charlie.send_text(w.room_id, "hello from charlie")
    bob_room = await w.bob.create_room(name="bob's invite")
    await w.bob.invite(bob_room, w.alice.user_id)
    await w.bob.nio.room_typing(w.room_id, typing_state=True, timeout=30000)
    await w.charlie.nio.room_typing(w.room_id, typing_state=True, timeout=30000)

    for _ in range(40):
        answer = await w.alice.request("GET", f"{CS}/sync", params={"filter": LONG_TIMELINE})
        assert answer.status_code == 200, answer.text
        body = answer.content
        if sentinel.encode() in body and bob_room.encode() in body and typing(body) == 2:
            break
        await asyncio.sleep(0.25)
    else:
        pytest.fail("Synapse's sync never showed the sentinel and the invite")

    ctx = IgnoreContext(frozenset({w.bob.user_id}), w.alice.user_id, True)
    with mock.patch.object(sync, "start", side_effect=AssertionError("level by level")):
        out = rewrite_sync(body, ctx)
    assert out is not None
    assert out.hidden_invites == (bob_room,)
    rewritten = json.loads(out.body)
    ids = event_ids(timeline(rewritten, w.room_id))
    assert {root, sentinel} <= ids
    assert not {bob_msg, bob_reply} & ids
    assert bob_room not in rewritten["rooms"].get("invite", {})
    assert typing(out.body) == 1  # charlie's
    # everything else as it was
    original = json.loads(body)
    for key in original.keys() - {"rooms"}:
        assert rewritten[key] == original[key], key


@pytest.mark.parametrize("target", [("no-ignore", "direct")], indirect=True, ids=["no-ignore"])
async def test_a_synapse_messages_page_is_rewritten_in_one_decode(world: World) -> None:
    w = world
    bob_msg = await w.bob.send_text(w.room_id, "hello from bob \u2603")
    charlie_msg = await w.charlie.send_text(w.room_id, "caf\u00e9 from charlie")
    answer = await w.alice.request(
        "GET", f"{CS}/rooms/{q(w.room_id)}/messages", params={"dir": "b", "limit": "50"}
    )
    assert answer.status_code == 200, answer.text
    assert bob_msg.encode() in answer.content

    ctx = IgnoreContext(frozenset({w.bob.user_id}), w.alice.user_id, True)
    with mock.patch.object(rooms, "start", side_effect=AssertionError("level by level")):
        out = rewrite_messages(answer.content, ctx)
    assert out is not None
    chunk = json.loads(out.body)["chunk"]
    assert charlie_msg in event_ids(chunk)
    assert bob_msg not in event_ids(chunk)
