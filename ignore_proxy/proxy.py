"""One request's way through the proxy: in, identify, forward, rewrite, respond."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qsl

import httpx
import msgspec
from cachetools import LRUCache, TTLCache
from starlette.types import Message, Receive, Scope, Send

from . import filters, lookups, rewrite
from .config import Settings
from .errors import error_body, send_error, send_json
from .filters import FilterRefused
from .identity import (
    Credentials,
    CredentialsRefused,
    IdentityResolver,
    IdentityUnavailable,
    credentials_from_request,
)
from .ignore_lists import IgnoreListStore, IgnoreListUnavailable, PutRejection, validate_put_body
from .logs import log_request
from .metrics import PASSTHROUGH, Metrics
from .pool import RawHeaders
from .responses import (
    BodyTooLarge,
    UnreadableBody,
    check_utf8_json,
    read_body,
    relay,
    send_rewritten,
)
from .routes import AmbiguousPath, Route, RouteMatch, match
from .upstream import (
    REQUEST_ONLY,
    Upstream,
    UpstreamResponse,
    forwardable,
    long_poll_ms,
    target,
    timeouts_for,
)

log = logging.getLogger(__name__)

# Searched for like a user ID: escapes in the body can spell it too.
_IGNORE_LIST_TYPE = frozenset({"m.ignored_user_list"})
_ERROR_BODY_LIMIT = 64 * 1024
_THREAD_REWRITE_BYTES = 2 * 1024 * 1024
# Seconds before a request starts watching for its client going away (a long-poll, a big
# download): cancelling it then releases its upstream connection at once.
_WATCH_DISCONNECT_AFTER = 0.2
# Thread summaries one answer may have looked up; beyond these they are left out.
MAX_THREAD_LOOKUPS = 20


class ClientGone(Exception):
    pass


class RequestTooLarge(Exception):
    pass


class ListUnavailable(Exception):
    """The user's ignore list could not be learned and no earlier one is known."""


@dataclass(slots=True)
class _Exchange:
    """The client side of one request: its body as it arrives, and whether it is still there."""

    receive: Receive
    send_raw: Send
    body_limit: int
    body_done: asyncio.Event = field(default_factory=asyncio.Event)
    response_done: bool = False
    client_gone: bool = False
    route: str = PASSTHROUGH  # the route class, for logs and metrics
    status: int = 0

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
                self.body_done.set()
                return

    async def read_body(self) -> bytes:
        return b"".join([chunk async for chunk in self.body_chunks()])

    async def watch_disconnect(self, handler: asyncio.Task[None]) -> None:
        """Cancel the handler when the client goes away, so its upstream request is released."""
        await self.body_done.wait()
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                if not self.response_done:
                    self.client_gone = True
                    handler.cancel()
                return


@dataclass(slots=True)
class _Call:
    """What the proxy knows about one request on a route of the table."""

    exchange: _Exchange
    found: RouteMatch
    query: bytes
    creds: Credentials | None
    user: asyncio.Task[str] | None = None  # the effective user, once their list is loaded
    path_event: asyncio.Task[lookups.EventHead] | None = None
    new_list: frozenset[str] | None = None
    user_to_evict: str | None = None
    # The client's `event_fields`, taken out of the filter the homeserver got.
    event_fields: tuple[str, ...] | None = None

    def cancel_lookups(self) -> None:
        for task in (self.user, self.path_event):
            if task is not None and not task.done():
                task.cancel()
            elif task is not None and not task.cancelled():
                task.exception()  # retrieved: no "never retrieved" ERROR per dead token


class Proxy:
    """The ASGI app that forwards everything and rewrites what the route table names."""

    def __init__(
        self,
        settings: Settings,
        upstream: Upstream,
        client: httpx.AsyncClient,
        identity: IdentityResolver,
        ignore_lists: IgnoreListStore,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.client = client  # the proxy's own lookups
        self.identity = identity
        self.ignore_lists = ignore_lists
        self.metrics = metrics
        self._rejected: TTLCache[tuple[str, str], bool] = TTLCache(maxsize=10_000, ttl=60)
        # Stored filters by (user, filter ID): immutable, so only their number is bounded.
        self._filters: LRUCache[tuple[str, str], bytes] = LRUCache(maxsize=10_000)
        # Thread reply counts without ignored replies, by (list, root, latest reply, count
        # as the homeserver sent it): a new reply changes the key.
        self._thread_count_cache: LRUCache[tuple[frozenset[str], str, str, int], int] = LRUCache(
            maxsize=100_000
        )
        self._background: set[asyncio.Task[None]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        exchange = _Exchange(receive, send, self.settings.limits.max_request_body)
        if not _has_body(scope["headers"]):
            exchange.body_done.set()
        started = time.perf_counter()
        handler = asyncio.current_task()
        assert handler is not None
        watcher: list[asyncio.Task[None]] = []
        # Most answers are done before a watcher would matter: start it only after a while.
        watch_later = asyncio.get_running_loop().call_later(
            _WATCH_DISCONNECT_AFTER,
            lambda: watcher.append(asyncio.create_task(exchange.watch_disconnect(handler))),
        )
        try:
            await self._handle(scope, exchange)
        except asyncio.CancelledError:
            if exchange.client_gone and handler.uncancel() == 0:
                return
            raise
        except ClientGone:
            return
        finally:
            watch_later.cancel()
            for task in watcher:
                task.cancel()
            status = exchange.status if exchange.status else "disconnected"
            self.metrics.count_request(exchange.route, status)
            log_request(
                scope["method"], exchange.route, status, time.perf_counter() - started,
                scope["headers"],
            )  # fmt: skip

    async def _handle(self, scope: Scope, exchange: _Exchange) -> None:
        method: str = scope["method"]
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope["query_string"]
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        limit = self.settings.limits.max_request_body
        if limit and _content_length(headers) > limit:
            await send_error(exchange.send, 413, "M_TOO_LARGE", "Request body too large")
            return
        body: AsyncIterator[bytes] | bytes | None = (
            None if exchange.body_done.is_set() else exchange.body_chunks()
        )
        # Credentials are read from exactly what goes upstream: a header named in
        # `Connection` is dropped here, so it must not decide whose list applies.
        request_headers = forwardable(headers, REQUEST_ONLY)
        try:
            found = match(method, raw_path)
        except AmbiguousPath:
            message = (
                "Unrecognized request: homeservers could read this path as different endpoints"
            )
            await send_error(exchange.send, 400, "M_UNRECOGNIZED", message)
            return
        call = None
        if found is not None:
            exchange.route = found.route.name
            creds = None
            if found.route.needs_identity:
                try:
                    creds = credentials_from_request(request_headers, query)
                except CredentialsRefused as exc:
                    await send_error(exchange.send, exc.status, exc.errcode, exc.error)
                    return
            call = _Call(exchange, found, query, creds)
            if found.route.filter is not None:
                try:
                    query, request_headers, body = await self._take_out_event_fields(
                        call, request_headers, body
                    )
                except FilterRefused as exc:
                    await send_error(exchange.send, exc.status, exc.errcode, exc.error)
                    return
                except RequestTooLarge:
                    await send_error(exchange.send, 413, "M_TOO_LARGE", "Request body too large")
                    return
                except IdentityUnavailable:
                    await send_error(exchange.send, 503, "M_UNKNOWN",
                                     "The homeserver could not tell who is asking",
                                     headers=[(b"retry-after", b"5")])  # fmt: skip
                    return
                except lookups.LookupFailed as exc:
                    await _send_lookup_failed(exchange.send, exc)
                    return
                call.query = query
            if found.route.ignore_list_write and method == "PUT":
                checked = await self._checked_ignore_list(call)
                if checked is None:
                    return
                call.new_list, body = checked
            elif found.route.ignore_list_write:
                call.new_list = frozenset()  # MSC3391: deleting the event
            await self._start_lookups(call)
            if found.route.reads_body:
                request_headers = _whole_identity_answer(request_headers)
        poll_ms = long_poll_ms(query)
        if call is not None and call.found.route.timeout_in_body and body is not None:
            try:
                body = await self._read_json_body(exchange)
            except RequestTooLarge:
                await send_error(exchange.send, 413, "M_TOO_LARGE", "Request body too large")
                return
            poll_ms = _timeout_in_body(body, poll_ms)
        try:
            long_poll = poll_ms is not None
            if long_poll:
                self.metrics.long_polls.inc()
            sent = time.perf_counter()
            try:
                response = await self.upstream.send(
                    method,
                    target(raw_path, query),
                    request_headers,
                    body,
                    timeouts_for(self.settings, poll_ms),
                )
            except RequestTooLarge:
                await send_error(exchange.send, 413, "M_TOO_LARGE", "Request body too large")
                return
            except httpx.TransportError as exc:
                await _send_upstream_error(exchange.send, exc)
                return
            finally:
                if long_poll:
                    self.metrics.long_polls.dec()
            self.metrics.observe_upstream(exchange.route, time.perf_counter() - sent)
            try:
                if response.status_code == 401:
                    self._forget_rejected_token(call, request_headers, query)
                if call is None:
                    await relay(exchange.send, response)
                else:
                    await self._respond(call, response)
            finally:
                # Not shielded: closing a pool answer never waits, so it cannot be cut short.
                await response.aclose()
        finally:
            if call is not None:
                call.cancel_lookups()

    def _forget_rejected_token(
        self, call: _Call | None, headers: list[tuple[bytes, bytes]], query: bytes
    ) -> None:
        """Any 401 means the token -> user mapping may be stale (revoked elsewhere)."""
        if call is not None:
            creds = call.creds
        else:
            try:
                creds = credentials_from_request(headers, query)
            except CredentialsRefused:
                return  # no single token was used: none is known to be dead
        if creds is not None:
            self.identity.forget_token(creds.access_token)

    async def _take_out_event_fields(
        self, call: _Call, headers: RawHeaders, body: AsyncIterator[bytes] | bytes | None
    ) -> tuple[bytes, RawHeaders, AsyncIterator[bytes] | bytes | None]:
        """The query, headers and body to forward with `event_fields` taken out of the
        request's filter: the homeserver would leave `sender` out of every event it
        serves, and the proxy could not tell whose they are. The client's fields are
        kept in `call.event_fields` and applied to the filtered answer of `/sync` (the
        one endpoint whose filter has them; elsewhere a homeserver may ignore them)."""
        kind, query = call.found.route.filter, call.query
        if kind == "search_body":
            if body is None:
                return query, headers, body
            raw = await self._read_json_body(call.exchange)
            stripped = filters.strip_event_fields_from_search(raw)
            if stripped is not raw:
                headers = [(n, v) for n, v in headers if n.lower() != b"content-length"]
                headers.append((b"content-length", str(len(stripped)).encode()))
            return query, headers, stripped
        found = filters.filter_in_query(query, stored_allowed=kind == "query_or_stored")
        if found.stored_id is not None and call.creds is not None:
            user_id = await self.identity.resolve(call.creds)
            if user_id is not None:  # else the homeserver refuses the token itself
                stored = await self._stored_filter(call.creds, user_id, found.stored_id)
                found = filters.with_stored_filter(query, stored)
        call.event_fields = found.fields or None  # `[]` means every field
        return found.query, headers, body

    async def _stored_filter(self, creds: Credentials, user_id: str, filter_id: str) -> bytes:
        key = (user_id, filter_id)
        stored = self._filters.get(key)
        if stored is None:
            limit = self.settings.limits.max_json_body
            stored = await lookups.fetch_filter(self.client, creds, user_id, filter_id, limit)
            if stored is None:
                raise filters.FilterRefused(400, "M_INVALID_PARAM", "No such filter")
            self._filters[key] = stored  # filters never change once stored
        return stored

    async def _read_json_body(self, exchange: _Exchange) -> bytes:
        """A client's JSON body the proxy must read itself, bounded by max_json_body."""
        json_limit = self.settings.limits.max_json_body
        exchange.body_limit = min(exchange.body_limit or json_limit, json_limit)
        return await exchange.read_body()

    async def _checked_ignore_list(self, call: _Call) -> tuple[frozenset[str], bytes] | None:
        """Read and check a client's new ignore list; None when the proxy answered an error."""
        exchange = call.exchange
        json_limit = self.settings.limits.max_json_body
        exchange.body_limit = min(exchange.body_limit or json_limit, json_limit)
        try:
            raw = await exchange.read_body()
        except RequestTooLarge:
            await send_error(exchange.send, 413, "M_TOO_LARGE", "Request body too large")
            return None
        checked = validate_put_body(raw, call.found.params["user_id"])
        if isinstance(checked, PutRejection):
            await send_error(exchange.send, 400, checked.errcode, checked.error)
            return None
        return checked, raw

    async def _start_lookups(self, call: _Call) -> None:
        """Start learning who asks and whom they ignore, alongside the upstream request."""
        route, creds = call.found.route, call.creds
        if creds is None:
            return
        if route.evicts == "user":
            # Ask before forwarding: after a logout the token can no longer tell.
            with contextlib.suppress(IdentityUnavailable):
                call.user_to_evict = await self.identity.resolve(creds)
        if route.needs_ignore_list or route.ignore_list_write:
            call.user = asyncio.create_task(
                self._user_and_list(creds, load_list=not route.ignore_list_write)
            )
        if route.check_path_event:
            params = call.found.params
            call.path_event = asyncio.create_task(
                lookups.fetch_event_head(self.client, creds, params["room_id"], params["event_id"])
            )

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

    async def _list_now(self, call: _Call, user_id: str) -> frozenset[str]:
        """The user's list as it is now, when the answer leaves, not when the request
        arrived. With several workers a list changed through another one is forgotten
        here meanwhile (workers.py): it is read again, never taken for empty."""
        if not self.ignore_lists.known(user_id):
            assert call.creds is not None
            await self._load_list(user_id, call.creds)
        return self.ignore_lists.current(user_id)

    async def _respond(self, call: _Call, response: UpstreamResponse) -> None:
        send, route, status = call.exchange.send, call.found.route, response.status_code
        succeeded = 200 <= status < 300
        if route.evicts is not None and succeeded and call.creds is not None:
            self.identity.forget_token(call.creds.access_token)
            if call.user_to_evict is not None:
                self.identity.forget_user(call.user_to_evict)
        if route.ignore_list_write and succeeded and call.user is not None:
            await self._remember_written_list(call)
        if route.public_rewriter is not None and status == 200:
            body = await self._read(call, response)
            if body is not None:
                with contextlib.suppress(rewrite.InvalidBody):
                    body = route.public_rewriter(body)
                await send_rewritten(send, response, body)
        elif call.user is None or route.ignore_list_write:
            await relay(send, response)
        elif 300 <= status < 400:
            # A filtered endpoint never redirects; clients may read a 3xx body as data.
            await send_error(send, 502, "M_UNKNOWN", "The homeserver answered with a redirect")
        elif route.single_event and not succeeded:
            await self._respond_single_event_error(call, response)
        elif not succeeded or status == 204:
            await relay(send, response)  # an error, or nothing at all
        else:
            # Every success is data to a client (fetch's `ok`, ruma reads below 400):
            # 201, 203, 206 and 299 are filtered exactly as 200 is.
            await self._respond_filtered(call, call.user, response)

    async def _remember_written_list(self, call: _Call) -> None:
        assert call.user is not None and call.new_list is not None
        try:
            user_id = await call.user
        except ListUnavailable:
            return
        # Only ever under the authenticated user's own key.
        if user_id == call.found.params["user_id"]:
            self.ignore_lists.set(user_id, call.new_list)

    async def _respond_single_event_error(self, call: _Call, response: UpstreamResponse) -> None:
        body = await self._read(call, response, _ERROR_BODY_LIMIT)
        if body is None:
            return
        own_answer = rewrite.normalise_sender_ignored(response.status_code, body)
        if own_answer is None:
            await send_rewritten(call.exchange.send, response, body)
        else:
            await self._send_sender_ignored(call, own_answer.sender)

    async def _respond_filtered(
        self, call: _Call, user: asyncio.Task[str], response: UpstreamResponse
    ) -> None:
        send, route = call.exchange.send, call.found.route
        try:
            user_id = await user
            if call.path_event is not None and await self._path_event_hidden(call, user_id):
                return
            ignored = await self._list_now(call, user_id)
        except ListUnavailable:
            await self._send_list_unavailable(send, response)
            return
        if route.account_data is None and not ignored and call.event_fields is None:
            await relay(send, response)  # nobody ignored: stream it, never parse it
            return
        body = await self._read(call, response)
        if body is None:
            return
        if route.account_data is not None and rewrite.mentions_any(body, _IGNORE_LIST_TYPE):
            with contextlib.suppress(rewrite.InvalidBody):
                seen = route.account_data(body)
                if seen is not None:
                    self.ignore_lists.set(user_id, seen)
        try:
            ignored = await self._list_now(call, user_id)
        except ListUnavailable:
            await self._send_list_unavailable(send, response, body)
            return
        if route.nearest_unignored and ignored:
            await self._send_nearest_unignored(call, response, body, ignored)
        elif not ignored or not rewrite.mentions_any(body, ignored):
            await self._send_filtered(call, response, body, ignored)
        else:
            context = rewrite.IgnoreContext(ignored, user_id, self.settings.ignore.filter_ephemeral)
            await self._send_rewritten(call, response, body, context)

    async def _send_list_unavailable(
        self, send: Send, response: UpstreamResponse, body: bytes | None = None
    ) -> None:
        """`body`: the answer's, when it was read already."""
        self.metrics.list_unavailable.inc()
        if self.settings.ignore.on_unavailable == "pass":
            if body is None:
                await relay(send, response)
            else:
                await send_rewritten(send, response, body)
        else:
            await send_error(send, 503, "M_UNKNOWN", "The ignore list could not be loaded",
                             headers=[(b"retry-after", b"5")])  # fmt: skip

    async def _path_event_hidden(self, call: _Call, user_id: str) -> bool:
        """Answer for an event named in the path but absent from the answer (the parent of
        `/relations`) if it is an ignored sender's; True if the proxy answered."""
        assert call.path_event is not None
        try:
            head = await call.path_event
        except lookups.LookupFailed as exc:
            await _send_lookup_failed(call.exchange.send, exc)
            return True
        if head.sender is None or head.is_state:
            return False
        if head.sender not in await self._list_now(call, user_id):
            return False
        await self._send_sender_ignored(call, head.sender)
        return True

    async def _send_nearest_unignored(
        self, call: _Call, response: UpstreamResponse, body: bytes, ignored: frozenset[str]
    ) -> None:
        """`timestamp_to_event` names an event but not its sender: look it up."""
        send = call.exchange.send
        assert call.creds is not None
        query = dict(parse_qsl(call.query.decode("latin-1")))
        try:
            answer = await lookups.nearest_unignored_event(
                self.client, call.creds, call.found.params["room_id"], query, body, ignored
            )
        except lookups.LookupFailed as exc:
            await _send_lookup_failed(send, exc)
            return
        if answer is None:
            await send_error(send, 404, "M_NOT_FOUND",
                             "Unable to find an event in the direction given")  # fmt: skip
        else:
            await send_rewritten(send, response, answer)

    async def _send_rewritten(
        self, call: _Call, response: UpstreamResponse, body: bytes, context: rewrite.IgnoreContext
    ) -> None:
        send, route = call.exchange.send, call.found.route
        try:
            rewritten = await self._rewrite(route, body, context)
            if rewritten is not None and rewritten.stale_threads and call.creds is not None:
                # Thread summaries whose latest reply is hidden: learn the latest visible one.
                stale = rewritten.stale_threads[:MAX_THREAD_LOOKUPS]
                summaries = await lookups.thread_summaries(
                    self.client, call.creds, stale, context.ignored
                )
                for root_id, summary in summaries.items():
                    # What the replacement says is right: no second lookup for it.
                    seen = None if summary is None else rewrite.latest_and_count(summary)
                    if seen is not None:
                        key = (context.ignored, root_id, *seen)
                        self._thread_count_cache[key] = seen[1]
                context = replace(context, thread_summaries=summaries)
                rewritten = await self._rewrite(route, body, context)
        except rewrite.SenderIgnored as exc:
            self.metrics.events_removed.labels(route.name).inc()
            await self._send_sender_ignored(call, exc.sender)
            return
        except rewrite.InvalidBody:
            await send_error(send, 502, "M_UNKNOWN", "The homeserver sent a malformed answer")
            return
        except rewrite.IgnoredEventLeft as exc:
            # A bug or an unknown shape: an ignored event where it cannot be removed.
            log.error("refused a %s answer: %s (a bug: report it)", route.name, exc)
            await send_error(
                send, 502, "M_UNKNOWN", "The homeserver's answer could not be filtered"
            )
            return
        if rewritten is None:
            await self._send_filtered(call, response, body, context.ignored)
            return
        if rewritten.hidden_invites and call.creds is not None:
            self._reject_invites(context.user_id, call.creds, rewritten.hidden_invites)
        self.metrics.events_removed.labels(route.name).inc(rewritten.removed)
        await self._send_filtered(call, response, rewritten.body, context.ignored)

    async def _send_filtered(
        self, call: _Call, response: UpstreamResponse, body: bytes, ignored: frozenset[str]
    ) -> None:
        """Send a body the proxy has read and filtered: thread summaries counting only
        replies the user sees, and the client's `event_fields` applied now that no
        ignored sender's event is left to judge."""
        if ignored and call.creds is not None:
            counts = await self._thread_counts(call.creds, body, ignored)
            body = rewrite.apply_thread_counts(body, counts) or body
        if call.event_fields is not None:
            body = filters.project_sync_body(body, call.event_fields)
        await send_rewritten(call.exchange.send, response, body)

    async def _thread_counts(
        self, creds: Credentials, body: bytes, ignored: frozenset[str]
    ) -> dict[str, int]:
        """The right `count` of each thread summary in `body` that may count ignored
        replies, learned once per thread and state of it (its latest reply and count);
        at most MAX_THREAD_LOOKUPS new ones per answer, the others keep their count."""
        counts: dict[str, int] = {}
        unknown: list[rewrite.ThreadCount] = []
        for seen in rewrite.find_thread_counts(body):
            key = (ignored, seen.root_id, seen.latest_id, seen.count)
            known = self._thread_count_cache.get(key)
            if known is not None:
                counts[seen.root_id] = known
            elif len(unknown) < MAX_THREAD_LOOKUPS:
                unknown.append(seen)
        found = await asyncio.gather(
            *(lookups.thread_count(self.client, creds, seen, ignored) for seen in unknown)
        )
        for seen, count in zip(unknown, found, strict=True):
            if count is not None:
                self._thread_count_cache[ignored, seen.root_id, seen.latest_id, seen.count] = count
                counts[seen.root_id] = count
        return counts

    async def _rewrite(
        self, route: Route, body: bytes, context: rewrite.IgnoreContext
    ) -> rewrite.Rewritten | None:
        rewriter, route_name = route.rewriter, route.name
        assert rewriter is not None
        started = time.perf_counter()
        try:
            if len(body) >= _THREAD_REWRITE_BYTES:
                # In a worker thread: the interpreter's switch interval lets the event loop
                # serve small requests in between (benchmarks: tiny-request p99 beside
                # 8 MB sync rewrites).
                guarded = await asyncio.to_thread(rewrite.rewrite_guarded, rewriter, body, context)
            else:
                guarded = rewrite.rewrite_guarded(rewriter, body, context)
            if guarded.caught:
                # A place no rewriter knows (a new MSC?): the guard took the events out.
                log.warning("guard removed %d ignored events the %s rewriter left in",
                            guarded.caught, route_name)  # fmt: skip
            return guarded.rewritten
        finally:
            self.metrics.rewrite_seconds.labels(route_name).observe(time.perf_counter() - started)
            self.metrics.rewrite_bytes.labels(route_name).inc(len(body))

    def _reject_invites(self, user_id: str, creds: Credentials, room_ids: tuple[str, ...]) -> None:
        if not self.settings.ignore.reject_invites:
            return
        for room_id in room_ids:
            if (user_id, room_id) in self._rejected:
                continue  # already on its way: several syncs may carry the same invite
            self._rejected[user_id, room_id] = True
            task = asyncio.create_task(lookups.leave_room(self.client, creds, room_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _send_sender_ignored(self, call: _Call, sender: str | None) -> None:
        message = "You have ignored the user that sent this event"
        extra = {} if sender is None else {"sender": sender}
        body = error_body(self.settings.ignore.errcode, message, **extra)
        await send_json(call.exchange.send, 404, body)

    async def _read(
        self, call: _Call, response: UpstreamResponse, limit: int | None = None
    ) -> bytes | None:
        try:
            body = await read_body(response, limit or self.settings.limits.max_rewrite_body)
            check_utf8_json(response.headers, body)
            if not body.lstrip(b" \t\r\n").startswith(b"{"):
                # Every answer the proxy reads is a JSON object; anything else (a
                # compressed body without its header, say) it cannot judge.
                raise UnreadableBody("not a JSON object")
            return body
        except UnreadableBody as exc:
            log.warning("unreadable upstream answer: %s", type(exc).__name__)
            await send_error(call.exchange.send, 502, "M_UNKNOWN",
                             "The homeserver sent an answer the proxy cannot read")  # fmt: skip
        except BodyTooLarge:
            await send_error(
                call.exchange.send,
                502,
                "M_UNKNOWN",
                "The homeserver's answer is too large to filter",
            )
        except httpx.TransportError as exc:
            await _send_upstream_error(call.exchange.send, exc)
        return None


class _BodyTimeout(msgspec.Struct):
    timeout: int | None = None


def _timeout_in_body(body: bytes, default: int | None) -> int | None:
    """MSC4186's `timeout` member; a body the homeserver will refuse changes nothing."""
    try:
        found = msgspec.json.decode(body, type=_BodyTimeout).timeout
    except msgspec.MsgspecError:
        return default
    return found if found is not None and found >= 0 else default


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            return True
        if lowered == b"content-length":
            return value.strip() not in (b"0", b"")
    return False


def _content_length(headers: list[tuple[bytes, bytes]]) -> int:
    for name, value in headers:
        if name.lower() == b"content-length" and value.strip().isdigit():
            return int(value)
    return 0


# Headers that make a homeserver send part of a body, or none (a 304 leaves the client
# with what it cached, filtered for an older ignore list): the proxy must read the whole
# answer of a route it filters.
_PARTIAL_OR_CONDITIONAL = frozenset(
    {
        b"accept-encoding",
        b"range",
        b"if-range",
        b"if-match",
        b"if-none-match",
        b"if-modified-since",
        b"if-unmodified-since",
    }
)


def _whole_identity_answer(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Ask for the whole answer, uncompressed, where the proxy may have to rewrite it."""
    kept = [(name, value) for name, value in headers if name.lower() not in _PARTIAL_OR_CONDITIONAL]
    kept.append((b"accept-encoding", b"identity"))
    return kept


async def _send_lookup_failed(send: Send, exc: lookups.LookupFailed) -> None:
    # Fail closed: an answer that could show an ignored user's event is not given unchecked.
    log.warning("event lookup failed: %s", exc)
    await send_error(send, 502, "M_UNKNOWN", "The homeserver could not tell who sent the event")


async def _send_upstream_error(send: Send, exc: httpx.TransportError) -> None:
    if isinstance(exc, httpx.PoolTimeout):
        await send_error(
            send,
            503,
            "M_UNKNOWN",
            "Too many requests to the homeserver in flight",
            headers=[(b"retry-after", b"1")],
        )
    elif isinstance(exc, httpx.TimeoutException):
        await send_error(send, 504, "M_UNKNOWN", "The homeserver did not answer in time")
    else:
        await send_error(send, 502, "M_UNKNOWN", "The homeserver could not be reached")
