"""A scripted homeserver for the proxy's rules in detail, served on a real local socket
to the proxy as production assembles it (``build_app``).

It knows tokens, account data and canned answers; it never filters anything itself,
like Conduit. Real homeservers are the end-to-end tests' (``tests/e2e``).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

import httpx

from ignore_proxy.app import IgnoreProxyApp, create_app
from ignore_proxy.config import load_settings

from .servers import HandlerResult, handler_app, serve_handler

ALICE, BOB, CHARLIE, DAVE = "@alice:hs", "@bob:hs", "@charlie:hs", "@dave:hs"
ROOM = "!room:hs"

Handler = Callable[[httpx.Request], httpx.Response]


def message(event_id: str, sender: str, body: str = "hi", **extra: Any) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "event_id": event_id,
        "sender": sender,
        "content": {"msgtype": "m.text", "body": body},
        "origin_server_ts": 1,
        "room_id": ROOM,
        **extra,
    }


def state(event_id: str, sender: str, type_: str = "m.room.topic", key: str = "") -> dict[str, Any]:
    return {
        "type": type_,
        "event_id": event_id,
        "sender": sender,
        "state_key": key,
        "content": {"topic": "t"},
        "origin_server_ts": 1,
        "room_id": ROOM,
    }


@dataclass
class FakeHomeserver:
    tokens: dict[str, str] = field(
        default_factory=lambda: {
            "alice-token": ALICE,
            "alice-phone": ALICE,
            "bob-token": BOB,
            "charlie-token": CHARLIE,
        }
    )
    appservice_token: str = "as-token"
    account_data: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Canned answers by (method, path after /_matrix/client/{version}); a callable gets
    # the request.
    answers: dict[tuple[str, str], Any] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    requests: list[httpx.Request] = field(default_factory=list)
    account_data_status: int = 200
    # Answers whatever no canned answer matched (None: 404 M_UNRECOGNIZED).
    fallback: Handler | None = None

    def ignore(self, user: str, *ignored: str) -> None:
        self.account_data[user] = {"ignored_users": {uid: {} for uid in ignored}}

    def user_of(self, request: httpx.Request) -> str | None:
        auth = request.headers.get("authorization", "")
        query = parse_qs(request.url.query.decode())
        scheme, _, header_token = auth.partition(" ")
        token = header_token if scheme.lower() == "bearer" else query.get("access_token", [""])[0]
        if token == self.appservice_token:
            return query.get("user_id", ["@as_bot:hs"])[0]
        return self.tokens.get(token)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        return self.answer(request)

    def answer(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = client_path(request.url.raw_path.split(b"?")[0].decode())
        user = self.user_of(request)
        if path == "/versions":
            return httpx.Response(
                200, json={"versions": ["v1.11"], "unstable_features": {"a": True}}
            )
        if user is None:
            self.calls["unauthorized"] += 1
            return httpx.Response(401, json={"errcode": "M_UNKNOWN_TOKEN", "error": "no"})
        if path == "/account/whoami":
            self.calls["whoami"] += 1
            return httpx.Response(200, json={"user_id": user, "device_id": "D"})
        if path.startswith("/user/") and "/account_data/m.ignored_user_list" in path:
            return self._ignore_list(request, user, unquote(path.split("/")[2]))
        answer = self.answers.get((request.method, path), self.fallback)
        if callable(answer):
            result: httpx.Response = answer(request)
            return result
        if answer is None:
            return httpx.Response(404, json={"errcode": "M_UNRECOGNIZED", "error": path})
        return httpx.Response(
            200,
            content=answer if isinstance(answer, bytes) else json.dumps(answer).encode(),
            headers={"content-type": "application/json"},
        )

    def _ignore_list(self, request: httpx.Request, user: str, target: str) -> httpx.Response:
        if target != user:
            return httpx.Response(403, json={"errcode": "M_FORBIDDEN", "error": "not you"})
        if request.method == "GET":
            self.calls["account_data"] += 1
            if self.account_data_status != 200:
                return httpx.Response(self.account_data_status, json={"errcode": "M_UNKNOWN"})
            if user not in self.account_data:
                return httpx.Response(404, json={"errcode": "M_NOT_FOUND", "error": "none"})
            return httpx.Response(200, json=self.account_data[user])
        self.calls["account_data_write"] += 1
        if request.method == "DELETE":
            self.account_data.pop(user, None)
        else:
            self.account_data[user] = json.loads(request.content)
        return httpx.Response(200, json={})


def client_path(raw_path: str) -> str:
    """`/_matrix/client/v3/rooms/...` -> `/rooms/...`; other paths stay as they are."""
    prefix = "/_matrix/client/"
    if not raw_path.startswith(prefix):
        return raw_path
    parts = raw_path[len(prefix) :].split("/")
    if parts[0] in ("r0", "v1", "v3", "v4", "unstable"):
        parts = parts[1:]
    if parts and "." in parts[0]:
        parts = parts[1:]
    return "/" + "/".join(unquote(part) for part in parts)


def build_app(homeserver: Callable[[httpx.Request], HandlerResult], **env: str) -> IgnoreProxyApp:
    """The proxy as production assembles it (its own upstream pool), in front of
    ``homeserver`` served on a real local socket. Call it inside the test's event loop."""
    environ = {f"IGNORE_PROXY_{key.upper()}": value for key, value in env.items()}
    upstream = serve_handler(homeserver)
    return create_app(load_settings(environ={"IGNORE_PROXY_UPSTREAM": upstream, **environ}))


def client_for(app: IgnoreProxyApp, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://proxy.test", headers=headers
    )


def asgi_app(homeserver: FakeHomeserver, *, long_poll_hold: float = 0.0) -> Any:
    """``homeserver`` as an ASGI app, for a server of its own (``servers.serve_upstream``,
    another process). A ``/sync`` with ``?timeout=`` waits ``long_poll_hold`` seconds
    first, like a long-poll with nothing new."""

    async def answer(request: httpx.Request) -> httpx.Response:
        long_poll = request.url.path.endswith("/sync") and b"timeout=" in request.url.query
        if long_poll and long_poll_hold:
            await asyncio.sleep(long_poll_hold)
        return homeserver(request)

    return handler_app(answer, "http://hs.test")
