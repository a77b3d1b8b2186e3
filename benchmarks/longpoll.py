"""2,000 concurrent `/sync?timeout=20000` long-polls: an upstream that holds each sync
for its timeout (as a homeserver with nothing new does) and a client that opens them all
at once and times every answer.

`python -m benchmarks.longpoll PORT` serves the upstream.
"""

from __future__ import annotations

import asyncio
import sys
import time

from . import bodies

HOLD = 20.0


def _answer(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip


class _Upstream(asyncio.Protocol):
    whoami = _answer(bodies._dumps(bodies.WHOAMI))
    ignored = _answer(bodies._dumps(bodies.IGNORE_LIST))
    sync = _answer(bodies.empty_sync())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            target = head.split(b" ", 2)[1]
            if b"/whoami" in target:
                self.transport.write(self.whoami)  # type: ignore[attr-defined]
            elif b"m.ignored_user_list" in target:
                self.transport.write(self.ignored)  # type: ignore[attr-defined]
            else:
                hold = HOLD if b"timeout=" in target else 0.0
                asyncio.get_running_loop().call_later(hold, self._send, self.sync)

    def _send(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)  # type: ignore[attr-defined]


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Upstream, "127.0.0.1", port, backlog=8192)
    async with server:
        await server.serve_forever()


async def _one(port: int, request: bytes, results: list[float], failures: list[str]) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        # From the moment the request is sent: what the client sees as its long-poll.
        # (Opening 2,000 connections at once costs this client's own loop time too.)
        started = time.monotonic()
        head = await reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await reader.readexactly(length)
        writer.close()
        if status != b"200":
            failures.append(status.decode())
        else:
            results.append(time.monotonic() - started)
    except Exception as exc:
        failures.append(type(exc).__name__)


async def poll_all(port: int, count: int) -> tuple[list[float], list[str]]:
    target = f"/_matrix/client/v3/sync?since=s1_0_0&timeout={int(HOLD * 1000)}"
    request = (f"GET {target} HTTP/1.1\r\nHost: bench.example\r\n"
               f"Authorization: Bearer {bodies.TOKEN}\r\n\r\n").encode()  # fmt: skip
    results: list[float] = []
    failures: list[str] = []
    await asyncio.gather(*(_one(port, request, results, failures) for _ in range(count)))
    return results, failures


def run_client(port: int, count: int) -> tuple[list[float], list[str]]:
    try:
        import uvloop

        return uvloop.run(poll_all(port, count))
    except ImportError:
        return asyncio.run(poll_all(port, count))


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(serve(int(sys.argv[1])))
    except ImportError:
        asyncio.run(serve(int(sys.argv[1])))
