"""An httpx transport over aiohttp's client: the proxy keeps httpx's API, aiohttp moves
the bytes.

Why: measured with `python -m benchmarks` on 2 cores, httpx's own transport (httpcore)
cost about 1,100 us of CPU per tiny pass-through request and capped the proxy at ~800
req/s; see the README's "Benchmarks" for the figures with this transport.
`httpx-aiohttp`'s `AiohttpTransport` is not used because it breaks forwarding guarantees:
it lets aiohttp add `User-Agent`/`Accept`/`Accept-Encoding`, joins repeated headers,
re-quotes the URL and maps a pool wait to a connect timeout.

What this transport keeps of what the proxy promises (tests/test_forwarding.py):

- the URL goes out as the proxy built it (`yarl.URL(..., encoded=True)`: no re-quoting
  of `%23`, `%2F`, `%40`);
- headers go out as raw pairs, repeated ones kept, and nothing is added
  (`skip_auto_headers`; `Host` comes from the client);
- no cookie jar (`DummyCookieJar`), no redirects, no decompression (`auto_decompress=False`);
- request bodies stream; a `Content-Length` from the client is kept, otherwise chunked;
- an error raised by the request body's iterator (the client went away, the body is too
  large) comes out as itself, not as a transport error;
- failures map onto httpx's exceptions: refused connection `ConnectError`, connect
  timeout `ConnectTimeout`, silence while reading `ReadTimeout`, no free connection
  within the pool timeout `PoolTimeout` (the pool limit is enforced here, so a pool wait
  can be told apart from a slow connect);
- closing a response that was not read to its end closes its connection, so the upstream
  learns at once that the client is gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
from yarl import URL

_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class _Slots:
    """A counting semaphore whose uncontended path costs no timer and no task switch."""

    def __init__(self, size: int | None) -> None:
        self.semaphore = asyncio.Semaphore(size) if size else None

    async def acquire(self, wait: float | None) -> None:
        semaphore = self.semaphore
        if semaphore is None:
            return
        if not semaphore.locked():
            await semaphore.acquire()  # returns at once
            return
        try:
            await asyncio.wait_for(semaphore.acquire(), wait)
        except TimeoutError:
            raise httpx.PoolTimeout("no free upstream connection") from None

    def release(self) -> None:
        if self.semaphore is not None:
            self.semaphore.release()


def _map_error(exc: BaseException) -> BaseException:
    """The httpx exception for an aiohttp failure, or the body iterator's own error."""
    # A failure of the request body's iterator reaches us wrapped in a connection error.
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, _BodyFailed):
            return cause.original
        cause = cause.__cause__
    message = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message)
    if isinstance(exc, aiohttp.ServerTimeoutError | asyncio.TimeoutError):
        return httpx.ReadTimeout(message)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError(message)
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return httpx.RemoteProtocolError(message)
    return httpx.ReadError(message)


_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse, slots: _Slots, keep: bool) -> None:
        self._response = response
        self._slots = slots
        self._keep = keep
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._response.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    return
                yield chunk
        except _ERRORS as exc:
            raise _map_error(exc) from exc

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        response = self._response
        try:
            if self._keep and response.content.at_eof():
                response.release()  # the connection goes back to the pool
            else:
                response.close()  # unread answer: drop the connection, upstream sees it
        finally:
            self._slots.release()


class _BodyFailed(Exception):
    """The request body's own iterator raised `original` (not a network failure)."""

    def __init__(self, original: Exception) -> None:
        super().__init__(repr(original))
        self.original = original


async def _body(stream: httpx.AsyncByteStream) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            yield chunk
    except Exception as exc:
        raise _BodyFailed(exc) from exc


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        *,
        max_connections: int | None,
        max_keepalive_connections: int | None = None,
        keepalive_expiry: float = 30.0,
    ) -> None:
        self._slots = _Slots(max_connections)
        # aiohttp has no cap on idle connections (they expire after keepalive_expiry);
        # 0 is honoured: every connection is closed after its answer.
        self._keep = max_keepalive_connections != 0
        self._keepalive_expiry = keepalive_expiry
        self._session: aiohttp.ClientSession | None = None

    def _new_session(self) -> aiohttp.ClientSession:
        keepalive: dict[str, Any] = (
            {"keepalive_timeout": self._keepalive_expiry} if self._keep else {}
        )
        connector = aiohttp.TCPConnector(
            limit=0,  # the pool limit is _Slots, which can tell a pool wait from a connect
            limit_per_host=0,
            ttl_dns_cache=10,
            **keepalive,
            # aiohttp pools a connection as soon as its answer is read: only force_close
            # (which sends `Connection: close`) keeps none.
            force_close=not self._keep,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            auto_decompress=False,
            trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None),
        )
        # No silent retry of a GET whose kept-alive connection was cut (aiohttp's default):
        # a long-poll would be sent again and hang on a restarted upstream instead of
        # getting its 502 (tests/reliability: upstream restart under 1,000 long-polls).
        if hasattr(session, "_retry_connection"):
            session._retry_connection = False
        return session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session
        if session is None:
            session = self._session = self._new_session()
        timeout: dict[str, Any] = request.extensions.get("timeout", {})
        # httpx puts its own `Transfer-Encoding: chunked` on a body of unknown length:
        # aiohttp decides that itself.
        headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in request.headers.raw
            if name.lower() != b"transfer-encoding"
        ]
        data: Any = None
        stream = request.stream
        if isinstance(stream, httpx.ByteStream):
            body = b"".join(stream)
            data = body or None
        else:
            data = _body(stream)  # type: ignore[arg-type]
        url = URL(str(request.url), encoded=True)
        await self._slots.acquire(timeout.get("pool"))
        try:
            response = await session.request(
                request.method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                compress=None,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                ),
            )
        except _ERRORS as exc:
            self._slots.release()
            raise _map_error(exc) from exc
        except BaseException:
            self._slots.release()
            raise
        return httpx.Response(
            status_code=response.status,
            headers=list(response.raw_headers),
            stream=_ResponseStream(response, self._slots, self._keep),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
