"""The upstream pool on its own, against a real server on loopback."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme

from ignore_proxy.pool import (
    ExchangeTimeouts,
    RawHeaders,
    UpstreamError,
    UpstreamPool,
)

from .servers import Upstream, serve_upstream

T = TypeVar("T")

TIMEOUTS = ExchangeTimeouts(connect=5, read=5, write=5, pool=5)


async def test_a_hostname_is_looked_up_once_for_a_burst_of_new_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with serve_upstream(Upstream()) as url:
        port = url.rsplit(":", 1)[1]
        pool = UpstreamPool(
            f"http://localhost:{port}", max_connections=None, max_keepalive_connections=None
        )
        loop = asyncio.get_running_loop()
        lookups: list[Any] = []
        real = loop.getaddrinfo

        async def counted(*args: Any, **kwargs: Any) -> Any:
            lookups.append(args)
            return await real(*args, **kwargs)

        monkeypatch.setattr(loop, "getaddrinfo", counted)
        responses = await asyncio.gather(
            *(pool.send("GET", b"/x", [(b"host", b"hs")], None, TIMEOUTS) for _ in range(10))
        )
        assert pool.connections == 10  # ten new connections at once
        for response in responses:
            assert response.status_code == 200
            assert b'"ok":true' in await response.read()
            await response.aclose()
        assert len(lookups) == 1
        await pool.aclose()


def _serve_then_close(listener: socket.socket) -> None:
    """Answers each connection's first request, keeps it alive a moment, then closes it."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            time.sleep(0.05)


async def _second_answer_after_a_busy_loop(
    serve: Callable[[socket.socket], None], method: str, headers: RawHeaders, body: bytes | None
) -> bytes:
    """One answer on a new connection, back to the pool idle; then, after the event loop
    was kept busy (it cannot see what `serve` did to that connection meanwhile), the
    answer to a second request through the same pool."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        threading.Thread(target=serve, args=(listener,), daemon=True).start()
        port = listener.getsockname()[1]
        pool = UpstreamPool(
            f"http://127.0.0.1:{port}", max_connections=None, max_keepalive_connections=None
        )
        first = await pool.send("GET", b"/a", [], None, TIMEOUTS)
        assert await first.read() == b"ok"
        await first.aclose()  # back to the pool, idle
        time.sleep(0.3)  # noqa: ASYNC251 (the point: the loop cannot see the connection)
        second = await pool.send(method, b"/b", headers, body, TIMEOUTS)
        answer = await second.read()
        await second.aclose()
        await pool.aclose()
        return answer


async def test_an_idle_connection_the_homeserver_closed_is_not_reused() -> None:
    """Closed while the event loop was busy (it has not seen the close yet): the GET gets
    its answer all the same (the check finds the close, or else the GET, never acted on,
    is sent again on a new connection; the PUT below has only the check)."""
    assert await _second_answer_after_a_busy_loop(_serve_then_close, "GET", [], None) == b"ok"


async def test_a_request_never_sent_twice_avoids_an_idle_connection_closed_unseen() -> None:
    """A PUT with a body is never sent twice (the homeserver may have acted on it), so the
    pool must find the close before it writes, not after."""
    headers = [(b"content-length", b"2")]
    answer = await _second_answer_after_a_busy_loop(_serve_then_close, "PUT", headers, b"{}")
    assert answer == b"ok"


def _serve_then_send_out_of_turn(listener: socket.socket) -> None:
    """Answers a connection's first request, then sends an answer nobody asked for on it
    (as a homeserver whose answer was longer than it said would); answers every other
    connection plainly."""
    first = True
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        if first:
            first = False
            time.sleep(0.05)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstray")
            threading.Timer(2, conn.close).start()
        else:
            conn.close()


async def test_an_idle_connection_with_bytes_out_of_turn_is_not_reused() -> None:
    """Bytes arrived on an idle connection while the event loop was busy: a request sent
    on it would take them for its answer (another request's data, on a shared pool)."""
    answer = await _second_answer_after_a_busy_loop(_serve_then_send_out_of_turn, "GET", [], None)
    assert answer == b"ok"


def _serve_keep_alive(listener: socket.socket, accepted: list[socket.socket]) -> None:
    """Answers every request on every connection, keeping each open; records each one."""

    def answer(conn: socket.socket) -> None:
        with conn:
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                data = data.split(b"\r\n\r\n", 1)[1]
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        accepted.append(conn)
        threading.Thread(target=answer, args=(conn,), daemon=True).start()


async def test_an_idle_connection_is_reused_only_within_the_keepalive_expiry() -> None:
    """Homeservers close idle connections (after 30 s on hyper); the pool stops reusing
    one before that, rather than send a request the closing would cut."""
    accepted: list[socket.socket] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        threading.Thread(target=_serve_keep_alive, args=(listener, accepted), daemon=True).start()
        port = listener.getsockname()[1]
        pool = UpstreamPool(
            f"http://127.0.0.1:{port}",
            max_connections=None,
            max_keepalive_connections=None,
            keepalive_expiry=0.3,
        )
        connections = []
        for pause in (0.0, 0.05, 0.5):
            await asyncio.sleep(pause)
            response = await pool.send("GET", b"/a", [], None, TIMEOUTS)
            assert await response.read() == b"ok"
            await response.aclose()
            connections.append(len(accepted))
        assert connections == [1, 1, 2]  # reused after 0.05 s idle, not after 0.5 s
        await pool.aclose()


# An answer of 66,000 bytes, sent in two writes: the first stays under the pool's 64 KiB
# high-water mark, the second takes it past as it completes the answer.
_WHOLE_PAST_HIGH_WATER = 66_000


def _tls_server_context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """A server context for `localhost` under a test CA the pool is made to trust."""
    authority = trustme.CA()
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(context)
    return context


def _run_in(loop: str, coroutine: Coroutine[Any, Any, T]) -> T:
    """`coroutine` run to its end in a new event loop of kind `loop`."""
    if loop == "uvloop":
        result: T = pytest.importorskip("uvloop").run(coroutine)
        return result
    return asyncio.run(coroutine)


def _serve_tls_then_send_out_of_turn(
    listener: socket.socket, context: ssl.SSLContext, stray_sent: threading.Event
) -> None:
    """Over TLS: answers a connection's first request past the pool's high-water mark,
    then sends an answer nobody asked for; answers every other connection with `fresh`."""
    first = True
    while True:
        try:
            raw, _ = listener.accept()
        except OSError:
            return
        conn = context.wrap_socket(raw, server_side=True)
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        if first:
            first = False
            head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % _WHOLE_PAST_HIGH_WATER
            conn.sendall(head + b"a" * 65_000)
            time.sleep(0.1)
            conn.sendall(b"a" * (_WHOLE_PAST_HIGH_WATER - 65_000))
            time.sleep(0.1)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstray")
            stray_sent.set()
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfresh")
        threading.Timer(3, conn.close).start()


async def _reuse_after_bytes_held_by_tls(port: int, stray_sent: threading.Event) -> bytes:
    pool = UpstreamPool(
        f"https://localhost:{port}", max_connections=None, max_keepalive_connections=None
    )
    try:
        first = await pool.send("GET", b"/a", [], None, TIMEOUTS)
        assert await asyncio.to_thread(stray_sent.wait, 5)
        await asyncio.sleep(0.2)  # the event loop reads the stray answer off the socket
        (connection,) = pool._all
        assert connection._reading_paused  # else this test would prove nothing
        assert len(await first.read()) == _WHOLE_PAST_HIGH_WATER
        await first.aclose()  # idle; TLS hands what it holds over on the loop's next turn
        second = await pool.send("GET", b"/b", [], None, TIMEOUTS)
        answer = await second.read()
        await second.aclose()
        return answer
    finally:
        await pool.aclose()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_an_idle_tls_connection_holding_bytes_out_of_turn_is_not_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    """TLS reads ahead of the pool: what arrives while the pool's reading is paused (an
    answer that came whole past the high-water mark) waits in the TLS layer, off the
    socket, and is handed over only on the event loop's next turn. No poll of the socket
    sees it; taken for the next request's answer, it would be another request's data."""
    context = _tls_server_context(tmp_path, monkeypatch)
    stray_sent = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        threading.Thread(target=_serve_tls_then_send_out_of_turn,
                         args=(listener, context, stray_sent), daemon=True).start()  # fmt: skip
        port = listener.getsockname()[1]
        assert _run_in(loop, _reuse_after_bytes_held_by_tls(port, stray_sent)) == b"fresh"


def _serve_tls_answer_ended_by_close(
    listener: socket.socket, context: ssl.SSLContext, closed: threading.Event
) -> None:
    """Over TLS: an answer without length or chunking (it ends where the connection
    does), then the end of the TCP stream at once, without TLS's close_notify."""
    raw, _ = listener.accept()
    conn = context.wrap_socket(raw, server_side=True)
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    conn.sendall(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + b"a" * 200_000)
    with socket.socket(fileno=conn.detach()) as bare:
        bare.shutdown(socket.SHUT_RDWR)
    closed.set()


async def _read_after_close(port: int, closed: threading.Event) -> int | str:
    """How much of the answer was read whole, or the failure reading it raised."""
    pool = UpstreamPool(
        f"https://localhost:{port}", max_connections=None, max_keepalive_connections=None
    )
    try:
        response = await pool.send("GET", b"/a", [], None, TIMEOUTS)
        assert await asyncio.to_thread(closed.wait, 5)
        await asyncio.sleep(0.2)  # the event loop reads the end of the stream
        try:
            return len(await response.read())
        except UpstreamError as exc:
            return type(exc).__name__
        finally:
            await response.aclose()
    finally:
        await pool.aclose()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_an_answer_ended_by_the_close_over_tls_is_whole_or_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    """What TLS held while the pool's reading was paused (a client slower than the
    homeserver) is dropped by uvloop when the stream ends: an answer that ends with the
    connection must then come out cut, never shorter and looking whole."""
    context = _tls_server_context(tmp_path, monkeypatch)
    closed = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        threading.Thread(target=_serve_tls_answer_ended_by_close,
                         args=(listener, context, closed), daemon=True).start()  # fmt: skip
        port = listener.getsockname()[1]
        assert _run_in(loop, _read_after_close(port, closed)) in (200_000, "BadAnswer")


async def test_an_idle_connection_whose_socket_is_unknown_is_not_reused() -> None:
    """Without its socket the pool cannot look for bytes out of turn: it does not reuse."""
    accepted: list[socket.socket] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        threading.Thread(target=_serve_keep_alive, args=(listener, accepted), daemon=True).start()
        port = listener.getsockname()[1]
        pool = UpstreamPool(
            f"http://127.0.0.1:{port}", max_connections=None, max_keepalive_connections=None
        )
        try:
            for _ in range(2):
                response = await pool.send("GET", b"/a", [], None, TIMEOUTS)
                assert await response.read() == b"ok"
                await response.aclose()
                for connection in pool._all:
                    connection._fileno = None  # as for a transport that names no socket
            assert len(accepted) == 2
        finally:
            await pool.aclose()


def test_the_pool_bounds_upstream_headers_as_configured() -> None:
    from ignore_proxy.config import Limits, Settings
    from ignore_proxy.upstream import create_pool

    settings = Settings(upstream="http://127.0.0.1:1", limits=Limits(max_header_bytes=4096))
    assert create_pool(settings).max_header_bytes == 4096
    default = UpstreamPool("http://hs", max_connections=1, max_keepalive_connections=1)
    assert default.max_header_bytes == 64 * 1024
