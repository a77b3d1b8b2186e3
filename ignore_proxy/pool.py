"""The upstream connection pool: HTTP/1.1 over asyncio protocols, parsed by httptools.

Why not an HTTP client library: measured with `python -m benchmarks` on 2 cores, a tiny
pass-through cost ~1,100 us of CPU per request through httpx's own transport (httpcore) and
~380 us through httpx over aiohttp; this pool, with uvicorn in front, about 60 us. The
proxy's hot path needs little of what a client library does (one upstream, no redirects,
no cookies, no decompression, no retries, no URL handling: the raw path goes out as it
came), and much of what they do costs CPU per request. httptools (llhttp, also uvicorn's
parser) does the parsing; asyncio's transports do the I/O.

What it keeps of what the proxy promises (tests/test_forwarding.py, tests/reliability):

- the request line carries the client's raw path and query, byte for byte;
- headers go out as the raw pairs given, repeated ones kept, nothing added but `Host`
  when the client sent none, and the framing of a body of unknown length (`chunked`);
- request bodies stream with flow control; an error raised by the body's iterator (the
  client went away, the body is too large) comes out as itself;
- answers stream with flow control: reading from the upstream pauses while the client is
  slower than it;
- failures raise the pool's own exceptions (`UpstreamError` and its kinds below), which
  the proxy maps to Matrix errors in one place (`replies.upstream_failure`) and the
  httpx transport of the proxy's own lookups to httpx's (`upstream.PoolTransport`):
  refused connection `Unreachable`, connect timeout `ConnectTimedOut`, silence while
  waiting for or reading an answer `ReadTimedOut`, a body the homeserver does not take
  `WriteTimedOut`, no free connection within the pool timeout `PoolFull`, a broken,
  garbled or oversized answer `BadAnswer`;
- framing at least as strict as nginx: a header section larger than `max_header_bytes`,
  an unrequested protocol switch (101), a transfer coding other than `chunked`, or bytes
  before an answer are errors; interim answers (100, 103) are skipped; trailers are
  dropped; a connection that sent one byte more than its answer is never reused, so no
  stray byte is ever read as part of the next request's answer;
- a request is sent twice only where RFC 9112 9.3.1 allows it (nginx, too, gives a
  request cut on a cached connection another try): a bodyless GET, HEAD or OPTIONS that
  went out on a reused kept-alive connection the homeserver closed without a byte of
  answer (it closed the idle connection just as the request left) goes once more, on a
  new connection. Anything else cut under a request is an error (a long-poll retried on
  a restarted upstream would hang instead of getting its 502);
- closing an answer that was not read to its end closes its connection, so the upstream
  learns at once that the client is gone.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import select
import socket
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import NoReturn, Protocol, cast

import httptools
import httpx


class UpstreamError(Exception):
    """The homeserver could not be asked, or its answer could not be read. `cause` says
    which in a word, for the log line; the message says what happened, never the path."""

    cause = "failure"

    def __init__(self, message: str, cause: str | None = None) -> None:
        super().__init__(message)
        if cause is not None:
            self.cause = cause


class Unreachable(UpstreamError):
    """No connection to the homeserver: `refused`, `dns`, `tls` (the certificate or the
    handshake) or `unreachable` (anything else: unroutable, reset, ...)."""

    cause = "unreachable"


class TimedOut(UpstreamError):
    """The homeserver took longer than a timeout allowed."""

    cause = "timeout"


class ConnectTimedOut(TimedOut):
    pass


class ReadTimedOut(TimedOut):
    pass


class WriteTimedOut(TimedOut):
    pass


class PoolFull(UpstreamError):
    """No free upstream connection within the pool timeout."""

    cause = "pool full"


class BadAnswer(UpstreamError):
    """An answer broken, garbled, oversized or cut off."""

    cause = "bad answer"


def connect_failure(exc: OSError, address: str) -> Unreachable:
    """Why a connection could not be made, in words an operator can act on: a certificate
    failure must not read like a refused connection."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or exc.reason or str(exc)
        return Unreachable(f"TLS certificate of {address} not accepted: {why}", "tls")
    if isinstance(exc, ssl.SSLError):
        return Unreachable(f"TLS handshake with {address} failed: {exc.reason or exc}", "tls")
    if isinstance(exc, socket.gaierror):
        return Unreachable(f"cannot resolve {address}: {exc.strerror or exc}", "dns")
    if isinstance(exc, ConnectionRefusedError):
        return Unreachable(f"{address} refused the connection", "refused")
    return Unreachable(f"cannot connect to {address}: {exc.strerror or exc}")


RawHeaders = list[tuple[bytes, bytes]]
Body = AsyncIterable[bytes] | bytes | None

# Reading from the upstream pauses while this much of an answer waits for the client.
_HIGH_WATER = 64 * 1024
_NO_BODY_STATUSES = frozenset({204, 304})
# Safe to send again on a new connection when a reused one closed before answering.
_RETRYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_CR, _LF = 13, 10
# Where an answer ends, as an offset into the bytes received in its exchange, when not
# known (never reused: a body delimited by the close) or known only at its end (chunked).
_END_UNKNOWN = -2
_END_CHUNKED = -1
_DNS_TTL = 10.0


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class ExchangeTimeouts:
    """Seconds; None waits forever. `read` is the longest silence while an answer is due."""

    connect: float | None
    read: float | None
    write: float | None
    pool: float | None


class _Stop(Exception):
    """Raised in a parser callback to stop parsing; the failure was recorded before."""


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
            raise PoolFull("no free upstream connection") from None

    def release(self) -> None:
        if self.semaphore is not None:
            self.semaphore.release()


class Response:
    """An upstream answer whose head has arrived; its body streams from `aiter_raw`."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_closed",
        "_complete",
        "_connection",
        "_eof_delimited",
        "_error",
        "_waiter",
        "headers",
        "status_code",
    )

    def __init__(self, connection: _Connection, status: int, headers: RawHeaders) -> None:
        self._connection = connection
        self.status_code = status
        self.headers = headers
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._complete = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._eof_delimited = False

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    # Called by the connection.
    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > _HIGH_WATER:
            self._connection.pause_reading()
        self._wake()

    def _finish(self, error: BaseException | None = None) -> None:
        if self._complete or self._error is not None:
            return
        if error is None:
            self._complete = True
        else:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives (transfer coding removed, content coding kept)."""
        chunks = self._chunks
        while True:
            if chunks:
                # Everything buffered at once: fewer, larger writes to the client.
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                self._connection.resume_reading()
                yield data
            elif self._error is not None:
                raise self._error
            elif self._complete:
                return
            else:
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None

    @property
    def at_eof(self) -> bool:
        """Everything has arrived and been handed out by `aiter_raw`."""
        return self._complete and not self._chunks

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_raw()])

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """Give the connection back when the answer was read to its end, else cut it."""
        if self._closed:
            return
        self._closed = True
        self._error = None  # raised, its traceback holds frames holding this answer
        self._connection.finish_exchange(reusable=self._complete and not self._chunks)


class _ReadBuffered(Protocol):
    """A TLS transport (asyncio's, uvloop's): what it read off the socket and holds."""

    def get_read_buffer_size(self) -> int: ...


class _Connection(asyncio.Protocol):
    """One upstream connection; at most one exchange at a time (no pipelining)."""

    # Made once connected, dropped once lost (or abandoned): it holds this connection's
    # callbacks, a cycle that would leave every closed connection to the garbage collector.
    parser: httptools.HttpResponseParser

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.idle_since = 0.0
        self._fileno: int | None = None
        # The exchange in progress.
        self.head: asyncio.Future[Response] | None = None
        self.response: Response | None = None
        self.head_only = False  # a HEAD request: the answer has no body whatever it says
        self.keep_alive = False
        # The homeserver closed the connection before a byte of the answer arrived.
        self.unanswered = False
        self._headers: RawHeaders = []
        self._informational = False
        self._received = 0  # bytes of the exchange's answers, interim ones included
        self._packet = b""  # the bytes being parsed
        self._tail = b""  # the last bytes before them, while a head is incomplete
        self._head_start = 0  # where the head being parsed begins, at the earliest
        self._end = _END_UNKNOWN  # where the final answer ends
        self._done = False  # the final answer has arrived whole
        self._reading_paused = False
        self._write_ready: asyncio.Future[None] | None = None
        self._last_activity = 0.0
        self._read_timeout: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.parser = httptools.HttpResponseParser(self)
        sock = transport.get_extra_info("socket")
        self._fileno = sock.fileno() if sock is not None else None

    def dropped(self) -> bool:
        """Whether this idle connection must not be reused though the event loop, busy,
        has not heard of it yet: the homeserver closed it, or sent bytes nobody asked for
        (the rest of an answer longer than it said). An idle socket that polls readable
        (end of stream, bytes out of turn) or in error is one of those, and so is a TLS
        connection holding bytes it read off its socket."""
        if self._fileno is None or self.transport is None:
            return True  # nothing to look at: not reused on trust
        if self._tls_holds_bytes():
            return True
        # One system call, and no exception to raise when the answer is "no".
        poller = select.poll()
        poller.register(self._fileno, select.POLLIN)
        return bool(poller.poll(0))

    def _tls_holds_bytes(self) -> bool:
        """Whether TLS holds bytes it read off the socket and has not handed over: what
        arrives while the reading is paused (an answer that came whole past the
        high-water mark) is handed over on the loop's next turn, out of sight of a poll
        of the socket, and is dropped by uvloop if the stream ends meanwhile."""
        transport = self.transport
        return (
            self.pool.ssl
            and transport is not None
            and cast(_ReadBuffered, transport).get_read_buffer_size() > 0
        )

    def begin(self, head_only: bool) -> asyncio.Future[Response]:
        """Start an exchange; the future gets the answer once its head has arrived."""
        head = self.head = asyncio.get_running_loop().create_future()
        self.head_only = head_only
        self.unanswered = False
        self._informational = False
        self._received = 0
        self._tail = b""
        self._head_start = 0
        self._end = _END_UNKNOWN
        self._done = False
        return head

    def data_received(self, data: bytes) -> None:
        if self.head is None or self._done:
            # Nothing was asked, or the answer is whole already: an upstream that talks
            # out of turn can't be trusted with the next request's answer.
            self.abort()
            return
        start = self._received
        self._received = start + len(data)
        self._last_activity = time.monotonic()
        if self.response is None and start == self._head_start and data[0] in (_CR, _LF):
            # llhttp skips empty lines before a status line; nginx refuses them, and so do
            # we: they would also shift where the answer ends.
            self._reject("the homeserver sent an empty line before its answer")
            return
        self._packet = data
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._reject(f"malformed answer: {exc}")
            return
        finally:
            self._packet = b""
        if self.response is None and not self.lost:
            # Still in the header section(s): bounded, as the headers the clients send are.
            if self._received > self.pool.max_header_bytes:
                self._reject("the homeserver's header section is too large")
                return
            self._tail = (self._tail + data)[-3:] if len(data) < 3 else data[-3:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._cancel_timer()
        response = self.response
        if (
            exc is None
            and response is not None
            and response._eof_delimited
            and not response._complete
            and not self._tls_holds_bytes()  # the end of what it held, unread: a cut
        ):
            # No length and no chunking: the body ends where the connection does (cleanly:
            # a reset is a cut, not an end).
            response._finish()
            self.keep_alive = False
        else:
            if self.head is not None and self._received == 0:
                self.unanswered = True
            self._fail(BadAnswer("the homeserver closed the connection"))
        waiter = self._write_ready
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.pool.forget(self)
        vars(self).pop("parser", None)  # see `parser`

    def abandon(self) -> None:
        """Its connecting was cancelled. Once connected, uvloop closes the transport then
        without a `connection_lost`: what that would let go of goes here."""
        self.transport = None
        vars(self).pop("parser", None)

    def pause_writing(self) -> None:
        self._write_ready = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        waiter = self._write_ready
        self._write_ready = None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self._done:
            # A second answer to one request (a 204 followed by more, say): the
            # connection's framing can't be trusted; the answer that came whole stands.
            self.keep_alive = False
            raise _Stop
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is None:  # else a trailer: dropped, as nginx does (RFC 9110 6.5.1)
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        end = self._head_end()
        if end > self.pool.max_header_bytes:
            self._stop("the homeserver's header section is too large")
        if status < 200:
            if status == 101:
                self._stop("the homeserver switched protocols unasked")
            # 100 Continue, 103 Early Hints, ...: interim, not the answer. The next head
            # starts right after this one.
            self._informational = True
            self._head_start = end
            offset = end - (self._received - len(self._packet))
            if offset < len(self._packet) and self._packet[offset] in (_CR, _LF):
                self._stop("the homeserver sent an empty line before its answer")
            return
        length = coding = None
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == b"content-length":
                length = value
            elif lowered == b"transfer-encoding":
                coding = value if coding is None else coding + b"," + value
        if coding is not None and coding.strip().lower() != b"chunked":
            # Another coding than chunked alone: a body the pool can't decode, or one
            # delimited by the close; nginx refuses both.
            self._stop("the homeserver used a transfer coding other than chunked")
        self.keep_alive = self.parser.should_keep_alive() and not self.head_only
        response = self.response = Response(self, status, self._headers)
        if self.head_only or status in _NO_BODY_STATUSES:
            self._end = end  # whatever Content-Length says (RFC 9110 8.6)
        elif coding is not None:
            self._end = _END_CHUNKED
        elif length is not None:
            self._end = end + int(length)  # llhttp let through digits only
        else:
            response._eof_delimited = True
        head = self.head
        if self.head_only:
            response._finish()
        if head is not None and not head.done():
            head.set_result(response)
        self.resume_writing()  # a body still being sent stops: the answer is here

    def on_body(self, body: bytes) -> None:
        if self.response is not None and not self.head_only:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._done = True
        self._cancel_timer()
        if self.keep_alive and not self._ended_here():
            self.keep_alive = False
        if self.response is not None:
            self.response._finish()

    def _head_end(self) -> int:
        """Where the head that just ended ends, as an offset into the exchange's bytes.
        llhttp wants CRLF line ends, so it is the first empty line after the head's
        start; the head ended in this packet, but may have begun in an earlier one (3
        bytes of which are kept)."""
        packet = self._packet
        start = self._received - len(packet)
        if self._head_start >= start:
            found = packet.find(b"\r\n\r\n", self._head_start - start)
            offset = start
        else:
            window = self._tail + packet
            offset = start - len(self._tail)
            found = window.find(b"\r\n\r\n", max(self._head_start - offset, 0))
        if found < 0:  # unreachable while llhttp wants CRLF; were it not, trust nothing
            self._stop("the homeserver's answer could not be delimited")
        return offset + found + 4

    def _ended_here(self) -> bool:
        """Whether the final answer, just complete, took the last byte received: else
        bytes followed it (empty lines, which llhttp skips silently, or the start of
        another answer), and the connection is not reused."""
        end = self._end
        if end == _END_CHUNKED:
            # The last chunk and trailers end with an empty line after a non-empty one;
            # a terminator split across reads is not told apart: not reused either.
            packet = self._packet
            return (
                len(packet) >= 5 and packet.endswith(b"\r\n\r\n") and packet[-5] not in (_CR, _LF)
            )
        return end == self._received  # never when unknown (negative)

    # Flow control, timeouts, ending
    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.lost:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.lost:
            self._reading_paused = False
            self._last_activity = time.monotonic()
            self.transport.resume_reading()

    def start_timer(self, read_timeout: float | None) -> None:
        self._read_timeout = read_timeout
        self._last_activity = time.monotonic()
        if read_timeout is not None:
            self._timer = asyncio.get_running_loop().call_later(read_timeout, self._check_silence)

    def _check_silence(self) -> None:
        """Fired `read` seconds after the last activity was last checked: silent since?"""
        timeout = self._read_timeout
        assert timeout is not None
        if self._reading_paused:
            # The client is the slow one; the upstream is waiting on us.
            self._last_activity = time.monotonic()
        silent = time.monotonic() - self._last_activity
        if silent >= timeout:
            self._timer = None
            self._fail(ReadTimedOut("the homeserver did not answer in time"))
            self.abort()
        else:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(timeout - silent, self._check_silence)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _stop(self, message: str) -> NoReturn:
        """From a parser callback: fail the exchange and stop parsing."""
        self._fail(BadAnswer(message))
        raise _Stop

    def _reject(self, message: str) -> None:
        self._fail(BadAnswer(message))
        self.abort()

    def _fail(self, error: BaseException) -> None:
        self._cancel_timer()
        head = self.head
        if head is not None and not head.done():
            head.set_exception(error)
        if self.response is not None:
            self.response._finish(error)

    async def write_body(
        self, body: AsyncIterable[bytes], chunked: bool, write_timeout: float | None
    ) -> None:
        transport = self.transport
        assert transport is not None
        async for chunk in body:
            if self.lost or self.response is not None:
                # Answered (an early 413, say) or gone: the rest is not wanted, and the
                # connection, its request cut short, is never reused.
                self.keep_alive = False
                return
            if chunk:
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            await self.drain(write_timeout)
        if chunked and not self.lost:
            transport.write(b"0\r\n\r\n")

    async def drain(self, write_timeout: float | None) -> None:
        waiter = self._write_ready
        if waiter is None or self.lost:
            return
        try:
            await asyncio.wait_for(asyncio.shield(waiter), write_timeout)
        except TimeoutError:
            raise WriteTimedOut("the homeserver did not take the request body") from None

    def finish_exchange(self, *, reusable: bool) -> None:
        self._cancel_timer()
        keep = reusable and self.keep_alive and not self.lost
        self.head = None
        self.response = None
        self.head_only = False
        if not keep:
            self.abort()
        self.pool.release(self, keep)

    def discard(self) -> None:
        """Drop a connection whose exchange failed, keeping the pool slot for a retry."""
        self._cancel_timer()
        self.head = None
        self.response = None
        self.abort()
        self.pool.forget(self)

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.lost = True
            self.transport.abort()


class UpstreamPool:
    """Connections to one upstream, at most `max_connections` in use at a time."""

    def __init__(
        self,
        url: str,
        *,
        max_connections: int | None,
        max_keepalive_connections: int | None,
        keepalive_expiry: float = 15.0,
        max_header_bytes: int = 64 * 1024,
    ) -> None:
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https"):
            raise ValueError(f"unsupported upstream scheme: {parsed.scheme}")
        self.host = parsed.host
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.ssl = parsed.scheme == "https"
        self.host_header = parsed.netloc
        self._literal = _is_ip(self.host)
        self._resolved: list[tuple[str, int]] = []
        self._resolved_until = 0.0
        self._lookup: asyncio.Future[list[tuple[str, int]]] | None = None
        self._slots = _Slots(max_connections)
        self._max_idle = max_keepalive_connections
        self._keepalive_expiry = keepalive_expiry
        self.max_header_bytes = max_header_bytes
        self._idle: collections.deque[_Connection] = collections.deque()
        self._all: set[_Connection] = set()

    @property
    def connections(self) -> int:
        return len(self._all)

    async def send(
        self,
        method: str,
        target: bytes,
        headers: RawHeaders,
        body: Body,
        timeouts: ExchangeTimeouts,
    ) -> Response:
        """Send a request; return once the answer's head has arrived."""
        await self._slots.acquire(timeouts.pool)
        connection: _Connection | None = None
        try:
            connection, reused = await self._connection(timeouts.connect)
            try:
                return await self._exchange(connection, method, target, headers, body, timeouts)
            except BadAnswer:
                if not (
                    reused
                    and connection.unanswered
                    and body is None
                    and method in _RETRYABLE_METHODS
                ):
                    raise
            # The homeserver closed the idle connection as the request left: nothing was
            # processed that a second sending could repeat (RFC 9112 9.3.1).
            connection.discard()
            connection = None
            connection = await self._open(timeouts.connect)
            return await self._exchange(connection, method, target, headers, body, timeouts)
        except BaseException:
            if connection is not None:
                connection.finish_exchange(reusable=False)
            else:
                self._slots.release()
            raise

    async def _connection(self, connect_timeout: float | None) -> tuple[_Connection, bool]:
        """An idle connection (True) or a new one (False)."""
        idle = self._idle
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if (
                not connection.lost
                and now - connection.idle_since < self._keepalive_expiry
                and not connection.dropped()
            ):
                return connection, True
            connection.abort()
            self._all.discard(connection)
        return await self._open(connect_timeout), False

    async def _open(self, connect_timeout: float | None) -> _Connection:
        try:
            async with asyncio.timeout(connect_timeout):
                protocol = await self._connect()
        except TimeoutError:
            raise ConnectTimedOut("connecting to the homeserver timed out") from None
        except OSError as exc:
            raise connect_failure(exc, f"{self.host}:{self.port}") from None
        self._all.add(protocol)
        return protocol

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        error: OSError | None = None
        for host, port in await self._addresses():
            connection = _Connection(self)
            try:
                await loop.create_connection(
                    lambda made=connection: made,
                    host,
                    port,
                    ssl=self.ssl or None,
                    server_hostname=self.host if self.ssl else None,
                )
                return connection
            except OSError as exc:
                error = exc
            except BaseException:
                connection.abandon()
                raise
        try:
            raise error or OSError(f"no address for {self.host}")
        finally:
            error = None  # held here, its traceback would hold this frame: a cycle

    async def _addresses(self) -> list[tuple[str, int]]:
        """The upstream's addresses, looked up at most every `_DNS_TTL` seconds: a burst
        of new connections (every long-poll at once) must not mean a lookup each."""
        if self._literal:
            return [(self.host, self.port)]
        if time.monotonic() < self._resolved_until:
            return self._resolved
        lookup = self._lookup
        if lookup is None:  # one lookup for all the connections waiting on it
            lookup = self._lookup = asyncio.ensure_future(self._resolve())
        try:
            return await asyncio.shield(lookup)
        finally:
            if lookup.done() and self._lookup is lookup:
                self._lookup = None

    async def _resolve(self) -> list[tuple[str, int]]:
        infos = await asyncio.get_running_loop().getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM
        )
        self._resolved = [(str(info[4][0]), int(info[4][1])) for info in infos]
        self._resolved_until = time.monotonic() + _DNS_TTL
        return self._resolved

    async def _exchange(
        self,
        connection: _Connection,
        method: str,
        target: bytes,
        headers: RawHeaders,
        body: Body,
        timeouts: ExchangeTimeouts,
    ) -> Response:
        transport = connection.transport
        assert transport is not None
        head = connection.begin(method == "HEAD")
        chunked = False
        lines = [b"%s %s HTTP/1.1\r\n" % (method.encode(), target)]
        has_host = has_length = False
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"host":
                has_host = True
            elif lowered == b"content-length":
                has_length = True
            lines.append(b"%s: %s\r\n" % (name, value))
        if not has_host:
            lines.insert(1, b"host: %s\r\n" % self.host_header)
        if isinstance(body, bytes):
            if not has_length:
                lines.append(b"content-length: %d\r\n" % len(body))
            lines.append(b"\r\n")
            lines.append(body)
        elif body is not None:
            chunked = not has_length
            if chunked:
                lines.append(b"transfer-encoding: chunked\r\n")
            lines.append(b"\r\n")
        else:
            lines.append(b"\r\n")
        connection.start_timer(timeouts.read)
        transport.write(b"".join(lines))
        if body is not None and not isinstance(body, bytes):
            await connection.write_body(body, chunked, timeouts.write)
        try:
            response: Response = await head
        finally:
            del head  # held here, a failure in it would hold this frame: a cycle
        return response

    def release(self, connection: _Connection, keep: bool) -> None:
        self._slots.release()
        if not keep:
            self._all.discard(connection)
            return
        connection.idle_since = now = time.monotonic()
        idle = self._idle
        if self._max_idle is not None and len(idle) >= self._max_idle:
            connection.abort()
            self._all.discard(connection)
            return
        idle.append(connection)
        # Expire the longest-idle connection on the way: no timer per connection.
        oldest = idle[0]
        if now - oldest.idle_since >= self._keepalive_expiry:
            idle.popleft().abort()

    def forget(self, connection: _Connection) -> None:
        self._all.discard(connection)

    async def aclose(self) -> None:
        for connection in list(self._all):
            connection.abort()
        self._all.clear()
        self._idle.clear()
