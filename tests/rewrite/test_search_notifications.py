from __future__ import annotations

from typing import Any

from ignore_proxy.rewrite import rewrite_notifications, rewrite_search
from tests.rewrite.factories import (
    ALICE,
    BOB,
    CTX,
    ME,
    SPAM,
    TROLL,
    dumps,
    event,
    ids,
    loads,
    member,
    state,
    thread_unsigned,
)


def _result(ev: dict[str, Any], before: list[Any], after: list[Any]) -> dict[str, Any]:
    return {
        "rank": 0.5,
        "result": ev,
        "context": {
            "events_before": before,
            "events_after": after,
            "start": "cs",
            "end": "ce",
            "profile_info": {ALICE: {"displayname": "Alice"}},
        },
    }


def test_search() -> None:
    b1, b2, a1 = event(ALICE), event(SPAM), event(TROLL)
    good = _result(event(BOB), [b1, b2], [a1])
    bad = _result(event(SPAM), [], [])
    bad_state = _result(state(TROLL), [], [])
    plain = _result(event(ALICE), [], [])
    body_obj = {
        "search_categories": {
            "room_events": {
                "count": 4,
                "highlights": ["hello"],
                "next_batch": "nb",
                "results": [bad, good, bad_state, plain],
                "state": {"!r:x": [state(SPAM)]},
                "groups": {
                    "sender": {SPAM: {"order": 1, "results": ["$x"]}, ALICE: {"order": 2}},
                    "room_id": {"!r:x": {"order": 1, "next_batch": "g"}},
                },
            }
        }
    }
    out = rewrite_search(dumps(body_obj), CTX)
    assert out is not None
    assert out.removed == 1 + 2 + 1
    room_events = loads(out.body)["search_categories"]["room_events"]
    original = body_obj["search_categories"]["room_events"]
    for key in ("count", "highlights", "next_batch", "state"):
        assert room_events[key] == original[key]
    results = room_events["results"]
    assert [r["result"]["event_id"] for r in results] == [
        good["result"]["event_id"],
        bad_state["result"]["event_id"],
        plain["result"]["event_id"],
    ]
    assert ids(results[0]["context"]["events_before"]) == ids([b1])
    assert results[0]["context"]["events_after"] == []
    assert results[0]["context"]["start"] == "cs"
    assert room_events["groups"] == {
        "sender": {ALICE: {"order": 2}},
        "room_id": {"!r:x": {"order": 1, "next_batch": "g"}},
    }
    assert dumps(plain) in out.body


def test_search_thread_summary_in_result() -> None:
    res = _result(event(ALICE, unsigned=thread_unsigned(SPAM)), [], [])
    body = dumps({"search_categories": {"room_events": {"results": [res]}}})
    out = rewrite_search(body, CTX)
    assert out is not None and out.removed == 1
    got = loads(out.body)["search_categories"]["room_events"]["results"][0]
    assert got["result"]["unsigned"] == {"age": 1234}


def test_search_untouched() -> None:
    body = dumps(
        {"search_categories": {"room_events": {"results": [_result(event(ALICE), [], [])]}}}
    )
    assert rewrite_search(body, CTX) is None
    assert rewrite_search(dumps({"search_categories": SPAM}), CTX) is None


def _notif(ev: dict[str, Any]) -> dict[str, Any]:
    return {"actions": ["notify"], "event": ev, "read": False, "room_id": "!r:x", "ts": 1}


def test_notifications() -> None:
    keep = _notif(event(ALICE))
    drop = _notif(event(SPAM))
    st = _notif(state(SPAM))
    bad_invite = _notif(member(TROLL, ME, "invite"))
    good_invite = _notif(member(ALICE, ME, "invite"))
    weird = {"actions": [], "event": SPAM}
    body_obj = {
        "notifications": [keep, drop, st, bad_invite, good_invite, weird],
        "next_token": "n",
    }
    out = rewrite_notifications(dumps(body_obj), CTX)
    assert out is not None and out.removed == 2
    parsed = loads(out.body)
    assert parsed == {**body_obj, "notifications": [keep, st, good_invite, weird]}
    assert rewrite_notifications(dumps({"notifications": [keep], "next_token": "n"}), CTX) is None


def test_notification_thread_summary() -> None:
    n = _notif(event(ALICE, unsigned=thread_unsigned(SPAM)))
    out = rewrite_notifications(dumps({"notifications": [n]}), CTX)
    assert out is not None and out.removed == 1
    assert loads(out.body)["notifications"][0]["event"]["unsigned"] == {"age": 1234}
