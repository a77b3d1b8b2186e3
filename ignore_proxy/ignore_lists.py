"""Each user's ``m.ignored_user_list``: parsing, validating PUTs, and a per-user store."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

import httpx
import msgspec
from cachetools import LRUCache

from .identity import Credentials
from .ids import is_user_id

__all__ = [
    "IGNORED_USER_LIST",
    "IgnoreListStore",
    "IgnoreListUnavailable",
    "PutRejection",
    "parse_ignored_users",
    "parse_ignored_users_json",
    "validate_put_body",
]

log = logging.getLogger(__name__)

IGNORED_USER_LIST: Final = "m.ignored_user_list"


class IgnoreListUnavailable(Exception):
    """The list could not be read and there is no last known one.

    ``status`` is the upstream HTTP status when there was one (401 means the token the
    read was made with is dead), None for timeouts and connection errors.
    """

    def __init__(self, status: int | None) -> None:
        super().__init__(f"ignore list unavailable (upstream status {status})")
        self.status = status


class _ListContent(msgspec.Struct):
    """The usual shape of the content, decoded without a dict for each ignored user
    (a 4 MiB list holds ~150,000 of them: this takes its decode from ~130 to ~50 ms)."""

    ignored_users: dict[str, msgspec.Raw]


def parse_ignored_users_json(data: bytes) -> frozenset[str]:
    """``parse_ignored_users`` of a JSON text; msgspec.DecodeError if it is none."""
    try:
        content = msgspec.json.decode(data, type=_ListContent)
    except msgspec.ValidationError:  # another shape: judged as any other content
        return parse_ignored_users(msgspec.json.decode(data))
    return frozenset(u for u in content.ignored_users if is_user_id(u))


def parse_ignored_users(content: object) -> frozenset[str]:
    """The user IDs in an ``m.ignored_user_list`` content; malformed means nobody."""
    ignored = content.get("ignored_users") if isinstance(content, dict) else None
    if not isinstance(ignored, dict):
        log.warning("m.ignored_user_list without an ignored_users object: nobody ignored")
        return frozenset()
    return frozenset(u for u in ignored if isinstance(u, str) and is_user_id(u))


@dataclass(frozen=True, slots=True)
class PutRejection:
    """Why a client's PUT of ``m.ignored_user_list`` is refused (always HTTP 400)."""

    errcode: str
    error: str


def validate_put_body(body: bytes, own_user_id: str) -> frozenset[str] | PutRejection:
    """Check a client's new ``m.ignored_user_list`` content; return the ignored users.

    ``{}`` is MSC3391's "delete" form: nobody ignored.
    """
    try:
        content = msgspec.json.decode(body)
    except msgspec.DecodeError:
        # The contract: every malformed ignore-list write is M_BAD_JSON.
        return PutRejection("M_BAD_JSON", "Content not JSON.")
    if not isinstance(content, dict):
        return PutRejection("M_BAD_JSON", "Content must be a JSON object.")
    if not content:
        return frozenset()
    ignored = content.get("ignored_users")
    if not isinstance(ignored, dict):
        return PutRejection("M_BAD_JSON", "ignored_users must be an object.")
    for user_id in ignored:
        if not is_user_id(user_id):
            return PutRejection("M_INVALID_PARAM", "ignored_users keys must be user IDs.")
        if user_id == own_user_id:
            return PutRejection("M_INVALID_PARAM", "You cannot ignore yourself.")
    return frozenset(ignored)


def account_data_path(user_id: str) -> str:
    return f"/_matrix/client/v3/user/{quote(user_id, safe='')}/account_data/{IGNORED_USER_LIST}"


@dataclass(frozen=True, slots=True)
class _Entry:
    ignored: frozenset[str]
    fresh_until: float


class _Load:
    """One upstream read shared by every concurrent caller for the same user."""

    __slots__ = ("creds", "stale", "task")
    task: asyncio.Task[None]

    def __init__(self, creds: Credentials) -> None:
        self.creds = creds  # whose token reads it: the first caller's
        self.stale = False  # set() or forget() happened since it started: do not store


# A read superseded this many times in a row (changes heard while it ran) gives up.
_MAX_SUPERSEDED_READS = 3


class _LoadFailed(Exception):
    def __init__(self, status: int | None) -> None:
        self.status = status


class IgnoreListStore:
    """The last known ignore list of each user (not of each token), read on demand.

    A list is re-read when older than ``ttl``. When a read fails, the last known list is
    kept (even if stale) and retried after ``retry_after`` seconds; without one,
    ``ensure_fresh`` raises ``IgnoreListUnavailable``. At most ``max_users`` lists are kept
    (least recently used go first). The store trusts the user ID its callers pass.

    While changes made elsewhere may go unheard (``limit_freshness``: the other instances'
    channel is down), lists are re-read after a shorter time.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        ttl: float,
        max_users: int,
        retry_after: float = 5.0,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._ttl = ttl
        self._full_ttl = ttl
        self._retry_after = min(retry_after, ttl)
        self._timer = timer
        self._entries: LRUCache[str, _Entry] = LRUCache(max_users)
        # When each user's list last changed by a write (here or in a sibling worker): an
        # answer asked for before then may carry the list as it was (see `set`).
        self._changed_at: LRUCache[str, float] = LRUCache(max_users)
        self._all_changed_at = float("-inf")  # forget_all: every list may have changed
        self._loads: dict[str, _Load] = {}
        self.loads = 0  # upstream account-data reads
        self.failures = 0  # reads that failed (5xx, timeout, connection, 401/403, bad body)
        self.hits = 0  # lists that were fresh in memory
        self.misses = 0  # lists that had to be read (or joined a read in flight)
        # Told of each user whose list changed here: sibling workers (workers.py) and other
        # instances (cluster.py) forget theirs.
        self.on_change: list[Callable[[str], None]] = []
        # Waits, bounded, until the other instances can hear of a user's change (cluster.py).
        self.wait_shared: Callable[[str], Awaitable[None]] | None = None

    async def ensure_fresh(self, user_id: str, creds: Credentials) -> None:
        if self.fresh(user_id):
            return
        self.misses += 1
        for _ in range(_MAX_SUPERSEDED_READS):
            if not await self._read_fresh(user_id, creds):
                return
        # Changes keep arriving while the list is read: what it is now is unknown.
        raise IgnoreListUnavailable(None)

    async def _read_fresh(self, user_id: str, creds: Credentials) -> bool:
        """Read the list (or join a read in flight); True when the read was superseded (a
        change heard meanwhile) and what is in memory may predate it."""
        load = self._loads.get(user_id)
        if load is None:
            load = _Load(creds)
            load.task = asyncio.get_running_loop().create_task(self._load(user_id, creds, load))
            load.task.add_done_callback(_retrieve)
            self._loads[user_id] = load
        try:
            # shield: a cancelled caller must not cancel the read the others wait for
            await asyncio.shield(load.task)
        except _LoadFailed as exc:
            if exc.status in (401, 403) and load.creds != creds:
                # Another caller's token was refused (revoked meanwhile): not ours.
                await self.ensure_fresh(user_id, creds)
            elif user_id not in self._entries:  # neither a last known list nor a set() since
                raise IgnoreListUnavailable(exc.status) from None
            return False
        # Superseded by a set() (its list is in memory) or a forget() (nothing or an older
        # list is): read again rather than serve the list from before the change.
        if not load.stale:
            return False
        entry = self._entries.get(user_id)
        return entry is None or self._timer() >= entry.fresh_until

    def fresh(self, user_id: str) -> bool:
        """Whether `ensure_fresh` would return at once (and count the hit it would)."""
        entry = self._entries.get(user_id)
        if entry is not None and self._timer() < entry.fresh_until:
            self.hits += 1
            return True
        return False

    def known(self, user_id: str) -> bool:
        """Whether a list is in memory (not forgotten, say by a sibling worker's change)."""
        return user_id in self._entries

    def current(self, user_id: str) -> frozenset[str]:
        entry = self._entries.get(user_id)
        return entry.ignored if entry is not None else frozenset()

    def now(self) -> float:
        """The store's clock, for `set(..., asked_at=)`."""
        return self._timer()

    def set(self, user_id: str, ignored: frozenset[str], *, asked_at: float | None = None) -> None:
        """Record a list known to be current: a write through the proxy, or (`asked_at`:
        when the request went upstream) the list an answer carried. An answer asked for
        before the last write may carry the list as it was before it, and is not taken:
        a slow initial sync must not undo an "ignore" made meanwhile."""
        if asked_at is None:
            self._changed_at[user_id] = self._timer()
        elif asked_at <= max(self._changed_at.get(user_id, float("-inf")), self._all_changed_at):
            return
        self._supersede(user_id)
        ignored = ignored - {user_id}
        before = self._entries.get(user_id)
        self._entries[user_id] = _Entry(ignored, self._timer() + self._ttl)
        # A write is always told: another instance may hold a list this one never saw.
        if asked_at is None or before is None or before.ignored != ignored:
            self._tell(user_id)

    def invalidate(self, user_id: str) -> None:
        """A write whose outcome the proxy cannot know: read the list again, here and
        in the sibling workers and other instances."""
        self.forget(user_id)
        self._tell(user_id)

    async def shared(self, user_id: str) -> None:
        """Wait (bounded) until the other instances can hear of the user's change told
        by the last `set` or `invalidate`: before the write's answer leaves."""
        if self.wait_shared is not None:
            await self.wait_shared(user_id)

    def _tell(self, user_id: str) -> None:
        for listener in self.on_change:
            listener(user_id)

    def forget(self, user_id: str) -> None:
        """Drop a user's list: it changed elsewhere (a sibling worker) and is read again."""
        self._changed_at[user_id] = self._timer()
        self._supersede(user_id)
        self._entries.pop(user_id, None)

    def forget_all(self) -> None:
        """Drop every list: changes made elsewhere may have gone unheard (the other
        instances' channel was down), and every list is read again."""
        self._all_changed_at = self._timer()
        for load in self._loads.values():
            load.stale = True
        self._loads.clear()
        self._entries.clear()

    def limit_freshness(self, ttl: float | None) -> None:
        """Re-read lists after at most ``ttl`` seconds, those in memory included (None:
        after the configured TTL again): changes made elsewhere may go unheard."""
        if ttl is None:
            self._ttl = self._full_ttl
            return
        self._ttl = min(ttl, self._full_ttl)
        latest = self._timer() + self._ttl
        for user_id, entry in list(self._entries.items()):
            if entry.fresh_until > latest:
                self._entries[user_id] = _Entry(entry.ignored, latest)

    def __len__(self) -> int:
        return len(self._entries)

    def _supersede(self, user_id: str) -> None:
        load = self._loads.pop(user_id, None)
        if load is not None:
            load.stale = True

    async def _load(self, user_id: str, creds: Credentials, load: _Load) -> None:
        try:
            ignored = await self._read(user_id, creds)
        except _LoadFailed:
            self.failures += 1
            entry = self._entries.get(user_id)
            if entry is not None and not load.stale:  # keep it, but do not retry at once
                self._entries[user_id] = _Entry(entry.ignored, self._timer() + self._retry_after)
            raise
        finally:
            if self._loads.get(user_id) is load:
                del self._loads[user_id]
            # Joined by nobody from now on. The task would hold its failure, whose
            # traceback holds the frames holding this load: a cycle per failed read.
            del load.task
        if not load.stale:
            self._entries[user_id] = _Entry(ignored - {user_id}, self._timer() + self._ttl)

    async def _read(self, user_id: str, creds: Credentials) -> frozenset[str]:
        self.loads += 1
        params = {"user_id": creds.as_user_id} if creds.as_user_id is not None else {}
        try:
            response = await self._client.get(
                account_data_path(user_id), headers=creds.auth_headers(), params=params
            )
        except httpx.HTTPError as exc:
            log.warning("reading an ignore list failed: %s", type(exc).__name__)
            raise _LoadFailed(None) from None
        if response.status_code == 404:
            return frozenset()
        if response.status_code == 200:
            try:
                return parse_ignored_users_json(response.content)
            except msgspec.DecodeError:
                pass
        log.warning("reading an ignore list failed: upstream status %d", response.status_code)
        raise _LoadFailed(response.status_code)


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: no "never retrieved" noise when nobody waits
