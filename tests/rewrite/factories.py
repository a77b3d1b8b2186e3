"""Builders of realistic Matrix bodies for the rewriter tests."""

from __future__ import annotations

import itertools
import json
from typing import Any

from ignore_proxy.rewrite import IgnoreContext

ME = "@me:example.org"
ALICE = "@alice:example.org"
BOB = "@bob:matrix.example"
SPAM = "@spam:evil.example"
TROLL = "@troll:evil.example"
IGNORED = frozenset({SPAM, TROLL})
CTX = IgnoreContext(ignored=IGNORED, user_id=ME)
CTX_NO_EPHEMERAL = IgnoreContext(ignored=IGNORED, user_id=ME, filter_ephemeral=False)
ROOM = "!room:example.org"

_ids = itertools.count()
_MISSING: Any = object()


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def loads(data: bytes) -> Any:
    return json.loads(data)


def event(
    sender: str,
    *,
    type: str = "m.room.message",
    state_key: Any = _MISSING,
    content: Any = None,
    unsigned: Any = None,
    event_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "type": type,
        "sender": sender,
        "event_id": event_id or f"$ev{next(_ids)}",
        "room_id": ROOM,
        "origin_server_ts": 1700000000000,
        "content": content if content is not None else {"msgtype": "m.text", "body": "hello"},
    }
    if state_key is not _MISSING:
        ev["state_key"] = state_key
    if unsigned is not None:
        ev["unsigned"] = unsigned
    ev.update(extra)
    return ev


def state(sender: str, type: str = "m.room.name", state_key: str = "", **kw: Any) -> dict[str, Any]:
    kw.setdefault("content", {"name": "A room"})
    return event(sender, type=type, state_key=state_key, **kw)


def member(sender: str, target: str, membership: str, **kw: Any) -> dict[str, Any]:
    return event(
        sender, type="m.room.member", state_key=target, content={"membership": membership}, **kw
    )


def thread_unsigned(latest_sender: str, count: int = 2, **extra: Any) -> dict[str, Any]:
    return {
        "age": 1234,
        "m.relations": {
            "m.thread": {
                "latest_event": event(latest_sender, content={"body": "reply"}),
                "count": count,
                "current_user_participated": False,
            },
            **extra,
        },
    }


def ids(events: list[dict[str, Any]]) -> list[str]:
    return [e["event_id"] for e in events]


def sync_body(
    join: dict[str, list[dict[str, Any]]] | None = None,
    *,
    leave: dict[str, list[dict[str, Any]]] | None = None,
    invite: dict[str, list[dict[str, Any]]] | None = None,
    ephemeral: dict[str, list[dict[str, Any]]] | None = None,
    room_state: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    rooms: dict[str, Any] = {"join": {}, "leave": {}, "invite": {}}
    for room_id, events in (join or {}).items():
        rooms["join"][room_id] = {
            "timeline": {"events": events, "limited": True, "prev_batch": f"t_{room_id}"},
            "state": {"events": (room_state or {}).get(room_id, [])},
            "ephemeral": {"events": (ephemeral or {}).get(room_id, [])},
            "account_data": {"events": []},
            "unread_notifications": {"highlight_count": 0, "notification_count": 3},
        }
    for room_id, events in (leave or {}).items():
        rooms["leave"][room_id] = {
            "timeline": {"events": events, "limited": False, "prev_batch": f"l_{room_id}"},
            "state": {"events": []},
        }
    for room_id, events in (invite or {}).items():
        rooms["invite"][room_id] = {"invite_state": {"events": events}}
    return {
        "next_batch": "s72595_4483_1934",
        "rooms": rooms,
        "presence": {"events": [{"type": "m.presence", "sender": ALICE, "content": {}}]},
        "account_data": {"events": []},
        "to_device": {"events": []},
    }


def stripped_invite(sender: str, target: str = ME) -> list[dict[str, Any]]:
    return [
        {"type": "m.room.name", "sender": ALICE, "state_key": "", "content": {"name": "Hi"}},
        {
            "type": "m.room.member",
            "sender": sender,
            "state_key": target,
            "content": {"membership": "invite"},
        },
    ]


def typing(*user_ids: str) -> dict[str, Any]:
    return {"type": "m.typing", "content": {"user_ids": list(user_ids)}}


def receipt(content: dict[str, Any]) -> dict[str, Any]:
    return {"type": "m.receipt", "content": content}
