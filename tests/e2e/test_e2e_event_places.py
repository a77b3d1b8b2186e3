"""Places an ignored user's event or words hide inside answers of real Synapse: a
redaction's reason, a thread root with planted content, the parent of `/relations` on
the unstable prefix. alice ignores bob."""

from __future__ import annotations

import json

import pytest

from .conftest import World
from .harness.matrix import CS, JSON, q

pytestmark = pytest.mark.e2e

V1 = "/_matrix/client/v1"


async def _redact(w: World, event_id: str, reason: str) -> str:
    txn = f"r{abs(hash((event_id, reason)))}"
    resp = await w.bob.request(
        "PUT",
        f"{CS}/rooms/{q(w.room_id)}/redact/{q(event_id)}/{txn}",
        json={"reason": reason},
    )
    assert resp.status_code == 200, resp.text
    redaction: str = resp.json()["event_id"]
    return redaction


def _find(events: list[JSON], event_id: str) -> JSON:
    return next(e for e in events if e.get("event_id") == event_id)


async def test_an_ignored_users_redaction_keeps_no_reason(world: World) -> None:
    """bob (ignored) is a moderator and redacts charlie's message with a reason: the
    message still shows as redacted to alice, but bob's words never reach her."""
    w = world
    # bob created the room, so he may redact others' messages.
    target = await w.charlie.send_text(w.room_id, "charlie's message, soon redacted")
    secret = "bob's reason nobody should read"
    redaction = await _redact(w, target, secret)
    room = q(w.room_id)

    messages = await w.alice.get_json(
        f"{CS}/rooms/{room}/messages", params={"dir": "b", "limit": "50"}
    )
    fetched = await w.alice.get_json(f"{CS}/rooms/{room}/event/{q(target)}")
    synced = await w.alice.sync()
    for where, body in (("/messages", messages), ("/event", fetched), ("/sync", synced)):
        assert secret not in json.dumps(body), where
    event = _find(messages["chunk"], target)
    because = event["unsigned"]["redacted_because"]
    assert because["event_id"] == redaction and because["type"] == "m.room.redaction"
    assert "reason" not in because.get("content", {})
    # charlie, who ignores nobody, still reads the reason.
    theirs = await w.charlie.get_json(f"{CS}/rooms/{room}/event/{q(target)}")
    assert theirs["unsigned"]["redacted_because"]["content"]["reason"] == secret


async def test_a_thread_root_of_an_ignored_user_carries_none_of_their_words(
    world: World,
) -> None:
    """A non-state `m.room.join_rules` root keeps `join_rule` and `allow` when redacted:
    bob could plant text there and reply to it. The root is dropped altogether."""
    w = world
    planted = "bob planted this in a join rule"
    root = await w.bob.send_event(
        w.room_id, "m.room.join_rules", {"join_rule": planted, "allow": [{"type": planted}]}
    )
    reply = {
        "msgtype": "m.text",
        "body": "charlie replies",
        "m.relates_to": {"rel_type": "m.thread", "event_id": root},
    }
    await w.charlie.send_event(w.room_id, "m.room.message", reply)
    body = await w.alice.get_json(f"{V1}/rooms/{q(w.room_id)}/threads", params={"include": "all"})
    assert planted not in json.dumps(body)
    assert root not in {e["event_id"] for e in body["chunk"]}


async def test_original_event_of_an_ignored_parent_is_never_served(world: World) -> None:
    w = world
    parent = await w.bob.send_text(w.room_id, "bob's parent text")
    await w.charlie.send_event(
        w.room_id,
        "m.reaction",
        {"m.relates_to": {"rel_type": "m.annotation", "event_id": parent, "key": "x"}},
    )
    for prefix in ("/_matrix/client/unstable", V1):
        resp = await w.alice.request("GET", f"{prefix}/rooms/{q(w.room_id)}/relations/{q(parent)}")
        assert "bob's parent text" not in resp.text, (prefix, resp.text)
        assert resp.status_code in (403, 404), (prefix, resp.text)
