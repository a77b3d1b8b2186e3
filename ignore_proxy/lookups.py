"""Questions the proxy asks the homeserver itself, as the user, when an answer names an
event without showing who sent it (the parent of `/relations`, `timestamp_to_event`)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from urllib.parse import quote

import httpx
import msgspec

from .identity import Credentials
from .rewrite import StaleThread, ThreadCount

log = logging.getLogger(__name__)

# How far timestamp_to_event may step past events of ignored senders before giving up.
MAX_STEPS = 20
# Thread replies read to find a thread's latest un-ignored reply (and count the rest).
THREAD_WINDOW = 100


class _Head(msgspec.Struct):
    sender: str = ""
    state_key: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


class _Chunk(msgspec.Struct):
    chunk: list[msgspec.Raw] = []


class _Found(msgspec.Struct):
    event_id: str
    origin_server_ts: int


@dataclass(frozen=True, slots=True)
class EventHead:
    sender: str | None  # None: the homeserver will not show this event to the user
    is_state: bool = False


HIDDEN = EventHead(None)


def _room_path(version: str, room_id: str, *rest: str) -> str:
    parts = "/".join(quote(part, safe="") for part in (room_id, *rest))
    return f"/_matrix/client/{version}/rooms/{parts}"


class LookupFailed(Exception):
    """The homeserver could not say who sent an event (down, 5xx, or garbage)."""


async def fetch_event_head(
    client: httpx.AsyncClient, creds: Credentials, room_id: str, event_id: str
) -> EventHead:
    """Who sent an event: HIDDEN if the homeserver will not show it to the user."""
    try:
        response = await client.get(
            _room_path("v3", room_id, "event", event_id),
            headers=creds.auth_headers(),
            params=creds.query_params(),
        )
    except httpx.TransportError as exc:
        raise LookupFailed(type(exc).__name__) from None
    if 400 <= response.status_code < 500:
        return HIDDEN
    if response.status_code != 200:
        raise LookupFailed(f"status {response.status_code}")
    try:
        head = msgspec.json.decode(response.content, type=_Head)
    except msgspec.DecodeError:
        raise LookupFailed("not an event") from None
    return EventHead(head.sender, head.state_key is not msgspec.UNSET)


async def fetch_filter(
    client: httpx.AsyncClient, creds: Credentials, user_id: str, filter_id: str, limit: int
) -> bytes | None:
    """A stored filter's definition; None if the homeserver has no such filter for the
    user (it answers the request with 400 M_INVALID_PARAM then)."""
    path = f"/_matrix/client/v3/user/{quote(user_id, safe='')}/filter/{quote(filter_id, safe='')}"
    try:
        response = await client.get(path, headers=creds.auth_headers(), params=creds.query_params())
    except httpx.TransportError as exc:
        raise LookupFailed(type(exc).__name__) from None
    if response.status_code in (400, 404):
        return None
    if response.status_code != 200 or len(response.content) > limit:
        raise LookupFailed(f"filter: status {response.status_code}")
    return response.content


async def nearest_unignored_event(
    client: httpx.AsyncClient,
    creds: Credentials,
    room_id: str,
    query: dict[str, str],
    answer: bytes,
    ignored: frozenset[str],
) -> bytes | None:
    """Step past events of ignored senders in the direction asked; None if none is left.
    LookupFailed when the homeserver cannot tell: the answer is never given unchecked."""
    direction = query.get("dir", "f")
    step = 1 if direction == "f" else -1
    for _ in range(MAX_STEPS):
        try:
            found = msgspec.json.decode(answer, type=_Found)
        except msgspec.DecodeError:
            return answer  # not an answer we understand; nothing of a sender in it either
        head = await fetch_event_head(client, creds, room_id, found.event_id)
        # An event the homeserver hides from the user (as Synapse does with ignored
        # senders' events) must not be the answer either.
        if head.is_state or (head.sender is not None and head.sender not in ignored):
            return answer
        params = {**query, **creds.query_params(), "ts": str(found.origin_server_ts + step)}
        params.pop("access_token", None)
        try:
            response = await client.get(
                _room_path("v1", room_id, "timestamp_to_event"),
                headers=creds.auth_headers(),
                params=params,
            )
        except httpx.TransportError as exc:
            raise LookupFailed(type(exc).__name__) from None
        if response.status_code >= 500:
            raise LookupFailed(f"status {response.status_code}")
        if response.status_code != 200:
            return None
        answer = response.content
    return None


async def thread_summaries(
    client: httpx.AsyncClient,
    creds: Credentials,
    stale: tuple[StaleThread, ...],
    ignored: frozenset[str],
) -> dict[str, bytes | None]:
    """New `m.thread` summaries for threads whose latest reply is an ignored user's:
    the latest reply of someone else, and a count without ignored users' replies."""
    found = await asyncio.gather(*(_thread_summary(client, creds, t, ignored) for t in stale))
    return {thread.root_id: summary for thread, summary in zip(stale, found, strict=True)}


async def _thread_summary(
    client: httpx.AsyncClient, creds: Credentials, stale: StaleThread, ignored: frozenset[str]
) -> bytes | None:
    try:
        summary = msgspec.json.decode(stale.summary, type=dict[str, msgspec.Raw])
        count = msgspec.json.decode(summary.get("count", b"0"))
        response = await client.get(
            _room_path("v1", stale.room_id, "relations", stale.root_id, "m.thread"),
            headers=creds.auth_headers(),
            params={**creds.query_params(), "dir": "b", "limit": str(THREAD_WINDOW)},
        )
        if response.status_code != 200:
            return None
        replies = msgspec.json.decode(response.content, type=_Chunk).chunk
        heads = [msgspec.json.decode(reply, type=_Head) for reply in replies]
    except (httpx.TransportError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    hidden = [h.sender in ignored and h.state_key is msgspec.UNSET for h in heads]
    latest = next((reply for reply, gone in zip(replies, hidden, strict=True) if not gone), None)
    if latest is None:
        return None  # nobody but ignored users replied (as far as the window shows)
    summary["latest_event"] = latest
    if isinstance(count, int) and not isinstance(count, bool):
        summary["count"] = msgspec.Raw(str(max(count - sum(hidden), 1)).encode())
    return msgspec.json.encode(summary)


async def thread_count(
    client: httpx.AsyncClient, creds: Credentials, seen: ThreadCount, ignored: frozenset[str]
) -> int | None:
    """How many replies of a thread the user sees: the summary's count less the ignored
    users' replies among the latest THREAD_WINDOW. None if the homeserver cannot say."""
    summary = await _thread_summary(
        client, creds, StaleThread(seen.room_id, seen.root_id, seen.summary), ignored
    )
    if summary is None:
        return None
    try:
        count = msgspec.json.decode(summary, type=_Count).count
    except msgspec.MsgspecError:
        return None
    return count


class _Count(msgspec.Struct):
    count: int | None = None


async def leave_room(client: httpx.AsyncClient, creds: Credentials, room_id: str) -> None:
    """Reject an invite on the user's behalf (the spec allows it for ignored inviters)."""
    try:
        response = await client.post(
            _room_path("v3", room_id, "leave"),
            headers=creds.auth_headers(),
            params=creds.query_params(),
            json={},
        )
    except httpx.TransportError as exc:
        log.warning("rejecting an invite failed: %s", type(exc).__name__)
        return
    if response.status_code != 200:
        log.warning("rejecting an invite failed: status %d", response.status_code)
