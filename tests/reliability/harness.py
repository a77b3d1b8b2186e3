# ruff: noqa: ASYNC109
"""Tools for the reliability suite: an HTTP/1.1 upstream written on raw asyncio sockets
(so a test decides exactly when bytes flow, stall or the connection is cut, and counts
every connection from the upstream's side), a raw HTTP client, and /proc readings of the
proxy process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

# The same users and events as the in-process tier's homeserver.
from ..fake_homeserver import ALICE as ALICE
from ..fake_homeserver import BOB as BOB
from ..fake_homeserver import CHARLIE as CHARLIE
from ..fake_homeserver import ROOM as ROOM
from ..fake_homeserver import message as message
from ..servers import free_port

SYNC = "/_matrix/client/v3/sync"


@dataclass
class Request:
    method: str
    target: bytes
    headers: dict[bytes, bytes]
    body: bytes

    @property
    def path(self) -> str:
        return unquote(self.target.split(b"?")[0].decode("latin-1"))

    @property
    def query(self) -> dict[str, list[str]]:
        _, _, query = self.target.partition(b"?")
        return parse_qs(query.decode("latin-1"))

    @property
    def token(self) -> str | None:
        auth = self.headers.get(b"authorization", b"").decode("latin-1")
        if auth.startswith("Bearer "):
            return auth[7:]
        return self.query.get("access_token", [None])[0]


class Conn:
    """One accepted upstream connection; handlers write through it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def idle(self, seconds: float) -> bool:
        """Wait, reading nothing of use, until the peer closes (True) or time is up."""
        try:
            async with asyncio.timeout(seconds):
                while await self.reader.read(65536):
                    pass
                return True
        except (TimeoutError, ConnectionError):
            return False

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def respond(
        self, status: int, body: bytes, ctype: bytes = b"application/json", extra: bytes = b""
    ) -> None:
        head = b"HTTP/1.1 %d X\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n" % (
            status,
            ctype,
            len(body),
            extra,
        )
        await self.send(head + body)

    async def json(self, status: int, value: Any) -> None:
        await self.respond(status, json.dumps(value).encode())

    def reset(self) -> None:
        """Cut the connection abruptly (RST)."""
        self.writer.transport.abort()


Handler = Callable[[Request, Conn], Awaitable[bool | None]]  # False: close afterwards


def sync_body(*events: dict[str, Any]) -> dict[str, Any]:
    return {
        "next_batch": "s2",
        "rooms": {"join": {ROOM: {"timeline": {"events": list(events), "limited": False}}}},
    }


@dataclass
class MiniHomeserver:
    """Tokens, ignore lists, whoami; everything else is the test's `route` handler."""

    tokens: dict[str, str] = field(
        default_factory=lambda: {"alice-token": ALICE, "charlie-token": CHARLIE}
    )
    ignores: dict[str, list[str]] = field(default_factory=lambda: {ALICE: [BOB]})
    whoami_calls: int = 0
    whoami_in_flight: int = 0
    whoami_peak: int = 0
    whoami_delay: float = 0.0
    route: Handler | None = None

    async def __call__(self, req: Request, conn: Conn) -> bool | None:
        user = self.tokens.get(req.token or "")
        if req.path.endswith("/account/whoami"):
            self.whoami_calls += 1
            self.whoami_in_flight += 1
            self.whoami_peak = max(self.whoami_peak, self.whoami_in_flight)
            try:
                if self.whoami_delay:
                    await asyncio.sleep(self.whoami_delay)
            finally:
                self.whoami_in_flight -= 1
            if user is None:
                await conn.json(401, {"errcode": "M_UNKNOWN_TOKEN", "error": "unknown"})
            else:
                await conn.json(200, {"user_id": user})
            return True
        if "/account_data/m.ignored_user_list" in req.path:
            if user is None:
                await conn.json(401, {"errcode": "M_UNKNOWN_TOKEN", "error": "unknown"})
            else:
                ignored = self.ignores.get(user, [])
                await conn.json(200, {"ignored_users": {u: {} for u in ignored}})
            return True
        if req.path.endswith("/versions"):
            await conn.json(200, {"versions": ["v1.11"]})
            return True
        if user is None and not req.path.startswith("/_matrix/media/"):
            await conn.json(401, {"errcode": "M_UNKNOWN_TOKEN", "error": "unknown"})
            return True
        if self.route is not None:
            return await self.route(req, conn)
        await conn.json(404, {"errcode": "M_UNRECOGNIZED", "error": "no"})
        return True


class RawUpstream:
    """An HTTP/1.1 server on its own event loop thread, counting its connections."""

    def __init__(self, handler: Handler, port: int | None = None) -> None:
        self.handler = handler
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepted = 0
        self.closed = 0
        self.peak_open = 0
        self.requests: list[Request] = []
        self._writers: dict[asyncio.StreamWriter, asyncio.Task[None]] = {}
        self._server: asyncio.Server | None = None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    @property
    def open(self) -> int:
        return self.accepted - self.closed

    def call(self, coro: Awaitable[Any], timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def start(self) -> None:
        async def start() -> None:
            self._server = await asyncio.start_server(
                self._serve, "127.0.0.1", self.port, backlog=4096, limit=1 << 20
            )

        self.call(start())

    def kill(self) -> None:
        """Stop listening and cut every open connection at once."""

        async def kill() -> None:
            assert self._server is not None
            self._server.close()
            tasks = list(self._writers.values())
            for writer, task in list(self._writers.items()):
                writer.transport.abort()
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.call(kill())

    def close(self) -> None:
        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._server.wait_closed()

        with contextlib.suppress(Exception):
            self.call(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.peak_open = max(self.peak_open, self.open)
        task = asyncio.current_task()
        assert task is not None
        self._writers[writer] = task
        conn = Conn(reader, writer)
        try:
            while True:
                req = await _read_request(reader)
                if req is None:
                    return
                self.requests.append(req)
                keep = await self.handler(req, conn)
                if keep is False:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        except asyncio.CancelledError:
            return
        finally:
            self.closed += 1
            self._writers.pop(writer, None)
            writer.transport.abort()


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head[:-4].split(b"\r\n")
    method, target, _ = lines[0].split(b" ", 2)
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    body = b""
    if b"content-length" in headers:
        body = await reader.readexactly(int(headers[b"content-length"]))
    elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(data[:-2])
        body = b"".join(parts)
    return Request(method.decode(), target, headers, body)


@contextlib.contextmanager
def raw_upstream(handler: Handler, port: int | None = None) -> Iterator[RawUpstream]:
    upstream = RawUpstream(handler, port)
    upstream.start()
    try:
        yield upstream
    finally:
        upstream.close()


# --- a raw client -------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    complete: bool  # the body had the length the headers announced

    def json(self) -> Any:
        return json.loads(self.body)


def request_bytes(
    method: str,
    target: str,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: proxy", "Connection: close"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def parse_answer(data: bytes) -> Answer:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    complete = True
    if b"content-length" in headers:
        complete = len(body) == int(headers[b"content-length"])
    elif headers.get(b"transfer-encoding") == b"chunked":
        complete = body.endswith(b"0\r\n\r\n")
        body = _dechunk(body)
    return Answer(status, headers, body, complete)


def _dechunk(data: bytes) -> bytes:
    out, i = [], 0
    while i < len(data):
        end = data.find(b"\r\n", i)
        if end < 0:
            break
        size = int(data[i:end].split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out.append(data[end + 2 : end + 2 + size])
        i = end + 2 + size + 2
    return b"".join(out)


async def fetch(url: str, raw: bytes, timeout: float = 10) -> Answer | None:
    """Send raw request bytes, read until EOF; None if the connection broke first."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(-1), timeout)
    except (ConnectionError, OSError):
        return None
    finally:
        writer.transport.abort()
    if not data:
        return None
    return parse_answer(data)


# --- the proxy process, seen from /proc ---------------------------------------------


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()
