"""One request's way through the proxy: match, identify, prepare, forward, respond, send.

`Proxy._answer` is the dispatcher: it finds the route (`routes.match`), reads who asks
(`identity.credentials_from_request`), lets the route's handler prepare the request
(`handlers.py`), forwards it (`Proxy._forward`) and lets the handler turn the answer into
a reply. `replies.send_reply` sends it: the one place an answer leaves the proxy. Any
step may raise a `MatrixError` instead, which is sent the same way.
"""

from __future__ import annotations

import asyncio
import time

from starlette.types import Receive, Scope, Send

from .calls import (
    DISCONNECT_EXTENSION,
    Body,
    Call,
    ClientGone,
    DisconnectHook,
    Exchange,
    Services,
)
from .config import Settings
from .handlers import Handler
from .identity import Credentials, CredentialsRefused, credentials_from_request
from .logs import log_request, request_id_of
from .metrics import Metrics
from .pool import RawHeaders, UpstreamError, UpstreamPool
from .replies import MatrixError, Relay, Reply, send_reply, upstream_failure
from .routes import AmbiguousPath, match
from .upstream import (
    REQUEST_ONLY,
    UpstreamResponse,
    forwardable,
    long_poll_ms,
    target,
    timeouts_for,
)

# Seconds before a request starts watching for its client going away (a long-poll, a big
# download), where the server has no `DisconnectHook` (h11): cancelling it then releases
# its upstream connection at once.
_WATCH_DISCONNECT_AFTER = 0.2

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


class Proxy:
    """The ASGI app that forwards everything and acts on what the route table names."""

    def __init__(self, settings: Settings, upstream: UpstreamPool, services: Services) -> None:
        self.settings = settings
        self.upstream = upstream
        self.services = services
        self.metrics: Metrics = services.metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        exchange = Exchange(receive, send, self.settings.limits.max_request_body)
        if not _has_body(scope["headers"]):
            exchange.body_done = True
        started = time.perf_counter()
        handler = exchange.handler = asyncio.current_task()
        assert handler is not None
        hook = scope.get("extensions", {}).get(DISCONNECT_EXTENSION)
        if not isinstance(hook, DisconnectHook):
            hook = None
        watcher: list[asyncio.Task[None]] = []
        watch_later: asyncio.TimerHandle | None = None
        if hook is not None:  # the server calls the request back when its client leaves
            hook.callback = exchange.client_left
        else:
            # Most answers are done before a watcher would matter: start it after a while.
            watch_later = asyncio.get_running_loop().call_later(
                _WATCH_DISCONNECT_AFTER,
                lambda: watcher.append(asyncio.create_task(exchange.watch_disconnect())),
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
            if hook is not None:
                hook.callback = None
            if watch_later is not None:
                watch_later.cancel()
            for task in watcher:
                task.cancel()
            exchange.handler = None
            status = exchange.status if exchange.status else "disconnected"
            self.metrics.count_request(exchange.route, status)
            log_request(
                scope["method"], exchange.route, status, time.perf_counter() - started,
                scope["headers"], exchange.request_id,
            )  # fmt: skip

    async def _handle(self, scope: Scope, exchange: Exchange) -> None:
        responses: list[UpstreamResponse] = []
        calls: list[Call] = []
        try:
            try:
                reply = await self._answer(scope, exchange, responses, calls)
            except MatrixError as error:
                # Kept with its traceback, the reply would hold this frame: a cycle.
                reply = error.with_traceback(None)
            await send_reply(exchange.send, reply)
        finally:
            for call in calls:
                call.cancel_lookups()
            for response in responses:
                # Not shielded: closing a pool answer never waits, so it cannot be cut short.
                await response.aclose()

    async def _answer(
        self,
        scope: Scope,
        exchange: Exchange,
        responses: list[UpstreamResponse],
        calls: list[Call],
    ) -> Reply:
        """The dispatcher: match, identify, prepare, forward, respond."""
        method: str = scope["method"]
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope["query_string"]
        limit = self.settings.limits.max_request_body
        if limit and _content_length(scope["headers"]) > limit:
            raise MatrixError(413, "M_TOO_LARGE", "Request body too large")
        # Credentials are read from exactly what goes upstream: a header named in
        # `Connection` is dropped here, so it must not decide whose list applies.
        headers = forwardable(scope["headers"], REQUEST_ONLY)
        body = None if exchange.body_done else exchange.body_chunks()
        try:
            found = match(method, raw_path, push_rules=self.settings.ignore.suppress_push)
        except AmbiguousPath:
            raise MatrixError(400, "M_UNRECOGNIZED", "Unrecognized request: homeservers "
                              "could read this path as different endpoints") from None  # fmt: skip
        if found is None:  # not an endpoint of the table: relayed as it is
            response = await self._forward(exchange, method, raw_path, query, headers, body)
            responses.append(response)
            if response.status_code == 401:
                self._forget_rejected_token(None, headers, query)
            return Relay(response)
        handler: Handler = found.route.handler
        exchange.route = found.route.name
        call = Call(exchange, found, query, headers, body, raw_path=raw_path)
        calls.append(call)
        if handler.needs_identity:
            try:
                call.creds = credentials_from_request(headers, query, has_body=body is not None)
            except CredentialsRefused as exc:
                raise MatrixError(exc.status, exc.errcode, exc.error) from None
        await handler.prepare(self.services, call)
        if handler.reads_answer:
            call.headers = _whole_identity_answer(call.headers)
        call.asked_at = self.services.ignore_lists.now()
        response = await self._forward(
            exchange, method, raw_path, call.query, call.headers, call.body, call.poll_ms
        )
        responses.append(response)
        if response.status_code == 401:
            self._forget_rejected_token(call.creds, headers, query)
        return await handler.respond(self.services, call, response)

    async def _forward(
        self,
        exchange: Exchange,
        method: str,
        raw_path: bytes,
        query: bytes,
        headers: RawHeaders,
        body: Body,
        poll_ms: int | None = None,
    ) -> UpstreamResponse:
        """The request to the homeserver; its failures become Matrix errors here."""
        if poll_ms is None:
            poll_ms = long_poll_ms(query)
        long_poll = poll_ms is not None
        if long_poll:
            self.metrics.long_polls.inc()
        sent = time.perf_counter()
        try:
            response = await self.upstream.send(
                method, target(raw_path, query), headers, body,
                timeouts_for(self.settings, poll_ms),
            )  # fmt: skip
        except UpstreamError as exc:
            exchange.request_id = exchange.request_id or request_id_of(headers)
            raise upstream_failure(exc, exchange.route, exchange.request_id) from None
        finally:
            if long_poll:
                self.metrics.long_polls.dec()
        self.metrics.observe_upstream(exchange.route, time.perf_counter() - sent)
        return response

    def _forget_rejected_token(
        self, creds: Credentials | None, headers: RawHeaders, query: bytes
    ) -> None:
        """Any 401 means the token -> user mapping may be stale (revoked elsewhere)."""
        if creds is None:
            try:
                creds = credentials_from_request(headers, query)
            except CredentialsRefused:
                return  # no single token was used: none is known to be dead
        if creds is not None:
            self.services.identity.forget_token(creds.access_token)


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


def _whole_identity_answer(headers: RawHeaders) -> RawHeaders:
    """Ask for the whole answer, uncompressed, where the proxy may have to rewrite it."""
    kept = [(name, value) for name, value in headers if name.lower() not in _PARTIAL_OR_CONDITIONAL]
    kept.append((b"accept-encoding", b"identity"))
    return kept
