"""Forwarding: the upstream pool, the httpx client the proxy's own lookups use, and how
requests and answers cross them."""

from __future__ import annotations

import http.cookiejar
from collections.abc import AsyncIterator, Iterable
from typing import Any, Protocol, cast
from urllib.parse import parse_qsl

import httpx

from . import pool as pool_errors
from .config import Settings
from .descriptors import connection_limit
from .logs import log_upstream_failure
from .pool import Body, ExchangeTimeouts, RawHeaders, UpstreamPool

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
# `Expect: 100-continue` was answered by our own server when the body was read; passed on,
# it would make the upstream wait for a `100 Continue` some clients never wait for.
REQUEST_ONLY = frozenset({b"expect"})
# Dropped from answers the proxy rewrites: the new body gets its own length.
BODY_HEADERS = frozenset({b"content-length", b"content-encoding", b"transfer-encoding"})


class UpstreamResponse(Protocol):
    """An upstream answer whose head has arrived: what the proxy reads of `pool.Response`."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> RawHeaders: ...

    def aiter_raw(self) -> AsyncIterator[bytes]: ...

    @property
    def at_eof(self) -> bool:
        """Whether the chunk `aiter_raw` just gave was the last one."""
        ...

    async def aclose(self) -> None: ...


# Each of httpx's transport failures and the pool's word for it, narrower ones first: the
# proxy's own lookups ask through httpx over the pool (PoolTransport).
_FAILURES: tuple[tuple[type[httpx.TransportError], type[pool_errors.UpstreamError]], ...] = (
    (httpx.PoolTimeout, pool_errors.PoolFull),
    (httpx.ConnectTimeout, pool_errors.ConnectTimedOut),
    (httpx.WriteTimeout, pool_errors.WriteTimedOut),
    (httpx.ReadTimeout, pool_errors.ReadTimedOut),
    (httpx.ConnectError, pool_errors.Unreachable),
)


def _to_httpx(exc: pool_errors.UpstreamError) -> httpx.TransportError:
    """The pool's failure in httpx's words, for the httpx client of the proxy's lookups."""
    kind = next((theirs for theirs, ours in _FAILURES if isinstance(exc, ours)), None)
    return (kind or httpx.RemoteProtocolError)(str(exc))


class _PoolStream(httpx.AsyncByteStream):
    def __init__(self, response: UpstreamResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except pool_errors.UpstreamError as exc:
            raise _to_httpx(exc) from exc

    async def aclose(self) -> None:
        await self._response.aclose()


class PoolTransport(httpx.AsyncBaseTransport):
    """httpx over the pool, for the proxy's own lookups (whoami, ignore lists, ...)."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        stream = request.stream
        body: Body = (
            b"".join(stream) if isinstance(stream, httpx.ByteStream)
            else cast(httpx.AsyncByteStream, stream)
        )  # fmt: skip
        # httpx frames a body of unknown length itself: the pool decides that.
        headers = [(n, v) for n, v in request.headers.raw if n.lower() != b"transfer-encoding"]
        try:
            response = await self.pool.send(
                request.method,
                request.url.raw_path,
                headers,
                body or None,
                ExchangeTimeouts(
                    timeout.get("connect"),
                    timeout.get("read"),
                    timeout.get("write"),
                    timeout.get("pool"),
                ),
            )
        except pool_errors.UpstreamError as exc:
            # The proxy's own lookups (whoami, ignore lists, ...) serve many requests at once.
            log_upstream_failure(exc.cause, str(exc), "lookup", "-")
            raise _to_httpx(exc) from exc
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_PoolStream(response),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        await self.pool.aclose()


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """One user's `Set-Cookie` must never ride along on another user's request."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:
        return False


# Homeservers close idle connections: hyper (Conduit, continuwuity) after 30 s, Twisted
# (Synapse) after 60 s. A request sent on one the homeserver is closing fails, and is never
# resent: reuse an idle connection only well before the earliest of those.
KEEPALIVE_EXPIRY = 15.0


def create_pool(settings: Settings) -> UpstreamPool:
    """The pool clients' requests are forwarded through."""
    return _pool(settings, connection_limit(settings.limits.max_connections))


def create_lookup_pool(settings: Settings) -> UpstreamPool:
    """The pool of the proxy's own lookups, apart from the forwarding pool: a forwarded
    request holds its connection while its answer waits for a lookup (whoami, the list),
    so lookups queued behind forwarded requests for the same connections could wait for
    each other until the pool timeout, whenever as many requests as connections are in
    flight (thousands of parked long-polls)."""
    return _pool(settings, max(64, connection_limit(settings.limits.max_connections) // 8))


def _pool(settings: Settings, size: int) -> UpstreamPool:
    return UpstreamPool(
        settings.upstream,
        max_connections=size,
        max_keepalive_connections=min(size, settings.limits.max_keepalive_connections),
        keepalive_expiry=KEEPALIVE_EXPIRY,
        max_header_bytes=settings.limits.max_header_bytes,
    )


# What a response read whole streams from: nothing more.
_READ_WHOLE = httpx.ByteStream(b"")


class _LookupClient(httpx.AsyncClient):
    """httpx's client without a cycle per answer: the stream httpx binds to a response
    refers back to it (httpx 0.28), which left each lookup's answer, request and headers
    to the garbage collector. An answer read whole and closed has no use for its stream."""

    async def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        response = await super().send(request, **kwargs)
        if response.is_closed:
            response.stream = _READ_WHOLE
        return response


def create_client(settings: Settings, transport: httpx.AsyncBaseTransport) -> httpx.AsyncClient:
    """The client of the proxy's own lookups, as the user: no defaults, no cookies."""
    return _LookupClient(
        base_url=settings.upstream,
        timeout=base_timeout(settings),
        cookies=http.cookiejar.CookieJar(policy=_NoCookies()),
        follow_redirects=False,
        trust_env=False,
        transport=transport,
    )


def base_timeout(settings: Settings) -> httpx.Timeout:
    t = settings.timeouts
    return httpx.Timeout(connect=t.connect, read=t.read, write=t.write, pool=t.pool)


def long_poll_ms(query_string: bytes) -> int | None:
    """The `?timeout=` (milliseconds) a long-poll asks for, if any."""
    if b"timeout=" in query_string:
        for key, value in parse_qsl(query_string.decode("latin-1")):
            if key == "timeout" and value.isdigit():
                return int(value)
    return None


def timeouts_for(settings: Settings, long_poll: int | None) -> ExchangeTimeouts:
    """A long-poll (`timeout` in milliseconds, in the query or, for MSC4186 sliding
    sync, the body) may stay silent for that long, plus the usual read timeout."""
    timeouts = settings.timeouts
    read = timeouts.read
    if long_poll is not None:
        read += min(long_poll / 1000, timeouts.max_long_poll)
    return ExchangeTimeouts(timeouts.connect, read, timeouts.write, timeouts.pool)


def forwardable(
    headers: Iterable[tuple[bytes, bytes]], also_drop: frozenset[bytes] = frozenset()
) -> RawHeaders:
    """The end-to-end headers of a message, as raw pairs, repeated ones kept in order."""
    headers = headers if isinstance(headers, list) else list(headers)
    drop = HOP_BY_HOP | also_drop if also_drop else HOP_BY_HOP
    kept = [(name, value) for name, value in headers if name.lower() not in drop]
    if len(kept) < len(headers):
        # `Connection` may name more hop-by-hop headers (RFC 9110 7.6.1).
        named = {
            token.strip().lower()
            for name, value in headers
            if name.lower() == b"connection"
            for token in value.split(b",")
        }
        if named:
            kept = [(name, value) for name, value in kept if name.lower() not in named]
    return kept


def target(raw_path: bytes, query_string: bytes) -> bytes:
    """The request target, from the raw path: `%23`, `%2F`, `%40` must arrive unchanged."""
    return raw_path + (b"?" + query_string if query_string else b"")
