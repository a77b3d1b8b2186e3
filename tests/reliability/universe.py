"""A room where 100 users talk, each ignoring others; the fake homeserver (which filters
nothing) answers every filtered endpoint of the route table with everyone's events.
`check` says, for one user and one answer, which events leaked and which were wrongly
removed."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import httpx

from ..fake_homeserver import FakeHomeserver, client_path

ROOM = "!room:hs"
ANCHOR = "@anchor:hs"  # nobody ignores them: the parent/target of path-event routes


def uid(i: int) -> str:
    return f"@u{i}:hs"


def token(i: int) -> str:
    return f"u{i}-token"


def msg(sender: str, ts: int) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "event_id": f"$m-{sender}",
        "sender": sender,
        "room_id": ROOM,
        "content": {"msgtype": "m.text", "body": f"from {sender}"},
        "origin_server_ts": ts,
    }


def st(sender: str) -> dict[str, Any]:
    return {
        "type": "m.room.member",
        "event_id": f"$s-{sender}",
        "sender": sender,
        "room_id": ROOM,
        "state_key": sender,
        "content": {"membership": "join"},
        "origin_server_ts": 0,
    }


@dataclass
class Universe:
    users: int = 100
    seed: int = 8
    ignores: dict[str, frozenset[str]] = field(default_factory=dict)
    homeserver: FakeHomeserver = field(default_factory=FakeHomeserver)
    _cache: dict[tuple[str, str], tuple[int, bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        everyone = [uid(i) for i in range(self.users)]
        self.senders = [ANCHOR, *everyone]
        self.messages = [msg(s, ts) for ts, s in enumerate(self.senders)]
        self.states = [st(s) for s in self.senders]
        self.by_id = {e["event_id"]: e for e in self.messages + self.states}
        hs = self.homeserver
        for i, user in enumerate(everyone):
            hs.tokens[token(i)] = user
            others = [u for u in everyone if u != user]
            ignored = (
                frozenset(rng.sample(others, rng.randint(0, min(12, len(others)))))
                if i % 10
                else frozenset()
            )
            self.ignores[user] = ignored
            if ignored:
                hs.ignore(user, *sorted(ignored))
        hs.fallback = self.answer

    def answer(self, request: httpx.Request) -> httpx.Response:
        path = client_path(request.url.raw_path.split(b"?")[0].decode())
        key = (request.method, path)
        if "timestamp_to_event" not in path:
            if key not in self._cache:
                self._cache[key] = self._answer(request, path)
            status, content = self._cache[key]
            return httpx.Response(
                status, content=content, headers={"content-type": "application/json"}
            )
        status, content = self._answer(request, path)
        return httpx.Response(status, content=content, headers={"content-type": "application/json"})

    def _answer(self, request: httpx.Request, path: str) -> tuple[int, bytes]:
        parts = path.split("/")
        m, s = self.messages, self.states
        body: Any
        if path == "/sync" and request.method == "GET":
            body = {
                "next_batch": "n",
                "rooms": {
                    "join": {
                        ROOM: {
                            "timeline": {"events": [*m, *s], "limited": False},
                            "state": {"events": s},
                        }
                    }
                },
            }
        elif path == "/sync":
            body = {"pos": "1", "rooms": {ROOM: {"timeline": [*m, *s], "required_state": s}}}
        elif parts[1:2] == ["rooms"] and len(parts) > 3:
            rest = parts[3:]
            if rest[0] == "messages":
                body = {"chunk": [*m, *s], "start": "a", "end": "b", "state": s}
            elif rest[0] == "context":
                body = {
                    "event": self.by_id[rest[1]],
                    "events_before": m,
                    "events_after": s,
                    "state": s,
                    "start": "a",
                    "end": "b",
                }
            elif rest[0] == "event":
                body = self.by_id.get(rest[1])
                if body is None:
                    return 404, b'{"errcode": "M_NOT_FOUND", "error": "?"}'
            elif rest[0] == "relations":
                body = {"chunk": [*m, *s], "next_batch": "x"}
            elif rest[0] == "threads":
                body = {"chunk": m}
            elif rest[0] == "initialSync":
                body = {
                    "room_id": ROOM,
                    "membership": "join",
                    "messages": {"chunk": [*m, *s], "start": "a", "end": "b"},
                    "state": s,
                }
            elif rest[0] == "timestamp_to_event":
                query = parse_qs(request.url.query.decode())
                ts, forward = int(query["ts"][0]), query.get("dir", ["f"])[0] == "f"
                found = [
                    e
                    for e in m
                    if (e["origin_server_ts"] >= ts if forward else e["origin_server_ts"] <= ts)
                ]
                if not found:
                    return 404, b'{"errcode": "M_NOT_FOUND", "error": "none"}'
                event = found[0] if forward else found[-1]
                body = {
                    "event_id": event["event_id"],
                    "origin_server_ts": event["origin_server_ts"],
                }
            else:
                return 404, b'{"errcode": "M_UNRECOGNIZED", "error": "no"}'
        elif parts[1:2] == ["events"] and len(parts) == 3:
            body = self.by_id.get(parts[2])
            if body is None:
                return 404, b'{"errcode": "M_NOT_FOUND", "error": "?"}'
        elif path == "/events":
            body = {"chunk": [*m, *s], "start": "a", "end": "b"}
        elif path == "/search":
            results = [{"rank": 1.0, "result": e} for e in m + s]
            body = {"search_categories": {"room_events": {"results": results, "count": 1}}}
        elif path == "/event_relationships" and request.method == "POST":
            body = {"events": [*m, *s], "limited": False}
        elif path == "/notifications":
            body = {
                "notifications": [
                    {"event": e, "room_id": ROOM, "actions": [], "read": False, "ts": 1} for e in m
                ]
            }
        elif path == "/initialSync":
            body = {
                "end": "e",
                "presence": [],
                "rooms": [
                    {
                        "room_id": ROOM,
                        "membership": "join",
                        "state": s,
                        "messages": {"chunk": [*m, *s], "start": "a", "end": "b"},
                    }
                ],
            }
        else:
            return 404, b'{"errcode": "M_UNRECOGNIZED", "error": "no"}'
        return 200, json.dumps(body).encode()

    # --- what each user must see -------------------------------------------------------

    def requests(self) -> list[tuple[str, str, str, Any]]:
        """(name, method, path, json body) of one request per filtered endpoint."""
        v3, v1 = "/_matrix/client/v3", "/_matrix/client/v1"
        room = f"{v3}/rooms/{ROOM}"
        anchor = f"$m-{ANCHOR}"
        return [
            ("sync", "GET", f"{v3}/sync", None),
            (
                "sliding_sync",
                "POST",
                "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
                {},
            ),
            ("messages", "GET", f"{room}/messages", None),
            ("context", "GET", f"{room}/context/{anchor}", None),
            ("events", "GET", f"{v3}/events", None),
            ("relations", "GET", f"{v1}/rooms/{ROOM}/relations/{anchor}", None),
            ("relations", "GET", f"{v1}/rooms/{ROOM}/relations/{anchor}/m.thread", None),
            (
                "relations",
                "GET",
                f"{v1}/rooms/{ROOM}/relations/{anchor}/m.thread/m.room.message",
                None,
            ),
            ("threads", "GET", f"{v1}/rooms/{ROOM}/threads", None),
            ("search", "POST", f"{v3}/search", {"search_categories": {"room_events": {}}}),
            ("notifications", "GET", f"{v3}/notifications", None),
            ("initial_sync", "GET", f"{v3}/initialSync", None),
            ("room_initial_sync", "GET", f"{room}/initialSync", None),
        ]

    def single_event_paths(self, rng: random.Random, user: str) -> list[tuple[str, str]]:
        """(event_id, path) for a few single-event requests, ignored senders' among them."""
        ignored = sorted(self.ignores[user])
        picks = rng.sample(self.senders, 3) + rng.sample(ignored, min(2, len(ignored)))
        out = []
        for sender in picks:
            for event_id in (f"$m-{sender}", f"$s-{sender}"):
                out.append((event_id, f"/_matrix/client/v3/rooms/{ROOM}/event/{event_id}"))
                out.append((event_id, f"/_matrix/client/v3/events/{event_id}"))
                out.append((event_id, f"/_matrix/client/v3/rooms/{ROOM}/context/{event_id}"))
        return out


@dataclass
class Verdict:
    leaked: list[str] = field(default_factory=list)
    wrongly_removed: list[str] = field(default_factory=list)


def events_in(value: Any) -> list[dict[str, Any]]:
    """Every object with an event_id and a sender, anywhere in a JSON value."""
    found: list[dict[str, Any]] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("event_id"), str) and "sender" in item:
                found.append(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def check(
    universe: Universe, user: str, name: str, sent: list[dict[str, Any]], got: Any
) -> Verdict:
    """Compare the events upstream sent (`events_in` of its answer) with what the user got,
    by event id (with multiplicity)."""
    ignored = universe.ignores[user]
    verdict = Verdict()
    got_ids: dict[str, int] = {}
    for event in events_in(got):
        eid = event["event_id"]
        got_ids[eid] = got_ids.get(eid, 0) + 1
        hidden = event["sender"] in ignored and "state_key" not in event
        if hidden:  # thread roots of ignored senders are dropped too, as Synapse does
            verdict.leaked.append(f"{name}:{eid}")
    want: dict[str, int] = {}
    for event in sent:
        hidden = event["sender"] in ignored and "state_key" not in event
        if not hidden:
            want[event["event_id"]] = want.get(event["event_id"], 0) + 1
    for eid, count in want.items():
        if got_ids.get(eid, 0) < count:
            verdict.wrongly_removed.append(f"{name}:{eid}")
    return verdict
