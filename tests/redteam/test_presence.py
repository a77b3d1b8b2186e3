"""Presence of an ignored user passes: `/sync`'s `presence.events` carries their
`m.presence` events (a `sender`, and `content.status_msg`: free text of theirs, shown by
clients next to their name). The proxy drops their typing and receipts
(`ignore.filter_ephemeral`) but has no rule for presence (`rewrite/sync.py` leaves
`presence` raw), and the guard does not see these events (no `event_id`). Synapse does
not drop them either (`handlers/presence.py` knows no ignore list)."""

from __future__ import annotations

from tests.fake_homeserver import (
    ALICE,
    BOB,
    CHARLIE,
    ROOM,
    FakeHomeserver,
    build_app,
    client_for,
    message,
)

SYNC = "/_matrix/client/v3/sync"


async def test_an_ignored_users_status_message_is_not_delivered() -> None:
    hs = FakeHomeserver()
    hs.ignore(ALICE, BOB)
    hs.answers[("GET", "/sync")] = {
        "next_batch": "s2",
        "presence": {
            "events": [
                {
                    "type": "m.presence",
                    "sender": BOB,
                    "content": {"presence": "online", "status_msg": "bob's words in presence"},
                }
            ]
        },
        "rooms": {"join": {ROOM: {"timeline": {"events": [message("$c1", CHARLIE)]}}}},
    }
    app = build_app(hs)
    async with client_for(app, "alice-token") as alice:
        resp = await alice.get(SYNC)
    assert resp.status_code == 200
    assert "bob's words in presence" not in resp.text, resp.text
