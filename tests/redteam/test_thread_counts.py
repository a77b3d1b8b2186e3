"""Thread `count`s can be set by anyone who can put JSON in an answer.

`rewrite.find_thread_counts` walks every object of the filtered answer, `content` of
events included (unlike the guard), takes any object with `event_id` and
`unsigned.m.relations.m.thread` for a thread summary, and keeps the first one it meets
per root ID (`found.setdefault`). `Proxy._thread_counts` then learns "the right count"
as `count - ignored replies` from that summary's own `count`, and
`apply_thread_counts` writes it into every summary of that root, the real one too.
So charlie (not ignored) quotes a fake summary of a real root in his message, and
alice's client shows that thread with the reply count charlie chose."""

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

MESSAGES = f"/_matrix/client/v3/rooms/{ROOM}/messages"


async def test_a_summary_quoted_in_content_does_not_set_a_real_threads_count() -> None:
    hs = FakeHomeserver()
    hs.ignore(ALICE, BOB)
    real_summary = {
        "count": 3,
        "current_user_participated": False,
        "latest_event": message("$r3", CHARLIE, "third reply"),
    }
    root = message("$root", CHARLIE, "root", unsigned={"m.relations": {"m.thread": real_summary}})
    fake = {
        "event_id": "$root",
        "room_id": ROOM,
        "unsigned": {
            "m.relations": {"m.thread": {"count": 1000, "latest_event": {"event_id": "$x"}}}
        },
    }
    quoting = message("$q", CHARLIE, "look at this")
    quoting["content"]["quoted"] = fake
    hs.answers[("GET", f"/rooms/{ROOM}/messages")] = {"chunk": [root, quoting], "start": "t"}
    hs.answers[("GET", f"/rooms/{ROOM}/relations/$root/m.thread")] = {
        "chunk": [message("$r3", CHARLIE), message("$r2", BOB), message("$r1", CHARLIE)]
    }
    app = build_app(hs)
    async with client_for(app, "alice-token") as alice:
        resp = await alice.get(MESSAGES)
    assert resp.status_code == 200, resp.text
    shown = resp.json()["chunk"][0]["unsigned"]["m.relations"]["m.thread"]["count"]
    assert shown == 2, shown  # three replies, one of them bob's
