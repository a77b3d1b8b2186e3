"""Matrix users for the tests: matrix-nio for writes and logins, raw httpx for reads.

Reads go through httpx so the assertions see the exact JSON the proxy produced.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
from nio import (
    AsyncClient,
    AsyncClientConfig,
    JoinResponse,
    LoginResponse,
    RoomCreateResponse,
    RoomInviteResponse,
    RoomPutStateResponse,
    RoomSendResponse,
)

from .synapse import RegisteredUser

JSON = dict[str, Any]
CS = "/_matrix/client/v3"
IGNORE_LIST = "m.ignored_user_list"


def q(value: str) -> str:
    """Percent-encode one path segment (user, room and event IDs)."""
    return quote(value, safe="")


@dataclass
class Actor:
    """One logged-in device of one user, talking to one base URL."""

    user: RegisteredUser
    base_url: str
    http: httpx.AsyncClient
    access_token: str
    device_id: str
    nio: AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self.nio = AsyncClient(
            self.base_url,
            self.user.user_id,
            device_id=self.device_id,
            config=AsyncClientConfig(store_sync_tokens=False, encryption_enabled=False),
        )
        self.nio.access_token = self.access_token
        self.nio.user_id = self.user.user_id

    @property
    def user_id(self) -> str:
        return self.user.user_id

    async def close(self) -> None:
        await self.nio.close()

    # -- raw requests -------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        token_in_query: bool = False,
        timeout_s: float = 30.0,
    ) -> httpx.Response:
        headers: dict[str, str] = {}
        params = dict(params or {})
        if token_in_query:
            params["access_token"] = self.access_token
        else:
            headers["Authorization"] = f"Bearer {self.access_token}"
        return await self.http.request(
            method,
            self.base_url + path,
            json=json,
            params=params,
            headers=headers,
            timeout=timeout_s,
        )

    async def get_json(self, path: str, **kwargs: Any) -> JSON:
        resp = await self.request("GET", path, **kwargs)
        assert resp.status_code == 200, f"GET {path}: {resp.status_code} {resp.text}"
        body: JSON = resp.json()
        return body

    async def sync(
        self,
        since: str | None = None,
        timeout_ms: int = 0,
        *,
        prefix: str = CS,
        token_in_query: bool = False,
        filter_json: str | None = None,
    ) -> JSON:
        params: dict[str, Any] = {"timeout": str(timeout_ms)}
        if since:
            params["since"] = since
        if filter_json:
            params["filter"] = filter_json
        resp = await self.request(
            "GET",
            f"{prefix}/sync",
            params=params,
            token_in_query=token_in_query,
            timeout_s=timeout_ms / 1000 + 30,
        )
        assert resp.status_code == 200, f"sync: {resp.status_code} {resp.text}"
        body: JSON = resp.json()
        return body

    async def set_ignored(self, users: Iterable[str]) -> None:
        resp = await self.request(
            "PUT",
            f"{CS}/user/{q(self.user_id)}/account_data/{IGNORE_LIST}",
            json={"ignored_users": {u: {} for u in users}},
        )
        assert resp.status_code == 200, f"ignore list: {resp.status_code} {resp.text}"

    # -- writes through matrix-nio ------------------------------------------------------

    async def create_room(self, **kwargs: Any) -> str:
        resp = await self.nio.room_create(**kwargs)
        assert isinstance(resp, RoomCreateResponse), resp
        room_id: str = resp.room_id
        return room_id

    async def invite(self, room_id: str, user_id: str) -> None:
        resp = await self.nio.room_invite(room_id, user_id)
        assert isinstance(resp, RoomInviteResponse), resp

    async def join(self, room_id: str) -> None:
        resp = await self.nio.join(room_id)
        assert isinstance(resp, JoinResponse), resp

    async def send_text(self, room_id: str, body: str, **extra: Any) -> str:
        content: JSON = {"msgtype": "m.text", "body": body, **extra}
        resp = await self.nio.room_send(room_id, "m.room.message", content)
        assert isinstance(resp, RoomSendResponse), resp
        event_id: str = resp.event_id
        return event_id

    async def send_event(self, room_id: str, event_type: str, content: JSON) -> str:
        resp = await self.nio.room_send(room_id, event_type, content)
        assert isinstance(resp, RoomSendResponse), resp
        event_id: str = resp.event_id
        return event_id

    async def put_state(
        self, room_id: str, event_type: str, content: JSON, state_key: str = ""
    ) -> str:
        resp = await self.nio.room_put_state(room_id, event_type, content, state_key)
        assert isinstance(resp, RoomPutStateResponse), resp
        event_id: str = resp.event_id
        return event_id


async def login_new_device(http: httpx.AsyncClient, base_url: str, user: RegisteredUser) -> Actor:
    """A second device of ``user``: password login through matrix-nio."""
    client = AsyncClient(base_url, user.user_id)
    try:
        resp = await client.login(user.password, device_name="e2e second device")
        assert isinstance(resp, LoginResponse), resp
    finally:
        await client.close()
    return Actor(user, base_url, http, resp.access_token, resp.device_id)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# -- reading responses ------------------------------------------------------------------


def timeline(sync: JSON, room_id: str, section: str = "join") -> list[JSON]:
    room = sync.get("rooms", {}).get(section, {}).get(room_id, {})
    events: list[JSON] = room.get("timeline", {}).get("events", [])
    return events


def room_state(sync: JSON, room_id: str) -> list[JSON]:
    room = sync.get("rooms", {}).get("join", {}).get(room_id, {})
    events: list[JSON] = list(room.get("state", {}).get("events", []))
    events += room.get("state_after", {}).get("events", [])
    return events


def event_ids(events: Iterable[JSON]) -> set[str]:
    return {e["event_id"] for e in events if "event_id" in e}


def senders(events: Iterable[JSON]) -> set[str]:
    return {e["sender"] for e in events if "sender" in e}


def non_state(events: Iterable[JSON]) -> Iterator[JSON]:
    return (e for e in events if "state_key" not in e)


async def sync_until(
    actor: Actor,
    since: str | None,
    room_id: str,
    sentinel_event_id: str,
    *,
    deadline_s: float = 15.0,
    **kwargs: Any,
) -> tuple[list[JSON], str]:
    """Incremental syncs until ``sentinel_event_id`` shows up in ``room_id``'s timeline.

    Returns every timeline event seen on the way (sentinel included) and the last token.
    """
    seen: list[JSON] = []
    end = time.monotonic() + deadline_s
    token = since
    while True:
        body = await actor.sync(token, timeout_ms=2000, **kwargs)
        token = body["next_batch"]
        seen += timeline(body, room_id)
        if sentinel_event_id in event_ids(seen):
            return seen, token
        if time.monotonic() > end:
            raise AssertionError(f"sentinel {sentinel_event_id} never arrived; saw {seen}")
        await asyncio.sleep(0)
