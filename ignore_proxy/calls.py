"""What one request on a route of the table carries through the proxy (`Call`), and the
proxy's shared state the handlers use to answer it (`Services`): who asks, their ignore
list, stored filters, thread counts, reading and rewriting answers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import httpx
from cachetools import LRUCache, TTLCache
from starlette.types import Message, Receive, Send

from . import filters, lookups, rewrite
from .answer_body import BodyTooLarge, UnreadableBody, check_utf8_json, read_body
from .config import Settings
from .identity import Credentials, IdentityResolver, IdentityUnavailable
from .ignore_lists import IgnoreListStore, IgnoreListUnavailable
from .logs import request_id_of
from .metrics import PASSTHROUGH, Metrics
from .pool import RawHeaders, UpstreamError
from .push_rules import PushRuleKeeper
from .replies import Json, MatrixError, error_body, upstream_failure
from .upstream import UpstreamResponse

if TYPE_CHECKING:
    from .routes import RouteMatch

log = logging.getLogger(__name__)

Body = AsyncIterator[bytes] | bytes | None
# Answers this large are rewritten in a worker thread: the interpreter's switch interval
# lets the event loop serve small requests in between (see benchmarks/).
_THREAD_REWRITE_BYTES = 2 * 1024 * 1024
# Thread summaries one answer may look up; the others keep the homeserver's count.
MAX_THREAD_LOOKUPS = 20
_UNREADABLE = "The homeserver sent an answer the proxy cannot read"
_TOO_LARGE = "The homeserver's answer is too large to filter"
_UNFILTERABLE = "The homeserver's answer could not be filtered"


class ClientGone(Exception):
    """The client went away while the proxy read its request."""


class RequestTooLarge(MatrixError):
    def __init__(self) -> None:
        super().__init__(413, "M_TOO_LARGE", "Request body too large")


class ListUnavailable(Exception):
    """The user's ignore list could not be learned and no earlier one is known."""


# The key of a request's `DisconnectHook` in `scope["extensions"]` (http_protocol.py).
DISCONNECT_EXTENSION = "ignore_proxy.disconnect"


class DisconnectHook:
    """Where the server calls a request back if its client goes away before the answer
    is complete (http_protocol.py): no task has to await `receive()` the whole time."""

    __slots__ = ("callback",)

    def __init__(self) -> None:
        self.callback: Callable[[], None] | None = None


@dataclass(slots=True)
class Exchange:
    """The client side of one request: its body as it arrives, and whether it is still there."""

    receive: Receive
    send_raw: Send
    body_limit: int
    body_done: bool = False
    response_done: bool = False
    client_gone: bool = False
    route: str = PASSTHROUGH  # the route class, for logs and metrics
    status: int = 0
    # Made only when a line other than the access line needs it, which then shows the same.
    request_id: str | None = None
    handler: asyncio.Task[None] | None = None  # cancelled when the client goes away
    _body_read: asyncio.Future[None] | None = None  # awaited by `watch_disconnect`

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif not message.get("more_body", False):
            self.response_done = True
        await self.send_raw(message)

    async def body_chunks(self) -> AsyncIterator[bytes]:
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.client_gone = True
                raise ClientGone
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if self.body_limit and size > self.body_limit:
                raise RequestTooLarge
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                self.body_done = True
                if self._body_read is not None and not self._body_read.done():
                    self._body_read.set_result(None)
                return

    async def read_body(self) -> bytes:
        return b"".join([chunk async for chunk in self.body_chunks()])

    def client_left(self) -> None:
        """The client went away (the server's hook): cancel the handler, so its upstream
        request is released, unless the answer had been given whole."""
        if not self.response_done and self.handler is not None:
            self.client_gone = True
            self.handler.cancel()

    async def watch_disconnect(self) -> None:
        """`client_left` when `receive` says so: for a server without the hook."""
        if not self.body_done:
            self._body_read = asyncio.get_running_loop().create_future()
            await self._body_read
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.client_left()
                return


@dataclass(slots=True)
class Call:
    """One request on a route of the table, as it goes upstream and comes back."""

    exchange: Exchange
    found: RouteMatch
    query: bytes  # as forwarded (a filter's event_fields taken out)
    headers: RawHeaders  # as forwarded
    body: Body  # as forwarded
    creds: Credentials | None = None
    # Who asks (and, where needed, their list loaded), learned beside the upstream request.
    user_lookup: asyncio.Future[str] | None = None
    path_event: asyncio.Task[lookups.EventHead] | None = None
    new_list: frozenset[str] | None = None  # an ignore-list write's
    user_to_evict: str | None = None
    event_fields: tuple[str, ...] | None = None  # the client's, applied to the answer
    poll_ms: int | None = None  # a long-poll's timeout given in the body (MSC4186)
    asked_at: float = 0.0  # when it went upstream (the ignore-list store's clock)
    raw_path: bytes = b""  # as forwarded

    @property
    def route_name(self) -> str:
        return self.found.route.name

    def cancel_lookups(self) -> None:
        """At the end of the request: its lookups are cancelled, or their failure
        retrieved, and let go of."""
        for task in (self.user_lookup, self.path_event):
            if task is not None and not task.done():
                task.cancel()
            elif task is not None and not task.cancelled():
                task.exception()  # retrieved: no "never retrieved" ERROR per dead token
        # A failed lookup's exception holds the frames that awaited it, which hold this
        # call: a cycle per refused token, freed only by the garbage collector.
        self.user_lookup = self.path_event = None

    async def read_json_body(self, limit: int) -> bytes:
        """A client's JSON body the proxy must read itself, bounded by `limit` (read once:
        what goes upstream is then these bytes)."""
        if isinstance(self.body, bytes):
            return self.body
        exchange = self.exchange
        exchange.body_limit = min(exchange.body_limit or limit, limit)
        body = await exchange.read_body()
        self.body = body
        return body


class Services:
    """The proxy's shared state, and what the handlers ask of it."""

    def __init__(
        self,
        settings: Settings,
        client: httpx.AsyncClient,
        identity: IdentityResolver,
        ignore_lists: IgnoreListStore,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.client = client  # the proxy's own lookups, as the user
        self.identity = identity
        self.ignore_lists = ignore_lists
        self.metrics = metrics
        self._rejected: TTLCache[tuple[str, str], bool] = TTLCache(maxsize=10_000, ttl=60)
        # Stored filters by (user, filter ID): immutable, so only their number is bounded.
        self._filters: LRUCache[tuple[str, str], bytes] = LRUCache(maxsize=10_000)
        # Thread reply counts without ignored replies, by (list, root, latest reply, count
        # as the homeserver sent it): a new reply changes the key.
        self.thread_counts: LRUCache[tuple[frozenset[str], str, str, int], int] = LRUCache(
            maxsize=100_000
        )
        self._background: set[asyncio.Task[None]] = set()
        # `ignore.suppress_push`: the proxy's push rules, kept as each list is learned.
        self.push_rule_keeper = (
            PushRuleKeeper(client, max_users=settings.ignore.list_cache_size)
            if settings.ignore.suppress_push
            else None
        )

    # -- who asks, and whom they ignore ------------------------------------------------------

    def start_user_and_list(self, call: Call, *, load_list: bool) -> None:
        """Learn who asks (and their list) alongside the upstream request."""
        creds = call.creds
        if creds is None:
            return
        user_id = self.identity.cached(creds)
        if user_id is not None and (not load_list or self.ignore_lists.fresh(user_id)):
            # Both known (the usual request): no task, which thousands of requests
            # parked in /sync would each hold.
            known: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            known.set_result(user_id)
            call.user_lookup = known
            return
        call.user_lookup = asyncio.create_task(self._user_and_list(creds, load_list=load_list))

    async def _user_and_list(self, creds: Credentials, *, load_list: bool) -> str:
        try:
            user_id = await self.identity.resolve(creds)
        except IdentityUnavailable:
            raise ListUnavailable from None
        if user_id is None:
            raise ListUnavailable
        if load_list:
            await self._load_list(user_id, creds)
        return user_id

    async def _load_list(self, user_id: str, creds: Credentials) -> None:
        try:
            await self.ignore_lists.ensure_fresh(user_id, creds)
        except IgnoreListUnavailable as exc:
            if exc.status == 401:
                self.identity.forget_token(creds.access_token)
            raise ListUnavailable from None

    async def list_now(self, call: Call, user_id: str) -> frozenset[str]:
        """The user's list as it is now, when the answer leaves, not when the request
        arrived. With several workers a list changed through another one is forgotten
        here meanwhile (workers.py): it is read again, never taken for empty."""
        if not self.ignore_lists.known(user_id):
            assert call.creds is not None
            await self._load_list(user_id, call.creds)
        self.keep_push_rules(call, user_id)
        return self.ignore_lists.current(user_id)

    def keep_push_rules(self, call: Call, user_id: str) -> asyncio.Task[None] | None:
        """With `ignore.suppress_push`, the user's push rules brought in line with the
        list the proxy knows (a task, if anything is due; see push_rules.py)."""
        if (
            self.push_rule_keeper is None
            or call.creds is None
            or not self.ignore_lists.known(user_id)
        ):
            return None
        return self.push_rule_keeper.learned(
            user_id, call.creds, self.ignore_lists.current(user_id)
        )

    def push_rules_seen(self, call: Call, user_id: str, owned: dict[str, object]) -> None:
        """An answer showed the user's whole ruleset: `owned` is what it held of the
        proxy's override rules (one deleted or disabled around the proxy is put back)."""
        if (
            self.push_rule_keeper is None
            or call.creds is None
            or not self.ignore_lists.known(user_id)
        ):
            return
        self.push_rule_keeper.seen(user_id, call.creds, self.ignore_lists.current(user_id), owned)

    def list_unavailable(self) -> MatrixError:
        self.metrics.list_unavailable.inc()
        return MatrixError(503, "M_UNKNOWN", "The ignore list could not be loaded",
                           headers=((b"retry-after", b"5"),))  # fmt: skip

    # -- filters ------------------------------------------------------------------------------

    async def take_out_event_fields(
        self, call: Call, kind: Literal["query", "query_or_stored", "search_body"]
    ) -> None:
        """Forward the request with `event_fields` taken out of its filter: the
        homeserver would leave `sender` out of every event it serves, and the proxy could
        not tell whose they are. The client's fields are kept in `call.event_fields` and
        applied to the filtered answer of `/sync` (the one endpoint whose filter has
        them; elsewhere a homeserver may ignore them)."""
        try:
            if kind == "search_body":
                if call.body is not None:
                    raw = await call.read_json_body(self.settings.limits.max_json_body)
                    call.body = filters.strip_event_fields_from_search(raw)
                    if call.body is not raw:
                        call.headers = _with_length(call.headers, len(call.body))
                return
            found = filters.filter_in_query(call.query, stored_allowed=kind == "query_or_stored")
            if found.stored_id is not None and call.creds is not None:
                user_id = await self.identity.resolve(call.creds)
                if user_id is not None:  # else the homeserver refuses the token itself
                    stored = await self._stored_filter(call.creds, user_id, found.stored_id)
                    found = filters.with_stored_filter(call.query, stored)
        except filters.FilterRefused as exc:
            raise MatrixError(exc.status, exc.errcode, exc.error) from None
        except IdentityUnavailable:
            raise MatrixError(503, "M_UNKNOWN", "The homeserver could not tell who is asking",
                              headers=((b"retry-after", b"5"),)) from None  # fmt: skip
        call.query = found.query
        call.event_fields = found.fields or None  # `[]` means every field

    async def _stored_filter(self, creds: Credentials, user_id: str, filter_id: str) -> bytes:
        key = (user_id, filter_id)
        stored = self._filters.get(key)
        if stored is None:
            limit = self.settings.limits.max_json_body
            try:
                stored = await lookups.fetch_filter(self.client, creds, user_id, filter_id, limit)
            except lookups.LookupFailed as exc:
                raise lookup_failed(exc) from None
            if stored is None:
                raise MatrixError(400, "M_INVALID_PARAM", "No such filter")
            self._filters[key] = stored  # filters never change once stored
        return stored

    # -- reading and rewriting answers ----------------------------------------------------

    async def read_answer(
        self,
        call: Call,
        response: UpstreamResponse,
        limit: int | None = None,
        *,
        empty_ok: bool = False,
        array_ok: bool = False,
    ) -> bytes:
        """The whole answer, decoded, if it is a UTF-8 JSON object (or, `array_ok`,
        array) of at most `limit` bytes (or, `empty_ok`, nothing at all); else a 502: the
        proxy never passes what it could not read."""
        try:
            body = await read_body(response, limit or self.settings.limits.max_rewrite_body)
            if empty_ok and not body.strip(b" \t\r\n"):
                return body
            check_utf8_json(response.headers, body)
            first = body.lstrip(b" \t\r\n")[:1]
            if not first or first not in (b"{[" if array_ok else b"{"):
                # Every answer the proxy reads is a JSON object; anything else (a
                # compressed body without its header, say) it cannot judge.
                raise UnreadableBody("not a JSON object")
        except UnreadableBody as exc:
            log.warning("unreadable upstream answer: %s", type(exc).__name__)
            raise MatrixError(502, "M_UNKNOWN", _UNREADABLE) from None
        except BodyTooLarge:
            raise MatrixError(502, "M_UNKNOWN", _TOO_LARGE) from None
        except UpstreamError as exc:
            exchange = call.exchange
            exchange.request_id = exchange.request_id or request_id_of(call.headers)
            raise upstream_failure(exc, exchange.route, exchange.request_id) from None
        return body

    async def rewrite_answer(
        self, call: Call, rewriter: rewrite.Rewriter, body: bytes, ctx: rewrite.IgnoreContext
    ) -> rewrite.Rewritten | None:
        """A route's rewrite, checked by the guard (`rewrite.rewrite_guarded`)."""
        route_name = call.route_name
        started = time.perf_counter()
        try:
            if len(body) >= _THREAD_REWRITE_BYTES:
                guarded = await asyncio.to_thread(rewrite.rewrite_guarded, rewriter, body, ctx)
            else:
                guarded = rewrite.rewrite_guarded(rewriter, body, ctx)
        except rewrite.InvalidBody:
            raise MatrixError(502, "M_UNKNOWN", "The homeserver sent a malformed answer") from None
        except rewrite.IgnoredEventLeft as exc:
            # A bug or an unknown shape: an ignored event where it cannot be removed.
            log.error("refused a %s answer: %s (a bug: report it)", route_name, exc)
            raise MatrixError(502, "M_UNKNOWN", _UNFILTERABLE) from None
        finally:
            self.metrics.rewrite_seconds.labels(route_name).observe(time.perf_counter() - started)
            self.metrics.rewrite_bytes.labels(route_name).inc(len(body))
        if guarded.caught:
            # A place no rewriter knows (a new MSC?): the guard took the events out.
            log.warning("guard removed %d ignored events the %s rewriter left in",
                        guarded.caught, route_name)  # fmt: skip
        return guarded.rewritten

    async def thread_summaries(
        self, creds: Credentials, stale: tuple[rewrite.StaleThread, ...], ignored: frozenset[str]
    ) -> dict[str, bytes | None]:
        """Summaries for threads whose latest reply is hidden: the latest visible one."""
        summaries = await lookups.thread_summaries(
            self.client, creds, stale[:MAX_THREAD_LOOKUPS], ignored
        )
        for root_id, summary in summaries.items():
            # What the replacement says is right: no second lookup for its count.
            seen = None if summary is None else rewrite.latest_and_count(summary)
            if seen is not None:
                self.thread_counts[ignored, root_id, *seen] = seen[1]
        return summaries

    async def corrected_thread_counts(
        self, creds: Credentials, body: bytes, ignored: frozenset[str]
    ) -> bytes:
        """`body` with the `count` of each thread summary that may count ignored replies
        made right, learned once per thread and state of it (its latest reply and count);
        at most MAX_THREAD_LOOKUPS new ones per answer, the others keep their count."""
        counts: dict[str, int] = {}
        unknown: list[rewrite.ThreadCount] = []
        for seen in rewrite.find_thread_counts(body):
            known = self.thread_counts.get((ignored, seen.root_id, seen.latest_id, seen.count))
            if known is not None:
                counts[seen.root_id] = known
            elif len(unknown) < MAX_THREAD_LOOKUPS:
                unknown.append(seen)
        found = await asyncio.gather(
            *(lookups.thread_count(self.client, creds, seen, ignored) for seen in unknown)
        )
        for seen, count in zip(unknown, found, strict=True):
            if count is not None:
                self.thread_counts[ignored, seen.root_id, seen.latest_id, seen.count] = count
                counts[seen.root_id] = count
        return rewrite.apply_thread_counts(body, counts) or body

    def reject_invites(self, user_id: str, creds: Credentials, room_ids: tuple[str, ...]) -> None:
        if not self.settings.ignore.reject_invites:
            return
        for room_id in room_ids:
            if (user_id, room_id) in self._rejected:
                continue  # already on its way: several syncs may carry the same invite
            self._rejected[user_id, room_id] = True
            task = asyncio.create_task(lookups.leave_room(self.client, creds, room_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def sender_ignored(self, sender: str | None) -> Json:
        message = "You have ignored the user that sent this event"
        extra = {} if sender is None else {"sender": sender}
        return Json(404, error_body(self.settings.ignore.errcode, message, **extra))


def lookup_failed(exc: lookups.LookupFailed) -> MatrixError:
    # Fail closed: an answer that could show an ignored user's event is not given unchecked.
    log.warning("lookup failed: %s", exc)
    return MatrixError(502, "M_UNKNOWN", "The homeserver could not tell who sent the event")


def _with_length(headers: RawHeaders, length: int) -> RawHeaders:
    kept = [(name, value) for name, value in headers if name.lower() != b"content-length"]
    kept.append((b"content-length", str(length).encode()))
    return kept
