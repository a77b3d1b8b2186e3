"""Canned, realistic homeserver answers, generated deterministically (fixed seed).

About 10% of timeline events come from the ignored user, some of them state events
(which the filter keeps); text carries `\\uXXXX` escapes as Synapse writes them.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

USER = "@alice:bench.example"
IGNORED = "@spam:bench.example"
TOKEN = "syt_YmVuY2g_benchmarktoken_0abc"
ROOM = "!benchroom:bench.example"

WHOAMI = {"user_id": USER, "device_id": "BENCHDEV", "is_guest": False}
IGNORE_LIST: dict[str, Any] = {"ignored_users": {IGNORED: {}}}
PUSHRULES: dict[str, Any] = {"global": {"content": [], "override": [], "room": [], "sender": [],
                                  "underride": []}}  # fmt: skip

_WORDS = [
    "hello", "world", "matrix", "proxy", "sync", "room", "event", "ignore", "filter",
    "message", "reply", "thread", "caf\u00e9", "na\u00efve", "\u2603", "\U0001f600",
    "lorem", "ipsum", "dolor", "sit", "amet",
]  # fmt: skip


def _dumps(value: object) -> bytes:
    # Synapse writes ASCII-only JSON with compact separators.
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode()


class _Gen:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.n = 0
        self.users = [f"@user{i}:bench.example" for i in range(60)]

    def text(self, lo: int, hi: int) -> str:
        return " ".join(self.rng.choice(_WORDS) for _ in range(self.rng.randint(lo, hi)))

    def sender(self) -> str:
        return IGNORED if self.rng.random() < 0.10 else self.rng.choice(self.users)

    def event(self, room_id: str, sender: str | None = None) -> dict[str, object]:
        self.n += 1
        sender = sender or self.sender()
        ts = 1_700_000_000_000 + self.n * 1234
        base: dict[str, object] = {
            "event_id": f"${self.rng.getrandbits(160):040x}",
            "origin_server_ts": ts,
            "sender": sender,
            "unsigned": {"age": self.rng.randint(10, 10_000_000)},
        }
        kind = self.rng.random()
        if kind < 0.12:  # a state event (also from the ignored user: kept by the filter)
            base.update(
                type="m.room.member",
                state_key=sender,
                content={"membership": "join", "displayname": self.text(1, 3),
                         "avatar_url": f"mxc://bench.example/{self.rng.getrandbits(64):016x}"},
            )  # fmt: skip
        elif kind < 0.20:
            base.update(
                type="m.reaction",
                content={"m.relates_to": {"rel_type": "m.annotation", "key": "\U0001f44d",
                                          "event_id": f"${self.rng.getrandbits(160):040x}"}},
            )  # fmt: skip
        else:
            body = self.text(5, 60)
            content: dict[str, object] = {"msgtype": "m.text", "body": body}
            if self.rng.random() < 0.3:
                content["format"] = "org.matrix.custom.html"
                content["formatted_body"] = f"<p>{body}</p>"
            base.update(type="m.room.message", content=content)
        return base

    def room(self, i: int) -> tuple[str, dict[str, object]]:
        room_id = f"!room{i:05d}:bench.example"
        timeline = [self.event(room_id) for _ in range(self.rng.randint(6, 14))]
        state = [self.event(room_id, self.rng.choice(self.users)) for _ in range(2)]
        for ev in state:
            ev["type"], ev["state_key"] = "m.room.member", ev["sender"]
            ev["content"] = {"membership": "join"}
        typing = self.rng.sample(self.users, 2) + ([IGNORED] if i % 5 == 0 else [])
        receipts = {
            timeline[-1]["event_id"]: {
                "m.read": {u: {"ts": 1_700_000_000_000 + i} for u in self.rng.sample(self.users, 3)}
            }
        }
        return room_id, {
            "timeline": {"events": timeline, "limited": True, "prev_batch": f"t{i}-{self.n}"},
            "state": {"events": state},
            "ephemeral": {"events": [{"type": "m.typing", "content": {"user_ids": typing}},
                                     {"type": "m.receipt", "content": receipts}]},
            "account_data": {"events": []},
            "unread_notifications": {"highlight_count": 0, "notification_count": i % 7},
            "summary": {"m.joined_member_count": 20 + i % 50},
        }  # fmt: skip


def sync_body(size: int, seed: int) -> bytes:
    gen = _Gen(seed)
    join: dict[str, object] = {}
    body: dict[str, object] = {
        "next_batch": f"s{seed}_1234_5_6",
        "account_data": {"events": [
            {"type": "m.ignored_user_list", "content": IGNORE_LIST},
            {"type": "m.push_rules", "content": PUSHRULES},
        ]},
        "presence": {"events": []},
        "to_device": {"events": []},
        "device_lists": {"changed": [], "left": []},
        "device_one_time_keys_count": {"signed_curve25519": 50},
        "rooms": {"join": join, "invite": {}, "leave": {}},
    }  # fmt: skip
    i = 0
    estimate = 0
    while estimate < size:
        room_id, room = gen.room(i)
        join[room_id] = room
        estimate += len(_dumps(room)) + len(room_id) + 4
        i += 1
    return _dumps(body)


def messages_body(size: int, seed: int) -> bytes:
    gen = _Gen(seed)
    chunk: list[object] = []
    while len(_dumps(chunk)) < size - 200:
        chunk.append(gen.event(ROOM))
    return _dumps({"chunk": chunk, "start": "t100-200_0_0", "end": "t90-190_0_0", "state": []})


def empty_sync() -> bytes:
    return _dumps({"next_batch": "s2_0_0", "rooms": {}, "presence": {"events": []}})


def write_all(directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "sync_1m.json": sync_body(1_000_000, 1),
        "sync_8m.json": sync_body(8_000_000, 8),
        "messages.json": messages_body(18_000, 18),
        "whoami.json": _dumps(WHOAMI),
        "ignored.json": _dumps(IGNORE_LIST),
        "pushrules.json": _dumps(PUSHRULES),
        "empty_sync.json": empty_sync(),
        "media.bin": random.Random(1024).randbytes(1024 * 1024),
    }
    paths = {}
    for name, data in files.items():
        path = directory / name
        path.write_bytes(data)
        os.chmod(path, 0o644)
        paths[name] = path
    return paths
