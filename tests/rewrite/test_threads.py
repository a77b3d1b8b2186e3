"""rewrite/threads.py: thread summaries that may count ignored users' replies."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ignore_proxy.rewrite import ThreadCount, apply_thread_counts, find_thread_counts

ROOM = "!r:hs"


def root(event_id: str, count: int, latest: str = "$latest", **extra: Any) -> dict[str, Any]:
    summary = {"latest_event": {"event_id": latest, "sender": "@c:hs", "type": "m.room.message"},
               "count": count, "current_user_participated": False}  # fmt: skip
    return {"event_id": event_id, "sender": "@c:hs", "type": "m.room.message", "content": {},
            "unsigned": {"m.relations": {"m.thread": summary}}, **extra}  # fmt: skip


def sync(*events: dict[str, Any]) -> bytes:
    body = {"next_batch": "s", "rooms": {"join": {ROOM: {"timeline": {"events": list(events)}}}}}
    return json.dumps(body).encode()


def test_summaries_of_more_than_one_reply_are_found_with_their_room() -> None:
    body = sync(root("$one", 1), root("$three", 3), {"event_id": "$plain", "unsigned": {}})
    found = find_thread_counts(body)
    assert [(t.room_id, t.root_id, t.latest_id, t.count) for t in found] == [
        (ROOM, "$three", "$latest", 3)
    ]
    assert json.loads(found[0].summary)["count"] == 3


def test_an_events_own_room_id_wins_and_messages_pages_work() -> None:
    body = json.dumps({"chunk": [root("$t", 4, room_id="!own:hs")], "start": "x"}).encode()
    assert [t.room_id for t in find_thread_counts(body)] == ["!own:hs"]


def test_nothing_to_find_without_threads() -> None:
    assert find_thread_counts(b'{"chunk": []}') == []
    assert apply_thread_counts(b'{"chunk": []}', {"$t": 1}) is None


def test_counts_are_written_in_and_nothing_else_changes() -> None:
    other = {"event_id": "$other", "content": {"body": "caf\\u00e9  spaced"}}
    body = sync(root("$three", 3), other)
    out = apply_thread_counts(body, {"$three": 2})
    assert out is not None
    events = json.loads(out)["rooms"]["join"][ROOM]["timeline"]["events"]
    assert events[0]["unsigned"]["m.relations"]["m.thread"]["count"] == 2
    assert json.dumps(other).encode() in out  # untouched, byte for byte
    assert apply_thread_counts(body, {"$three": 3}) is None  # already right
    assert apply_thread_counts(body, {"$elsewhere": 1}) is None


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(2, 50), min_size=1, max_size=6), fix=st.data())
def test_found_and_applied_agree(counts: list[int], fix: st.DataObject) -> None:
    roots = [root(f"$r{i}", count) for i, count in enumerate(counts)]
    body = sync(*roots)
    found = find_thread_counts(body)
    assert {t.root_id: t.count for t in found} == {f"$r{i}": c for i, c in enumerate(counts)}
    wanted = {t.root_id: fix.draw(st.integers(1, t.count)) for t in found}
    out = apply_thread_counts(body, wanted) or body
    again = {t.root_id: t.count for t in find_thread_counts(out)}
    assert again == {root_id: count for root_id, count in wanted.items() if count > 1}


def test_thread_count_value_is_a_value_type() -> None:
    assert ThreadCount(ROOM, "$r", "$l", 2, b"{}") == ThreadCount(ROOM, "$r", "$l", 2, b"{}")
