"""Two reference relays that forward everything and judge nothing, to tell what the proxy's
own work costs from what forwarding costs at all (`python -m benchmarks.beside_synapse
--compare` runs the same traffic through each):

- `uvicorn`: the proxy's server (its uvicorn configuration and protocol, uvloop, its
  collector settings) and forwarder (the upstream pool, `send_reply`) with nothing between
  them: no route table, no identity, no lists, no rewriting, no metrics, no logs. The
  floor of any proxy built on this stack.
- `uvloop`: a hand-written keep-alive relay on a bare uvloop protocol: requests and
  answers framed by `Content-Length` or chunked (as Synapse sends them), passed on as
  the bytes they came as. The floor of a Python proxy at all.

    python -m benchmarks.relays uvicorn --upstream URL --listen HOST:PORT
    python -m benchmarks.relays uvloop --upstream URL --listen HOST:PORT

Neither is fit to serve anyone: they exist to be measured.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import deque
from urllib.parse import urlsplit

import uvicorn
import uvloop
from starlette.types import Receive, Scope, Send

from ignore_proxy.config import Settings
from ignore_proxy.descriptors import raise_open_files_limit
from ignore_proxy.pool import UpstreamError
from ignore_proxy.replies import Relay, send_reply, upstream_failure
from ignore_proxy.server import settle_heap, uvicorn_config
from ignore_proxy.upstream import (
    REQUEST_ONLY,
    create_pool,
    forwardable,
    long_poll_ms,
    target,
    timeouts_for,
)

_HEAD_END = b"\r\n\r\n"
# The relays by name, and how the benchmarks' tables call them.
RELAYS = {
    "uvicorn": "uvicorn relay (the proxy's server and pool, nothing judged)",
    "uvloop": "uvloop relay (hand-written, nothing judged)",
}


def command(kind: str, upstream: str, listen: str) -> list[str]:
    """The command line that serves relay `kind` (run from the repository's root)."""
    return [sys.executable, "-m", "benchmarks.relays", kind, "--upstream", upstream,
            "--listen", listen]  # fmt: skip


class UvicornRelay:
    """An ASGI app that forwards each request through the proxy's pool and streams the
    answer back through the proxy's one exit."""

    def __init__(self, upstream: str) -> None:
        self.settings = Settings(upstream=upstream)
        self.pool = create_pool(self.settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        query: bytes = scope["query_string"]
        try:
            response = await self.pool.send(
                scope["method"], target(scope["raw_path"], query),
                forwardable(scope["headers"], REQUEST_ONLY), body or None,
                timeouts_for(self.settings, long_poll_ms(query)),
            )  # fmt: skip
        except UpstreamError as exc:  # a Matrix error, as the proxy says
            await send_reply(send, upstream_failure(exc, "relay", "-"))
            return
        try:
            await send_reply(send, Relay(response))
        finally:
            await response.aclose()


def _framing(head: bytes) -> int | None:
    """The body's length, or None for a chunked one."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            return int(value)
        if name == b"transfer-encoding" and value.strip().lower() == b"chunked":
            return None
    return 0


def _chunked_end(buffer: bytearray, start: int) -> int | None:
    """Where a chunked body starting at `start` ends (its trailers included), if whole."""
    position = start
    while True:
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            return None
        size = int(bytes(buffer[position:line_end]).split(b";")[0], 16)
        if size == 0:
            end = buffer.find(b"\r\n\r\n", line_end)
            return None if end < 0 else end + 4
        position = line_end + 2 + size + 2
        if position > len(buffer):
            return None


def _message(buffer: bytearray) -> bytes | None:
    """The first whole message in `buffer`, taken out of it."""
    end = buffer.find(_HEAD_END)
    if end < 0:
        return None
    body_start = end + len(_HEAD_END)
    length = _framing(bytes(buffer[:end]))
    whole = body_start + length if length is not None else _chunked_end(buffer, body_start)
    if whole is None or len(buffer) < whole:
        return None
    message = bytes(buffer[:whole])
    del buffer[:whole]
    return message


class _Upstream(asyncio.Protocol):
    def __init__(self, idle: deque[_Upstream]) -> None:
        self.idle = idle
        self.buffer = bytearray()
        self.answer_to: asyncio.Transport | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        answer = _message(self.buffer)
        if answer is not None and self.answer_to is not None:
            client, self.answer_to = self.answer_to, None
            self.idle.append(self)
            client.write(answer)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.idle:
            self.idle.remove(self)
        if self.answer_to is not None:
            self.answer_to.close()


class _Client(asyncio.Protocol):
    def __init__(self, host: str, port: int, idle: deque[_Upstream]) -> None:
        self.host, self.port, self.idle = host, port, idle
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        request = _message(self.buffer)
        if request is not None:
            asyncio.get_running_loop().create_task(self.forward(request))

    async def forward(self, request: bytes) -> None:
        assert self.transport is not None
        upstream = self.idle.pop() if self.idle else None
        if upstream is None:
            loop = asyncio.get_running_loop()
            try:
                _, upstream = await loop.create_connection(
                    lambda: _Upstream(self.idle), self.host, self.port
                )
            except OSError:  # out of descriptors, say: the client sees the connection end
                self.transport.close()
                return
        assert upstream.transport is not None
        upstream.answer_to = self.transport
        upstream.transport.write(request)


async def _serve_uvloop(upstream: str, host: str, port: int) -> None:
    parts = urlsplit(upstream)
    idle: deque[_Upstream] = deque()
    up_host, up_port = parts.hostname or "127.0.0.1", parts.port or 80
    server = await asyncio.get_running_loop().create_server(
        lambda: _Client(up_host, up_port, idle), host, port, backlog=4096
    )
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.relays", description=__doc__)
    parser.add_argument("kind", choices=list(RELAYS))
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    args = parser.parse_args()
    raise_open_files_limit()  # as the proxy does at start
    host, _, port = args.listen.rpartition(":")
    if args.kind == "uvloop":
        uvloop.run(_serve_uvloop(args.upstream, host, int(port)))
        return 0
    settings = Settings(upstream=args.upstream, listen=args.listen)
    config = uvicorn_config(settings)
    config.app = UvicornRelay(args.upstream)  # in place of the proxy's app
    config.lifespan = "off"
    server = uvicorn.Server(config)
    settle_heap()
    uvloop.run(server.serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
