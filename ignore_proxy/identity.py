"""Who is asking: credentials of a client request and the Matrix user they act as.

Tokens are kept in memory only as cache keys; they are never logged and never part of
a ``repr``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote_to_bytes

import httpx
from cachetools import TTLCache

from .ids import is_user_id

__all__ = [
    "Credentials",
    "IdentityResolver",
    "IdentityUnavailable",
    "credentials_from_request",
]

WHOAMI_PATH: Final = "/_matrix/client/v3/account/whoami"
_UNSTABLE_DEVICE_PARAM: Final = b"org.matrix.msc3202.device_id"


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a request authenticates with; the whole value is the cache key."""

    access_token: str = field(repr=False)
    as_user_id: str | None = None  # appservice ?user_id= (masquerading)
    as_device_id: str | None = None  # ?device_id= or ?org.matrix.msc3202.device_id=

    def query_params(self) -> dict[str, str]:
        """The appservice query parameters to send along with the token."""
        params: dict[str, str] = {}
        if self.as_user_id is not None:
            params["user_id"] = self.as_user_id
        if self.as_device_id is not None:
            params["device_id"] = self.as_device_id
        return params

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


def _is_token(value: str) -> bool:
    """Tokens are opaque, but must be sendable in a header: visible ASCII only."""
    return bool(value) and all("!" <= ch <= "~" for ch in value)


def _header_items(
    headers: Mapping[str, str] | Iterable[tuple[bytes, bytes]],
) -> Iterable[tuple[str, str]]:
    if isinstance(headers, Mapping):
        # starlette's Headers.items() yields every raw header, repeated ones included
        return ((k.lower(), v) for k, v in headers.items())
    return ((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in headers)


def credentials_from_request(
    headers: Mapping[str, str] | Iterable[tuple[bytes, bytes]],
    query: bytes,
) -> Credentials | None:
    """Extract the credentials of a request, or None when it carries no usable token.

    ``headers`` is starlette ``Headers`` (or any str mapping) or the raw ASGI header list;
    ``query`` is the raw query string. A valid ``Authorization: Bearer`` header wins over
    ``?access_token=``: Synapse rejects requests carrying both, while Dendrite, Conduit and
    continuwuity use the header, so preferring it never disagrees with a server that
    accepts the request. For repeated headers or parameters the first one counts, as on
    Synapse. Undecodable ``user_id``/``device_id``/``access_token`` values give None.
    """
    token: str | None = None
    for name, value in _header_items(headers):
        if name == "authorization":
            parts = value.split()
            if len(parts) == 2 and parts[0].lower() == "bearer":
                token = parts[1]
            break

    # Twisted (Synapse) splits on ";" too; others do not. Splitting on both finds every
    # parameter some homeserver would use; where they disagree, that server rejects the
    # value anyway (a token or user ID with ";" left in it).
    params: dict[bytes, bytes] = {}
    for item in query.replace(b";", b"&").split(b"&"):
        param, sep, raw = item.partition(b"=")
        if sep:
            params.setdefault(_unquote(param), _unquote(raw))
    try:
        if token is None and b"access_token" in params:
            token = params[b"access_token"].decode("ascii")
        user_id = _decode(params.get(b"user_id"))
        device = _decode(params.get(b"device_id", params.get(_UNSTABLE_DEVICE_PARAM)))
    except UnicodeDecodeError:
        return None
    if token is None or not _is_token(token):
        return None
    return Credentials(token, user_id, device)


def _unquote(value: bytes) -> bytes:
    return unquote_to_bytes(value.replace(b"+", b" "))


def _decode(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8")


class IdentityUnavailable(Exception):
    """The homeserver could not tell who the credentials belong to (not a 401)."""


class _IndexedTTLCache(TTLCache[Credentials, str]):
    """A TTLCache that reports every entry it drops by itself (expiry, size eviction)."""

    def __init__(
        self,
        maxsize: int,
        ttl: float,
        timer: Callable[[], float],
        on_drop: Callable[[Credentials, str], None],
    ) -> None:
        super().__init__(maxsize, ttl, timer)
        self._on_drop = on_drop

    def expire(self, time: float | None = None) -> list[tuple[Credentials, str]]:
        expired = super().expire(time)
        for key, value in expired:
            self._on_drop(key, value)
        return expired

    def popitem(self) -> tuple[Credentials, str]:
        key, value = super().popitem()
        self._on_drop(key, value)
        return key, value


class _Flight:
    """One upstream whoami shared by every concurrent caller with the same key."""

    __slots__ = ("stale", "task")
    task: asyncio.Task[str | None]

    def __init__(self) -> None:
        self.stale = False  # set by forget_*: the answer must not be cached


class IdentityResolver:
    """Maps credentials to the effective Matrix user ID via ``/account/whoami``.

    Positive answers are cached for ``ttl`` seconds (at most ``max_size`` entries);
    rejected credentials (400/401/403) for ``negative_ttl`` (at most
    ``negative_max_size`` entries). Other failures raise ``IdentityUnavailable`` and are
    not cached. Concurrent callers with the same credentials share one upstream call.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        max_size: int,
        ttl: float,
        negative_ttl: float,
        negative_max_size: int = 1024,
        max_concurrent: int = 32,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        # A flood of distinct unknown tokens must not become a flood of whoami calls:
        # lookups past this many wait their turn.
        self._slots = asyncio.Semaphore(max_concurrent)
        self._cache = _IndexedTTLCache(max_size, ttl, timer, self._unindex)
        self._negative: TTLCache[Credentials, bool] = TTLCache(
            negative_max_size, negative_ttl, timer
        )
        self._by_user: dict[str, set[Credentials]] = {}
        self._by_token: dict[str, set[Credentials]] = {}
        self._inflight: dict[Credentials, _Flight] = {}
        self.lookups = 0  # upstream whoami calls
        self.hits = 0  # answered from the positive or negative cache
        self.misses = 0  # not cached: joined or started a lookup
        self.failures = 0  # lookups that raised IdentityUnavailable

    async def resolve(self, creds: Credentials) -> str | None:
        """The effective user ID, or None when the homeserver rejects the credentials."""
        user_id = self._cache.get(creds)
        if user_id is not None:
            self.hits += 1
            return user_id
        if creds in self._negative:
            self.hits += 1
            return None
        self.misses += 1
        flight = self._inflight.get(creds)
        if flight is None:
            flight = _Flight()
            flight.task = asyncio.get_running_loop().create_task(self._lookup(creds, flight))
            flight.task.add_done_callback(self._retrieve)
            self._inflight[creds] = flight
        # shield: a cancelled caller must not cancel the lookup the others wait for
        return await asyncio.shield(flight.task)

    def forget_token(self, access_token: str) -> None:
        """Drop every cached identity of this token (logout, upstream 401)."""
        for key in list(self._by_token.get(access_token, ())):
            self._drop(key)
        for key, flight in list(self._inflight.items()):
            if key.access_token == access_token:
                self._abandon(key, flight)

    def forget_user(self, user_id: str) -> None:
        """Drop every cached token of this user (logout/all, device deletion, password)."""
        for key in list(self._by_user.get(user_id, ())):
            self._drop(key)
        # an answer in flight may name this user; rare enough to abandon them all
        for key, flight in list(self._inflight.items()):
            self._abandon(key, flight)

    def __len__(self) -> int:
        """Cached identities (not counting rejected credentials)."""
        return len(self._cache)

    @property
    def negative_entries(self) -> int:
        """Cached rejected credentials."""
        return len(self._negative)

    async def _lookup(self, creds: Credentials, flight: _Flight) -> str | None:
        try:
            return await self._whoami(creds, flight)
        finally:  # a finished lookup, failed or not, is never joined again
            self._landed(creds, flight)

    async def _whoami(self, creds: Credentials, flight: _Flight) -> str | None:
        try:
            async with self._slots:
                self.lookups += 1
                response = await self._client.get(
                    WHOAMI_PATH, headers=creds.auth_headers(), params=creds.query_params()
                )
        except httpx.HTTPError as exc:
            self.failures += 1
            raise IdentityUnavailable(f"whoami failed: {type(exc).__name__}") from None
        if response.status_code in (400, 401, 403):
            if response.status_code == 401:  # the token is dead for every user it acted as
                for key in list(self._by_token.get(creds.access_token, ())):
                    self._drop(key)
            # Cached even when the flight went stale: a rejected token never becomes valid,
            # and the proxy forgets a token on every upstream 401, which would otherwise
            # abandon each lookup of a dead token and leave the negative cache empty.
            self._negative[creds] = True
            return None
        user_id = _whoami_user_id(response)
        if user_id is None:
            self.failures += 1
            raise IdentityUnavailable(f"whoami answered {response.status_code}")
        if not flight.stale:
            self._store(creds, user_id)
        return user_id

    def _landed(self, creds: Credentials, flight: _Flight) -> None:
        if self._inflight.get(creds) is flight:
            del self._inflight[creds]

    @staticmethod
    def _retrieve(task: asyncio.Task[str | None]) -> None:
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" noise when nobody waits

    def _abandon(self, key: Credentials, flight: _Flight) -> None:
        flight.stale = True
        del self._inflight[key]

    def _store(self, creds: Credentials, user_id: str) -> None:
        self._drop(creds)
        self._cache[creds] = user_id
        self._by_user.setdefault(user_id, set()).add(creds)
        self._by_token.setdefault(creds.access_token, set()).add(creds)

    def _drop(self, key: Credentials) -> None:
        user_id = self._cache.pop(key, None)
        if user_id is not None:
            self._unindex(key, user_id)

    def _unindex(self, key: Credentials, user_id: str) -> None:
        for index, name in ((self._by_user, user_id), (self._by_token, key.access_token)):
            keys = index.get(name)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del index[name]


def _whoami_user_id(response: httpx.Response) -> str | None:
    if response.status_code != 200:
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    user_id = body.get("user_id") if isinstance(body, dict) else None
    return user_id if isinstance(user_id, str) and is_user_id(user_id) else None
