"""Requests leave no cyclic garbage: what the proxy makes for a request is freed by
reference counting as the request ends, never left for the garbage collector (whose
thresholds `server.py` raises on that ground).

Each kind of request is sent through the production path (uvicorn with the proxy's
protocol, the app, its pools, uvloop) a number of times with the collector off; the
collection after them must find nothing at all. The homeserver is `FakeHomeserver` in the
same loop (or, for broken answers, a few lines of raw protocol below), the client raw
sockets: both leave no garbage of their own under uvloop, so whatever is found is the
proxy's. A failure names the types found; `gc.DEBUG_SAVEALL` and `gc.get_referents` show
the cycle.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import socket
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

import httpx
import pytest

from ignore_proxy.app import IgnoreProxyApp, create_app
from ignore_proxy.config import load_settings
from ignore_proxy.pool import ExchangeTimeouts, UpstreamPool
from ignore_proxy.server import Listener, uvicorn_config

from .fake_homeserver import ALICE, BOB, CHARLIE, ROOM, FakeHomeserver, message
from .servers import serve_handler, stop_served_handlers
from .test_proxy import sync_body

uvloop = pytest.importorskip("uvloop")

REQUESTS = 50
WARM_UP = 5  # first requests fill caches, open connections and import lazily
SYNC = "/_matrix/client/v3/sync"
LONG_POLL = SYNC + "?timeout=30000"
OUTSIDE_TABLE = "/_matrix/client/v3/profile/@charlie:hs/displayname"

Send = Callable[[int], Awaitable[None]]


def _kind(obj: object) -> str:
    """What an object found by the collector is, for the failure message."""
    if isinstance(obj, types.FrameType):
        return f"frame of {obj.f_code.co_qualname} ({obj.f_code.co_filename})"
    if isinstance(obj, types.CoroutineType):
        return f"coroutine {obj.__qualname__}"
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


async def _settle() -> None:
    """Callbacks the loop has yet to run (a closed connection's `connection_lost`)."""
    for _ in range(3):
        await asyncio.sleep(0.02)


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.005)


async def _garbage_of(send: Send) -> collections.Counter[str]:
    """What the collector finds after `REQUESTS` requests made by `send`, warmed up."""
    for i in range(WARM_UP):
        await send(i)
    await _settle()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for i in range(WARM_UP, WARM_UP + REQUESTS):
            await send(i)
        await _settle()
        gc.collect()
        return collections.Counter(_kind(obj) for obj in gc.garbage)
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
        gc.enable()


async def _ask(port: int, target: str, token: str | None) -> tuple[int, bytes]:
    """One request on a connection of its own; the answer's status and body."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: proxy.test\r\n{auth}\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return int(head.split(b" ", 2)[1]), await reader.readexactly(length)
    finally:
        writer.close()
        await writer.wait_closed()


@contextlib.asynccontextmanager
async def _proxy(upstream: str) -> AsyncIterator[tuple[int, IgnoreProxyApp]]:
    """The proxy as `serve` runs it (its uvicorn configuration, the app, the lifespan)."""
    settings = load_settings(environ={"IGNORE_PROXY_UPSTREAM": upstream})
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    listener = Listener(uvicorn_config(settings, app))
    task = asyncio.get_running_loop().create_task(listener.serve(sockets=[sock]))
    try:
        await _until(lambda: listener.started, "the proxy did not start")
        yield sock.getsockname()[1], app
    finally:
        listener.should_exit = True
        await task
        sock.close()


class _BrokenAnswers(asyncio.Protocol):
    """A homeserver that knows alice (who ignores bob) and breaks every `/sync` answer:
    the connection cut before it (`?reset`) or in the middle of its body (`?cut`)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.buffer = b""

    def answer(self, body: bytes) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%b" % (len(body), body))  # fmt: skip

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            target = head.split(b" ", 2)[1]
            if b"/whoami" in target:
                self.answer(b'{"user_id": "%b"}' % ALICE.encode())
            elif b"/m.ignored_user_list" in target:
                self.answer(b'{"ignored_users": {"%b": {}}}' % BOB.encode())
            elif b"cut" in target:
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{")
                asyncio.get_running_loop().call_later(0.01, self.transport.abort)
            else:
                self.transport.abort()


def _homeserver() -> FakeHomeserver:
    homeserver = FakeHomeserver()
    homeserver.ignore(ALICE, BOB)
    homeserver.answers[("GET", "/sync")] = sync_body(
        message("$a1", ALICE), message("$b1", BOB), message("$c1", CHARLIE)
    )
    homeserver.answers[("GET", "/profile/@charlie:hs/displayname")] = {"displayname": "C"}
    return homeserver


async def _filtered(port: int, token: str) -> None:
    status, body = await _ask(port, SYNC, token)
    assert status == 200 and b"$c1" in body and b"$b1" not in body


async def _through_fake_homeserver(kind: str) -> collections.Counter[str]:
    homeserver = _homeserver()
    async with _proxy(serve_handler(homeserver)) as (port, _):

        async def send(i: int) -> None:
            if kind == "filtered sync":
                await _filtered(port, "alice-token")
            elif kind == "outside the table":
                assert (await _ask(port, OUTSIDE_TABLE, "alice-token"))[0] == 200
            elif kind == "relations":
                target = f"/_matrix/client/v3/rooms/{ROOM}/relations/$unknown"
                assert (await _ask(port, target, "alice-token"))[0] == 404
            elif kind == "list unavailable":
                homeserver.account_data_status = 500
                assert (await _ask(port, SYNC, "alice-token"))[0] == 503
            elif kind == "refused token":
                assert (await _ask(port, SYNC, f"refused-{i}"))[0] == 401
            elif kind == "new token":
                user = f"@new{i}:hs"
                homeserver.tokens[f"new-{i}"] = user
                homeserver.ignore(user, BOB)
                await _filtered(port, f"new-{i}")

        return await _garbage_of(send)


async def _upstream_down() -> collections.Counter[str]:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}"
    async with _proxy(down) as (port, _):

        async def send(i: int) -> None:
            assert (await _ask(port, SYNC, "alice-token"))[0] == 502
            assert (await _ask(port, OUTSIDE_TABLE, "alice-token"))[0] == 502

        return await _garbage_of(send)


async def _broken_answers(fault: str) -> collections.Counter[str]:
    server = await asyncio.get_running_loop().create_server(_BrokenAnswers, "127.0.0.1", 0)
    upstream = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server, _proxy(upstream) as (port, _):

        async def send(i: int) -> None:
            assert (await _ask(port, f"{SYNC}?{fault}", "alice-token"))[0] == 502

        return await _garbage_of(send)


async def _client_gone() -> collections.Counter[str]:
    """Long-polls whose client goes away while the homeserver holds them."""
    homeserver = _homeserver()
    parked = 0
    release = asyncio.Event()

    async def holding(request: httpx.Request) -> httpx.Response:
        nonlocal parked
        if b"timeout=" in request.url.query:
            parked += 1
            await release.wait()
        return homeserver(request)

    async with _proxy(serve_handler(holding)) as (port, app):

        async def send(i: int) -> None:
            before = parked
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            auth = "Authorization: Bearer alice-token\r\n"
            writer.write(f"GET {LONG_POLL} HTTP/1.1\r\nHost: proxy.test\r\n{auth}\r\n".encode())
            await _until(lambda: parked > before, "the long-poll did not reach the homeserver")
            writer.transport.abort()
            # The proxy cancels the request, closing its upstream connection.
            await _until(lambda: app.pool.connections == 0, "the upstream request stayed")

        try:
            return await _garbage_of(send)
        finally:
            release.set()


async def _connects_cancelled() -> collections.Counter[str]:
    """Upstream connections whose requests are cancelled at each step of connecting
    (before, while and after: a client gone, a lookup no longer wanted)."""
    server = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
    pool = UpstreamPool(
        f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}",
        max_connections=None,
        max_keepalive_connections=None,
    )
    no_limits = ExchangeTimeouts(None, None, None, None)

    async def send(i: int) -> None:
        task = asyncio.ensure_future(pool.send("GET", b"/", [], None, no_limits))
        for _ in range(i % 8):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async with server:
        try:
            return await _garbage_of(send)
        finally:
            await pool.aclose()


async def _run(kind: str) -> collections.Counter[str]:
    async with asyncio.timeout(60):
        try:
            if kind == "upstream down":
                return await _upstream_down()
            if kind in ("reset", "cut"):
                return await _broken_answers(kind)
            if kind == "client gone":
                return await _client_gone()
            if kind == "connects cancelled":
                return await _connects_cancelled()
            return await _through_fake_homeserver(kind)
        finally:
            await stop_served_handlers()


@pytest.mark.parametrize(
    "kind",
    [
        "filtered sync",  # a known user with a non-empty list
        "outside the table",  # relayed as it is
        "relations",  # answered at once: the lookup of its event, cancelled
        "list unavailable",  # reading the list fails: 503
        "refused token",  # whoami answers 401
        "new token",  # whoami and the ignore list looked up
        "upstream down",  # 502, the lookups failing too
        "reset",  # the connection cut before the answer: 502
        "cut",  # ... in the middle of the body: 502
        "client gone",  # a long-poll cancelled
        "connects cancelled",  # the pool alone
    ],
)
def test_requests_leave_no_cyclic_garbage(kind: str) -> None:
    found = uvloop.run(_run(kind))
    assert not found, f"{kind}: {sum(found.values())} objects in cycles: {found.most_common(12)}"
