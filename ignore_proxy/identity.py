"""Who is asking: credentials of a client request and the Matrix user they act as.

Tokens are kept in memory only as cache keys; they are never logged and never part of
a ``repr``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote_to_bytes

import httpx
from cachetools import TTLCache

from .ids import is_user_id

__all__ = [
    "Credentials",
    "CredentialsRefused",
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


class CredentialsRefused(Exception):
    """The request's credentials could name different users depending on how a homeserver
    reads them: the proxy cannot prove whose list applies, so it answers this error."""

    def __init__(self, status: int, errcode: str, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.errcode = errcode
        self.error = error


# `Bearer` and one token of visible ASCII, nothing else. Synapse wants the scheme spelled
# `Bearer` and answers 401 to any other spelling; the others compare it case-insensitively.
# Either reading yields this token or none, so both spellings name the same user.
_BEARER = re.compile(rb"[Bb][Ee][Aa][Rr][Ee][Rr] ([!-~]+)")
_TOKEN = re.compile(r"[!-~]+")
_FORM_TYPES = re.compile(
    rb"\s*(?:application/x-www-form-urlencoded|multipart/form-data)\s*(?:;|$)", re.IGNORECASE
)
_ACCESS_TOKEN: Final = b"access_token"
_USER_ID: Final = b"user_id"
_DEVICE_ID: Final = b"device_id"
_CREDENTIAL_PARAMS: Final = frozenset({_ACCESS_TOKEN, _USER_ID, _DEVICE_ID, _UNSTABLE_DEVICE_PARAM})


def credentials_from_request(
    headers: Sequence[tuple[bytes, bytes]], query: bytes, *, has_body: bool = False
) -> Credentials | None:
    """The credentials a request carries, read the way every homeserver reads them.

    ``headers`` are the raw header pairs exactly as they go upstream (hop-by-hop and
    `Connection`-named ones already removed: a header the homeserver never sees must not
    decide whose list applies). ``query`` is the raw query string.

    None when the request carries no credentials at all (the homeserver answers it as
    nobody). Raises `CredentialsRefused` when any two homeservers could read different
    credentials out of it:

    - more than one `Authorization` header, one that is not `Bearer <token>`, or one
      together with `?access_token=` (Synapse refuses both; the others take the header,
      and Conduit falls back to the query when the header is not `Bearer`);
    - a credential parameter (`access_token`, `user_id`, `device_id`,
      `org.matrix.msc3202.device_id`) given twice, undecodable, or read differently when
      `;` separates parameters (Twisted splits on `;` as on `&`; Rust and Go servers do
      not, and Go drops an item holding `;`);
    - a token that is empty or not visible ASCII;
    - with a body (`has_body`), a form-encoded or multipart one: Twisted reads its
      fields into the same parameters as the query's.
    """
    if has_body and any(
        name.lower() == b"content-type" and _FORM_TYPES.match(value) is not None
        for name, value in headers
    ):
        # Twisted (Synapse) reads a form body into the same parameters as the query:
        # `access_token` and `user_id` there would be credentials the proxy never saw.
        raise CredentialsRefused(400, "M_NOT_JSON", "Request bodies must be JSON")
    authorization = [value for name, value in headers if name.lower() == b"authorization"]
    by_ampersand = _credential_params(query.split(b"&"))
    if b";" in query:
        by_semicolon = _credential_params(query.replace(b";", b"&").split(b"&"))
        if by_semicolon != by_ampersand:
            raise CredentialsRefused(
                400, "M_INVALID_PARAM", "Credentials in the query string are ambiguous"
            )
    for name, values in by_ampersand.items():
        if len(values) > 1:
            raise CredentialsRefused(
                400, "M_INVALID_PARAM", f"Query parameter {name.decode()} given more than once"
            )
    params = {name: values[0] for name, values in by_ampersand.items()}
    query_token = params.get(_ACCESS_TOKEN)
    if authorization:
        if query_token is not None:
            raise CredentialsRefused(
                401,
                "M_MISSING_TOKEN",
                "Mixing Authorization headers and access_token query parameters.",
            )
        if len(authorization) > 1:
            raise CredentialsRefused(401, "M_MISSING_TOKEN", "Too many Authorization headers.")
        bearer = _BEARER.fullmatch(authorization[0])
        if bearer is None:
            raise CredentialsRefused(401, "M_MISSING_TOKEN", "Invalid Authorization header.")
        token = bearer.group(1).decode("ascii")
    elif query_token is not None:
        token = _text(query_token, _ACCESS_TOKEN)
        if not _TOKEN.fullmatch(token):
            raise CredentialsRefused(401, "M_MISSING_TOKEN", "Invalid access_token parameter.")
    else:
        return None
    user_id = params.get(_USER_ID)
    device_id = params.get(_DEVICE_ID)
    unstable_device_id = params.get(_UNSTABLE_DEVICE_PARAM)
    if device_id is not None and unstable_device_id is not None and device_id != unstable_device_id:
        raise CredentialsRefused(400, "M_INVALID_PARAM", "Two different device IDs given")
    device = device_id if device_id is not None else unstable_device_id
    return Credentials(
        token,
        None if user_id is None else _text(user_id, _USER_ID),
        None if device is None else _text(device, _DEVICE_ID),
    )


def _credential_params(items: list[bytes]) -> dict[bytes, list[bytes]]:
    """Every value of every credential parameter, names and values percent-decoded as
    form data (`+` is a space), as all homeservers decode them. A name without `=` counts
    with an empty value: Rust and Go servers read it so."""
    found: dict[bytes, list[bytes]] = {}
    for item in items:
        raw_name, _, raw_value = item.partition(b"=")
        name = _unquote(raw_name)
        if name in _CREDENTIAL_PARAMS:
            found.setdefault(name, []).append(_unquote(raw_value))
    return found


def _unquote(value: bytes) -> bytes:
    return unquote_to_bytes(value.replace(b"+", b" "))


def _text(value: bytes, name: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise CredentialsRefused(
            400, "M_INVALID_PARAM", f"Query parameter {name.decode()} is not UTF-8"
        ) from None


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
        user_id = self.cached(creds)
        if user_id is not None:
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

    def cached(self, creds: Credentials) -> str | None:
        """The user ID if known now (no lookup): `resolve` without a coroutine, for the
        usual request, whose token was seen within the TTL."""
        user_id = self._cache.get(creds)
        if user_id is not None:
            self.hits += 1
        return user_id

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
        # Joined by nobody from now on. The task would hold its failure, whose traceback
        # holds the lookup's frames, which hold this flight: a cycle per failed lookup.
        del flight.task

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
