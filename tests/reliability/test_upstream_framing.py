"""The pool and read_body against a homeserver stand-in that writes exact bytes.

Each case: the stand-in answers the first request with the case's bytes (in the writes,
pauses, closes and resets given); the case says what comes out (status and body, or the
exact exception). Every case also checks that the call does not hang, that the pool holds
no connection it should not, and that the next request gets a correct answer, on the same
connection only where the first answer ended exactly where it should.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import struct
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from ignore_proxy.answer_body import (
    BodyTooLarge,
    NotUtf8Json,
    UnreadableBody,
    check_utf8_json,
    read_body,
)
from ignore_proxy.pool import (
    BadAnswer,
    ExchangeTimeouts,
    ReadTimedOut,
    Response,
    Unreachable,
    UpstreamPool,
)

# Steps of a script: bytes are written (and drained), a float is a pause in seconds.
CLOSE = "close"  # FIN
RESET = "reset"  # RST
HOLD = "hold"  # read and say nothing until the pool goes away
Step = bytes | float | str

GOOD = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ngood"
READ_TIMEOUT = 0.3
TIMEOUTS = ExchangeTimeouts(connect=2, read=READ_TIMEOUT, write=2, pool=2)
NEVER_HANG = 5.0  # seconds; far above anything a case waits for on purpose


class StandIn:
    """An HTTP/1.1 homeserver on 127.0.0.1 whose answers are scripts of exact bytes.

    `script(connection, request)` (both counted from 0) gives the steps for a request.
    """

    def __init__(self, script: Callable[[int, int], Sequence[Step]]) -> None:
        self.script = script
        self.accepted = 0
        self.open = 0
        self.requests: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.finished = 0  # scripts played to their end
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def wait_finished(self, count: int) -> None:
        while self.finished < count:
            self._changed.clear()
            await self._changed.wait()

    async def wait_closed(self, open: int) -> None:
        while self.open > open:
            self._changed.clear()
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        number = self.accepted
        self.accepted += 1
        self.writers.append(writer)
        self.open += 1
        try:
            request = 0
            while True:
                try:
                    self.requests.append(await reader.readuntil(b"\r\n\r\n"))
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                keep = await self._play(self.script(number, request), reader, writer)
                request += 1
                self.finished += 1
                self._notify()
                if not keep:
                    return
        finally:
            self.open -= 1
            writer.transport.abort()
            self._tasks.discard(task)
            self._notify()

    async def _play(
        self, steps: Sequence[Step], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        for step in steps:
            if isinstance(step, bytes):
                writer.write(step)
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
            elif isinstance(step, float):
                await asyncio.sleep(step)
            elif step == CLOSE:
                writer.close()
                return False
            elif step == RESET:
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return False
            elif step == HOLD:
                with contextlib.suppress(ConnectionError):
                    while await reader.read(65536):
                        pass
                return False
        return True


@contextlib.asynccontextmanager
async def stand_in(script: Callable[[int, int], Sequence[Step]]) -> AsyncIterator[StandIn]:
    server = StandIn(script)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def answer(
    body: bytes = b"",
    *headers: bytes,
    status: bytes = b"200 OK",
    length: bool = True,
    version: bytes = b"HTTP/1.1",
) -> bytes:
    lines = [b"%s %s\r\n" % (version, status)]
    lines += [b"%s\r\n" % header for header in headers]
    if length:
        lines.append(b"content-length: %d\r\n" % len(body))
    return b"".join(lines) + b"\r\n" + body


def chunked(*chunks: bytes, trailers: bytes = b"", head: bytes = b"") -> bytes:
    data = b"HTTP/1.1 200 OK\r\n" + head + b"transfer-encoding: chunked\r\n\r\n"
    for chunk in chunks:
        data += b"%x\r\n%s\r\n" % (len(chunk), chunk)
    return data + b"0\r\n" + trailers + b"\r\n"


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def zl(data: bytes) -> bytes:
    return zlib.compress(data)


def raw_deflate(data: bytes) -> bytes:
    encoder = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return encoder.compress(data) + encoder.flush()


def bomb(size: int) -> bytes:
    encoder = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1024 * 1024)
    data = b"".join(encoder.compress(block) for _ in range(size // len(block)))
    return data + encoder.flush()


def one_byte_at_a_time(data: bytes) -> list[Step]:
    steps: list[Step] = []
    for i in range(len(data)):
        steps += [data[i : i + 1], 0.002]
    return steps


JSON = b'{"next_batch":"s1","rooms":{}}'
LIMIT = 64 * 1024


@dataclass(frozen=True)
class Case:
    name: str
    answer: Sequence[Step]
    status: int | None = 200  # None: the exception below is expected instead
    body: bytes = b""
    error: type[Exception] | None = None
    match: str = ""  # in the exception's message
    reused: bool = True  # the connection serves the next request
    late: bool = False  # bytes follow the answer later: the connection is idle until then
    method: str = "GET"
    read_body: bool = False  # read as the proxy reads an answer it filters
    json: bool = False  # ... and check it is UTF-8 JSON
    limit: int = LIMIT
    max_header_bytes: int = 64 * 1024
    absent: tuple[bytes, ...] = ()  # header names the answer must not carry
    present: tuple[tuple[bytes, bytes], ...] = field(default=())


def fails(
    name: str, steps: Sequence[Step], error: type[Exception], match: str = "", **kw: Any
) -> Case:
    """The request fails; its connection is not reused."""
    return Case(name, steps, status=None, error=error, match=match, reused=False, **kw)


def refused(
    name: str, steps: Sequence[Step], error: type[Exception], match: str = "", **kw: Any
) -> Case:
    """An answer framed right, read whole and refused: its connection serves on."""
    return Case(name, steps, status=None, error=error, match=match, **kw)


Protocol = BadAnswer

FRAMING = [
    Case("content-length", [answer(b"ok")], body=b"ok"),
    Case("content-length 0", [answer()]),
    Case("head and body in two writes", [answer()[:-2], 0.02, b"\r\n"]),
    Case("one byte at a time", one_byte_at_a_time(answer(b"ok")), body=b"ok"),
    Case(
        "empty line ending the head split across writes",
        [answer(b"ok")[:-3], 0.02, b"\nok"],
        body=b"ok",
    ),
    Case("a byte after the content-length body", [answer(b"ok") + b"X"], body=b"ok", reused=False),
    Case(
        "an empty line after the content-length body",
        [answer(b"ok") + b"\r\n"],  # llhttp skips it silently; the pool must not
        body=b"ok",
        reused=False,
    ),
    Case(
        "a byte after the content-length body, in a later write",
        [answer(b"ok"), 0.05, b"X"],
        body=b"ok",
        reused=False,
        late=True,
    ),
    fails("body shorter than content-length", [answer(b"ok")[:-1], CLOSE], Protocol, "closed"),
    Case("204", [answer(status=b"204 No Content", length=False)], status=204),
    Case(
        "204 with content-length",
        [answer(b"", b"content-length: 5", status=b"204 No Content", length=False)],
        status=204,
    ),
    Case(
        "304 with content-length",
        [answer(b"", b"content-length: 5", status=b"304 Not Modified", length=False)],
        status=304,
    ),
    Case(
        "304 with content-length and a body anyway",
        [answer(b"hello", b"content-length: 5", status=b"304 Not Modified", length=False)],
        status=304,
        reused=False,
    ),
    Case(
        "204 then the start of another answer in the same write",
        [answer(status=b"204 No Content", length=False) + b"HTTP/1.1 200 OK\r\ncontent-le"],
        status=204,
        reused=False,
    ),
    Case(
        "204 then a whole second answer",
        [answer(status=b"204 No Content", length=False) + answer(b"smuggled")],
        status=204,
        reused=False,
    ),
    Case(
        "204 then an empty line",
        [answer(status=b"204 No Content", length=False) + b"\r\n"],
        status=204,
        reused=False,
    ),
    # A HEAD answer's Content-Length is the GET's: llhttp, not told it was HEAD, would
    # wait for that body, so the connection is never reused.
    Case(
        "HEAD with content-length",
        [answer(b"", b"content-length: 10", length=False)],
        method="HEAD",
        reused=False,
    ),
    Case("chunked", [chunked(b"o", b"k")], body=b"ok"),
    Case(
        "chunked with extensions",
        [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2;x=y\r\nok\r\n0;z\r\n\r\n"],
        body=b"ok",
    ),
    Case(
        "chunked with trailers",
        [chunked(b"ok", head=b"trailer: x-evil\r\n", trailers=b"x-evil: 1\r\nset-cookie: a=b\r\n")],
        body=b"ok",
        absent=(b"x-evil", b"set-cookie"),
    ),
    Case(
        "chunked, body in many writes",
        [chunked(b"ab", b"cd")[:60], 0.02, chunked(b"ab", b"cd")[60:]],
        body=b"abcd",
    ),
    Case(
        "chunked, last chunk split across writes",
        [chunked(b"ok")[:-1], 0.02, b"\n"],
        body=b"ok",
        reused=False,  # where it ended can't be told from one byte: not reused
    ),
    Case("chunked then an empty line", [chunked(b"ok") + b"\r\n"], body=b"ok", reused=False),
    Case("chunked then a byte", [chunked(b"ok") + b"X"], body=b"ok", reused=False),
    fails("chunked, cut before the last chunk", [chunked(b"ok")[:-5], CLOSE], Protocol, "closed"),
    fails(
        "chunked, invalid chunk size",
        [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n"],
        Protocol,
        "malformed",
    ),
    Case("close-delimited", [answer(b"abc", length=False), CLOSE], body=b"abc", reused=False),
    fails(
        "close-delimited, then reset",
        [answer(b"abc", length=False), 0.05, RESET],
        Protocol,
        "closed",
    ),
    Case("HTTP/1.0", [answer(b"ok", version=b"HTTP/1.0")], body=b"ok", reused=False),
    Case("connection: close", [answer(b"ok", b"connection: close")], body=b"ok", reused=False),
    Case(
        "100 Continue, then the answer",
        [b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"ok")],
        body=b"ok",
    ),
    Case(
        "103 Early Hints, then the answer",
        [b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + answer(b"ok")],
        body=b"ok",
        absent=(b"link",),
    ),
    Case(
        "102 and an unknown 1xx, then the answer",
        [b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 199 Odd\r\nx: y\r\n\r\n" + answer(b"ok")],
        body=b"ok",
        absent=(b"x",),
    ),
    Case(
        "interim answer and answer in separate writes",
        [b"HTTP/1.1 100 Continue\r\n\r\n", 0.02, answer(b"ok")],
        body=b"ok",
    ),
    fails(
        "101 Switching Protocols, unrequested",
        [b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"],
        Protocol,
        "switched protocols",
    ),
    fails(
        "101 with bytes of the new protocol after it",
        [b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n\x00\x00\x12\x04"],
        Protocol,
        "switched protocols",
    ),
    Case(
        "header section exactly at the bound",
        [answer(b"ok", b"x: " + b"a" * (1024 - 43))],
        body=b"ok",
        max_header_bytes=1024,
    ),
    fails(
        "header section one byte over the bound",
        [answer(b"ok", b"x: " + b"a" * (1024 - 42))],
        Protocol,
        "too large",
        max_header_bytes=1024,
    ),
    fails(
        "header section that never ends, in many writes",
        [b"HTTP/1.1 200 OK\r\n", *((b"x: " + b"a" * 600 + b"\r\n", 0.01) * 4), HOLD],
        Protocol,
        "too large",
        max_header_bytes=1024,
    ),
    fails(
        "header section over the bound across interim answers",
        [
            b"HTTP/1.1 103 Early Hints\r\nlink: "
            + b"a" * 700
            + b"\r\n\r\n"
            + answer(b"ok", b"x: " + b"a" * 300)
        ],
        Protocol,
        "too large",
        max_header_bytes=1024,
    ),
    fails(
        "header section over the default bound of 64 KiB",
        [answer(b"ok", b"x: " + b"a" * 70_000)],
        Protocol,
        "too large",
    ),
    # nginx relays an answer with differing duplicate Content-Length values; which one
    # holds decides where the next answer starts (response splitting): refused here.
    fails(
        "duplicate differing content-length",
        [answer(b"ok", b"content-length: 2", b"content-length: 3", length=False)],
        Protocol,
        "Duplicate Content-Length",
    ),
    fails(
        "duplicate equal content-length",
        [answer(b"ok", b"content-length: 2", b"content-length: 2", length=False)],
        Protocol,
        "Duplicate Content-Length",
    ),
    fails(
        "content-length list",
        [answer(b"ok", b"content-length: 2, 2", length=False)],
        Protocol,
        "Content-Length",
    ),
    fails(
        "content-length with a sign",
        [answer(b"ok", b"content-length: +2", length=False)],
        Protocol,
        "Content-Length",
    ),
    fails(
        "content-length and transfer-encoding",
        [
            answer(
                b"2\r\nok\r\n0\r\n\r\n",
                b"content-length: 12",
                b"transfer-encoding: chunked",
                length=False,
            )
        ],
        Protocol,
        "Transfer-Encoding",
    ),
    fails(
        "transfer-encoding gzip, chunked",
        [chunked(b"ok").replace(b"chunked", b"gzip, chunked")],
        Protocol,
        "transfer coding",
    ),
    fails(
        "transfer-encoding chunked, gzip",
        [answer(b"ok", b"transfer-encoding: chunked, gzip", length=False), CLOSE],
        Protocol,
        "transfer coding",
    ),
    fails(
        "transfer-encoding identity",
        [answer(b"ok", b"transfer-encoding: identity", length=False), CLOSE],
        Protocol,
        "transfer coding",
    ),
    fails(
        "transfer-encoding chunked twice",
        [chunked(b"ok", head=b"transfer-encoding: chunked\r\n")],
        Protocol,
        "transfer coding",
    ),
    # nginx takes a bare LF as a line end and so lets `b: c` through as a header of its
    # own (header injection through a value); llhttp refuses it, and so does the pool.
    fails(
        "bare LF inside a header value",
        [answer(b"ok", b"x: a\nset-cookie: c")],
        Protocol,
        "Missing expected CR",
    ),
    fails("bare LF line ends", [b"HTTP/1.1 200 OK\ncontent-length: 2\n\nok"], Protocol, "CR"),
    fails("obs-fold", [answer(b"ok", b"x: a\r\n b")], Protocol, "malformed"),
    fails("empty line before the status line", [b"\r\n" + answer(b"ok")], Protocol, "empty line"),
    fails(
        "empty line before the answer, after an interim answer",
        [b"HTTP/1.1 100 Continue\r\n\r\n\r\n" + answer(b"ok")],
        Protocol,
        "empty line",
    ),
    fails(
        "empty line before the answer, in its own write after an interim answer",
        [b"HTTP/1.1 100 Continue\r\n\r\n", 0.02, b"\r\n" + answer(b"ok")],
        Protocol,
        "empty line",
    ),
    fails("not HTTP", [b"SSH-2.0-OpenSSH\r\n\r\n"], Protocol, "malformed"),
    fails("closed before answering (a fresh connection)", [CLOSE], Protocol, "closed"),
    fails("reset before answering (a fresh connection)", [RESET], Protocol, "closed"),
    fails("silence before the head", [HOLD], ReadTimedOut),
    fails("silence mid-body", [answer(b"okay")[:-2], HOLD], ReadTimedOut),
    fails(
        "silence after an interim answer",
        [b"HTTP/1.1 100 Continue\r\n\r\n", HOLD],
        ReadTimedOut,
    ),
]

KIB = 1024
CODINGS = [
    Case("identity", [answer(JSON, b"content-encoding: identity")], body=JSON, read_body=True),
    Case("gzip", [answer(gz(JSON), b"content-encoding: gzip")], body=JSON, read_body=True),
    Case("x-gzip", [answer(gz(JSON), b"content-encoding: x-gzip")], body=JSON, read_body=True),
    Case(
        "GZIP in capitals", [answer(gz(JSON), b"content-encoding: GZIP")], body=JSON, read_body=True
    ),
    Case("deflate", [answer(zl(JSON), b"content-encoding: deflate")], body=JSON, read_body=True),
    Case(
        "raw deflate",
        [answer(raw_deflate(JSON), b"content-encoding: deflate")],
        body=JSON,
        read_body=True,
    ),
    Case(
        "gzip, deflate: the last listed undone first",
        [answer(zl(gz(JSON)), b"content-encoding: gzip, deflate")],
        body=JSON,
        read_body=True,
    ),
    Case(
        "repeated content-encoding headers",
        [answer(zl(gz(JSON)), b"content-encoding: gzip", b"content-encoding: deflate")],
        body=JSON,
        read_body=True,
    ),
    Case(
        "gzip twice",
        [answer(gz(gz(JSON)), b"content-encoding: gzip,gzip")],
        body=JSON,
        read_body=True,
    ),
    Case(
        "identity, gzip",
        [answer(gz(JSON), b"content-encoding: identity, gzip")],
        body=JSON,
        read_body=True,
    ),
    Case(
        "multi-member gzip",
        [answer(gz(JSON[:10]) + gz(JSON[10:]), b"content-encoding: gzip")],
        body=JSON,
        read_body=True,
    ),
    Case(
        "gzip, chunked in many writes",
        [chunked(gz(JSON)[:7], gz(JSON)[7:], head=b"content-encoding: gzip\r\n")],
        body=JSON,
        read_body=True,
    ),
    Case("empty gzip body", [answer(b"", b"content-encoding: gzip")], read_body=True),
    refused(
        "truncated gzip",
        [answer(gz(JSON)[:-4], b"content-encoding: gzip")],
        UnreadableBody,
        "truncated",
        read_body=True,
    ),
    refused(
        "gzip with a wrong checksum",
        [answer(gz(JSON)[:-8] + b"\0\0\0\0" + gz(JSON)[-4:], b"content-encoding: gzip")],
        UnreadableBody,
        "undecodable gzip",
        read_body=True,
    ),
    refused(
        "gzip with trailing garbage",
        [answer(gz(JSON) + b"garbage", b"content-encoding: gzip")],
        UnreadableBody,
        "undecodable gzip",
        read_body=True,
    ),
    refused(
        "gzip with trailing zeros",
        [answer(gz(JSON) + bytes(8), b"content-encoding: gzip")],
        UnreadableBody,
        "undecodable gzip",
        read_body=True,
    ),
    refused(
        "gzip with one trailing byte",
        [answer(gz(JSON) + b"\x1f", b"content-encoding: gzip")],
        UnreadableBody,
        "truncated",
        read_body=True,
    ),
    refused(
        "not gzip at all",
        [answer(JSON, b"content-encoding: gzip")],
        UnreadableBody,
        "undecodable gzip",
        read_body=True,
    ),
    refused(
        "truncated deflate",
        [answer(zl(JSON)[:-3], b"content-encoding: deflate")],
        UnreadableBody,
        "truncated",
        read_body=True,
    ),
    refused(
        "deflate with trailing garbage",
        [answer(zl(JSON) + b"x", b"content-encoding: deflate")],
        UnreadableBody,
        "after the end",
        read_body=True,
    ),
    refused(
        "corrupt deflate",
        [answer(b"\x78\x9c\xff\xff\xff", b"content-encoding: deflate")],
        UnreadableBody,
        "undecodable deflate",
        read_body=True,
    ),
    # Refused before a byte of the body is read: the connection goes with the answer.
    fails(
        "br",
        [answer(b"\x0b\x02\x80ok\x03", b"content-encoding: br")],
        UnreadableBody,
        "br",
        read_body=True,
    ),
    fails(
        "zstd",
        [answer(b"(\xb5/\xfd", b"content-encoding: zstd")],
        UnreadableBody,
        "zstd",
        read_body=True,
    ),
    fails(
        "compress",
        [answer(b"\x1f\x9d", b"content-encoding: compress")],
        UnreadableBody,
        "compress",
        read_body=True,
    ),
    fails(
        "an unknown coding",
        [answer(JSON, b"content-encoding: rot13")],
        UnreadableBody,
        "rot13",
        read_body=True,
    ),
    fails(
        "gzip, then br",
        [answer(gz(JSON), b"content-encoding: gzip, br")],
        UnreadableBody,
        "br",
        read_body=True,
    ),
    refused(
        "gzip bomb",
        [answer(bomb(16 * KIB * KIB), b"content-encoding: gzip")],
        BodyTooLarge,
        read_body=True,
    ),
    refused(
        "multi-member gzip growing past the limit",
        [answer(gz(bytes(40 * KIB)) * 2, b"content-encoding: gzip")],
        BodyTooLarge,
        read_body=True,
    ),
    Case(
        "decoded exactly at the limit",
        [answer(gz(bytes(LIMIT)), b"content-encoding: gzip")],
        body=bytes(LIMIT),
        read_body=True,
    ),
    refused(
        "decoded one byte over the limit",
        [answer(gz(bytes(LIMIT + 1)), b"content-encoding: gzip")],
        BodyTooLarge,
        read_body=True,
    ),
    fails(
        "coded body over the limit",
        [answer(bytes(LIMIT + 1), b"content-encoding: identity")],
        BodyTooLarge,
        read_body=True,
    ),
    fails(
        "chunked body over the limit, its end not arrived",
        [chunked(bytes(LIMIT + 1))[:-5], HOLD],
        BodyTooLarge,
        read_body=True,
    ),
]

CT = b"content-type: application/json"
CHARSETS = [
    Case("application/json", [answer(JSON, CT)], body=JSON, read_body=True, json=True),
    Case(
        "charset=utf-8",
        [answer(JSON, CT + b"; charset=utf-8")],
        body=JSON,
        read_body=True,
        json=True,
    ),
    Case(
        'charset="UTF-8"',
        [answer(JSON, CT + b'; charset="UTF-8"')],
        body=JSON,
        read_body=True,
        json=True,
    ),
    Case(
        "charset among other parameters",
        [answer(JSON, CT + b"; a=b; Charset=Utf-8")],
        body=JSON,
        read_body=True,
        json=True,
    ),
    refused(
        "charset=iso-8859-1",
        [answer(JSON, CT + b"; charset=iso-8859-1")],
        NotUtf8Json,
        "iso-8859-1",
        read_body=True,
        json=True,
    ),
    refused(
        'charset="utf-16"',
        [answer(JSON, CT + b'; charset="utf-16"')],
        NotUtf8Json,
        "utf-16",
        read_body=True,
        json=True,
    ),
    refused(
        "UTF-8 byte order mark",
        [answer(b"\xef\xbb\xbf" + JSON, CT)],
        NotUtf8Json,
        "byte order mark",
        read_body=True,
        json=True,
    ),
    refused(
        "UTF-16LE byte order mark",
        [answer(b"\xff\xfe" + JSON.decode().encode("utf-16-le"), CT)],
        NotUtf8Json,
        "byte order mark",
        read_body=True,
        json=True,
    ),
    refused(
        "UTF-16BE byte order mark",
        [answer(b"\xfe\xff" + JSON.decode().encode("utf-16-be"), CT)],
        NotUtf8Json,
        "byte order mark",
        read_body=True,
        json=True,
    ),
    refused(
        "UTF-32LE byte order mark",
        [answer(JSON.decode().encode("utf-32"), CT)],
        NotUtf8Json,
        "byte order mark",
        read_body=True,
        json=True,
    ),
    refused(
        "UTF-32BE byte order mark",
        [answer(b"\x00\x00\xfe\xff" + JSON.decode().encode("utf-32-be"), CT)],
        NotUtf8Json,
        "UTF-16 or UTF-32",
        read_body=True,
        json=True,
    ),
    refused(
        "UTF-16LE without a mark",
        [answer(JSON.decode().encode("utf-16-le"), CT)],
        NotUtf8Json,
        "UTF-16 or UTF-32",
        read_body=True,
        json=True,
    ),
    refused(
        "UTF-16BE without a mark, after whitespace",
        [answer(" ".encode("utf-16-be") + JSON.decode().encode("utf-16-be"), CT)],
        NotUtf8Json,
        "UTF-16 or UTF-32",
        read_body=True,
        json=True,
    ),
    refused(
        "UTF-32BE without a mark",
        [answer(JSON.decode().encode("utf-32-be"), CT)],
        NotUtf8Json,
        "UTF-16 or UTF-32",
        read_body=True,
        json=True,
    ),
    refused(
        "gzip over UTF-16",
        [answer(gz(JSON.decode().encode("utf-16")), CT, b"content-encoding: gzip")],
        NotUtf8Json,
        "byte order mark",
        read_body=True,
        json=True,
    ),
]

CASES = FRAMING + CODINGS + CHARSETS


async def exchange(pool: UpstreamPool, case: Case) -> tuple[Response, bytes]:
    response = await pool.send(
        case.method, b"/_matrix/client/v3/sync", [(b"host", b"hs")], None, TIMEOUTS
    )
    try:
        if case.read_body:
            body = await read_body(response, case.limit)
            if case.json:
                check_utf8_json(response.headers, body)
        else:
            body = await response.read()
    finally:
        await response.aclose()
    return response, body


def test_the_cases_are_many_and_distinct() -> None:
    assert len(CASES) >= 40
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_upstream_answer(case: Case) -> None:
    def script(connection: int, request: int) -> Sequence[Step]:
        return case.answer if (connection, request) == (0, 0) else [GOOD]

    async with stand_in(script) as server:
        pool = UpstreamPool(
            server.url,
            max_connections=4,
            max_keepalive_connections=4,
            max_header_bytes=case.max_header_bytes,
        )
        try:
            if case.error is None:
                response, body = await asyncio.wait_for(exchange(pool, case), NEVER_HANG)
                assert (response.status_code, body) == (case.status, case.body)
                names = {name.lower() for name, _ in response.headers}
                assert not names & set(case.absent)
            else:
                with pytest.raises(case.error, match=case.match or None):
                    await asyncio.wait_for(exchange(pool, case), NEVER_HANG)
            assert pool.connections == (1 if case.reused or case.late else 0), "leaked"
            # Whatever the stand-in still had to say for the first request has been said
            # (or the pool cut it short): it is on the wire before the next request.
            await asyncio.wait_for(server.wait_finished(1), NEVER_HANG)
            good = Case("next", [], body=b"good")
            response, body = await asyncio.wait_for(exchange(pool, good), NEVER_HANG)
            assert (response.status_code, body) == (200, b"good")
            assert server.accepted == (1 if case.reused else 2)
            assert len(server.requests) == 2  # nothing sent twice
            assert pool.connections == 1
        finally:
            await pool.aclose()
        assert pool.connections == 0
        await asyncio.wait_for(server.wait_closed(0), NEVER_HANG)


async def test_a_stray_answer_does_not_stop_the_next_requests_read_timer() -> None:
    """A 204 and the start of a second answer: had the connection been reused, the rest of
    that second answer would complete it during the next exchange, and the next request
    would wait forever (its read timer cancelled, its answer never due)."""

    def script(connection: int, request: int) -> Sequence[Step]:
        if (connection, request) == (0, 0):
            return [
                b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab"
            ]
        if connection == 0:
            return [b"cde", HOLD]
        return [GOOD]

    async with stand_in(script) as server:
        pool = UpstreamPool(server.url, max_connections=4, max_keepalive_connections=4)
        try:
            first = Case("first", [], status=204)
            response, body = await asyncio.wait_for(exchange(pool, first), NEVER_HANG)
            assert (response.status_code, body) == (204, b"")
            await asyncio.wait_for(server.wait_finished(1), NEVER_HANG)
            second = Case("second", [], body=b"good")
            response, body = await asyncio.wait_for(exchange(pool, second), NEVER_HANG)
            assert (response.status_code, body) == (200, b"good")
            assert server.accepted == 2
        finally:
            await pool.aclose()


# --- one retry, on a new connection, of what a reused connection dropped unanswered ------


def closes_on_second_request(*second: Step) -> Callable[[int, int], Sequence[Step]]:
    """Answers, keeps the connection, then treats the next request on it with `second`
    (closing it, as a homeserver closing an idle connection just as a request arrives);
    a new connection gets answers."""

    def script(connection: int, request: int) -> Sequence[Step]:
        return second if (connection, request) == (0, 1) else [GOOD]

    return script


async def reuse_then_send(
    server: StandIn, pool: UpstreamPool, method: str, body: bytes | None = None
) -> tuple[int, bytes]:
    first = await pool.send("GET", b"/a", [], None, TIMEOUTS)
    assert await first.read() == b"good"
    await first.aclose()
    assert pool.connections == 1
    response = await asyncio.wait_for(pool.send(method, b"/b", [], body, TIMEOUTS), NEVER_HANG)
    try:
        return response.status_code, await response.read()
    finally:
        await response.aclose()


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
@pytest.mark.parametrize("cut", [CLOSE, RESET])
async def test_an_idempotent_request_cut_unanswered_on_a_reused_connection_is_sent_again(
    method: str, cut: str
) -> None:
    async with stand_in(closes_on_second_request(cut)) as server:
        pool = UpstreamPool(server.url, max_connections=4, max_keepalive_connections=4)
        try:
            status, body = await reuse_then_send(server, pool, method)
            assert status == 200 and body == (b"" if method == "HEAD" else b"good")
            assert server.accepted == 2
            assert len(server.requests) == 3  # the first, the cut one, its one retry
        finally:
            await pool.aclose()


@pytest.mark.parametrize(
    ("method", "body", "second"),
    [
        ("POST", None, [CLOSE]),  # not idempotent
        ("DELETE", None, [CLOSE]),  # idempotent, but nginx does not resend it either
        ("GET", b"{}", [CLOSE]),  # a body went out
        ("GET", None, [b"HTTP/1.1 2", CLOSE]),  # a byte of the answer arrived
        ("GET", None, [b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\npart", CLOSE]),
    ],
    ids=["POST", "DELETE", "GET with a body", "a byte answered", "half answered"],
)
async def test_anything_else_cut_on_a_reused_connection_is_an_error(
    method: str, body: bytes | None, second: list[Step]
) -> None:
    async with stand_in(closes_on_second_request(*second)) as server:
        pool = UpstreamPool(server.url, max_connections=4, max_keepalive_connections=4)
        try:
            with pytest.raises(BadAnswer):
                await reuse_then_send(server, pool, method, body)
            assert server.accepted == 1 and len(server.requests) == 2
            assert pool.connections == 0
        finally:
            await pool.aclose()


async def test_a_streamed_body_is_never_sent_again() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"{}"

    async with stand_in(closes_on_second_request(CLOSE)) as server:
        pool = UpstreamPool(server.url, max_connections=4, max_keepalive_connections=4)
        try:
            first = await pool.send("GET", b"/a", [], None, TIMEOUTS)
            await first.read()
            await first.aclose()
            with pytest.raises(BadAnswer):
                await asyncio.wait_for(pool.send("GET", b"/b", [], body(), TIMEOUTS), NEVER_HANG)
            assert server.accepted == 1
        finally:
            await pool.aclose()


async def test_a_retry_is_sent_once() -> None:
    """The new connection closes unanswered too: that is the answer, not another retry."""

    def script(connection: int, request: int) -> Sequence[Step]:
        return [GOOD] if (connection, request) == (0, 0) else [CLOSE]

    async with stand_in(script) as server:
        pool = UpstreamPool(server.url, max_connections=4, max_keepalive_connections=4)
        try:
            with pytest.raises(BadAnswer, match="closed"):
                await reuse_then_send(server, pool, "GET")
            assert server.accepted == 2 and len(server.requests) == 3
            assert pool.connections == 0
        finally:
            await pool.aclose()


async def test_silence_on_a_reused_connection_is_not_retried() -> None:
    async with stand_in(closes_on_second_request(HOLD)) as server:
        pool = UpstreamPool(server.url, max_connections=4, max_keepalive_connections=4)
        try:
            with pytest.raises(ReadTimedOut):
                await reuse_then_send(server, pool, "GET")
            assert server.accepted == 1
        finally:
            await pool.aclose()


async def test_a_retry_that_cannot_connect_releases_its_slot() -> None:
    async with stand_in(closes_on_second_request(CLOSE)) as server:
        pool = UpstreamPool(server.url, max_connections=1, max_keepalive_connections=1)
        try:
            first = await pool.send("GET", b"/a", [], None, TIMEOUTS)
            await first.read()
            await first.aclose()
            assert server._server is not None
            server._server.close()  # no new connections from now on
            await server._server.wait_closed()
            with pytest.raises(Unreachable):
                await asyncio.wait_for(pool.send("GET", b"/b", [], None, TIMEOUTS), NEVER_HANG)
            assert pool.connections == 0
            # The one slot is free again: a PoolTimeout here would mean it leaked.
            with pytest.raises(Unreachable):
                await asyncio.wait_for(pool.send("GET", b"/c", [], None, TIMEOUTS), NEVER_HANG)
        finally:
            await pool.aclose()


async def test_bytes_on_an_idle_connection_retire_it() -> None:
    """Seen by the peek before reuse, even when the event loop has not read them yet."""
    async with stand_in(lambda connection, request: [GOOD]) as server:
        pool = UpstreamPool(server.url, max_connections=4, max_keepalive_connections=4)
        try:
            first = await pool.send("GET", b"/a", [], None, TIMEOUTS)
            assert await first.read() == b"good"
            await first.aclose()
            (connection,) = pool._all
            assert not connection.dropped()
            # On loopback the byte is in the pool's socket buffer once written; the event
            # loop does not run before the request below takes a connection.
            server.writers[0].write(b"X")
            assert connection.dropped()
            response = await pool.send("GET", b"/b", [], None, TIMEOUTS)
            assert await response.read() == b"good"
            await response.aclose()
            assert server.accepted == 2 and len(server.requests) == 2
        finally:
            await pool.aclose()


# --- relaying answers without content --------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kept"),
    [(b"204 No Content", False), (b"304 Not Modified", False), (b"200 OK", True)],
)
async def test_relay_drops_content_length_where_there_is_no_content(
    status: bytes, kept: bool
) -> None:
    """uvicorn would wait for the bytes a 204's or 304's Content-Length announces and
    fail the answer ("Response content shorter than Content-Length")."""
    from ignore_proxy.replies import Relay, send_reply

    raw = answer(
        b"",
        b"content-length: 0" if kept else b"content-length: 5",
        b"etag: x",
        status=status,
        length=False,
    )

    async with stand_in(lambda c, r: [raw]) as server:
        pool = UpstreamPool(server.url, max_connections=4, max_keepalive_connections=4)
        try:
            response = await pool.send("GET", b"/a", [], None, TIMEOUTS)
            sent: list[dict[str, object]] = []

            async def send(message: dict[str, object]) -> None:
                sent.append(message)

            await send_reply(send, Relay(response))  # type: ignore[arg-type]
            await response.aclose()
            headers = sent[0]["headers"]
            assert isinstance(headers, list)
            assert ((b"content-length", b"0") in headers) is kept
            assert all(name != b"content-length" for name, _ in headers) is not kept
            assert (b"etag", b"x") in headers
            assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
        finally:
            await pool.aclose()


async def test_relay_of_an_answer_cut_mid_body_ends_without_completing_it() -> None:
    from ignore_proxy.replies import Relay, send_reply

    async with stand_in(lambda c, r: [answer(b"0123456789")[:-5], 0.02, RESET]) as server:
        pool = UpstreamPool(server.url, max_connections=4, max_keepalive_connections=4)
        try:
            response = await pool.send("GET", b"/a", [], None, TIMEOUTS)
            sent: list[dict[str, object]] = []

            async def send(message: dict[str, object]) -> None:
                sent.append(message)

            await asyncio.wait_for(send_reply(send, Relay(response)), NEVER_HANG)  # type: ignore[arg-type]
            await response.aclose()
            # The last message still says more is to come: uvicorn cuts the connection
            # rather than end a truncated answer as if it were whole.
            assert sent[-1].get("more_body") is True
            assert pool.connections == 0
        finally:
            await pool.aclose()


# --- decoding stays within the limit ---------------------------------------------------


class _Canned:
    """An upstream answer already in memory."""

    def __init__(self, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status_code = 200
        self.headers = headers
        self._body = body
        self.at_eof = False

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        yield self._body
        self.at_eof = True

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("members", [1, 64])
async def test_a_gzip_bomb_never_allocates_much_more_than_the_limit(members: int) -> None:
    import tracemalloc

    limit = 1024 * 1024
    coded = bomb(256 * limit // members) * members  # 256 MiB decoded, ~256 KiB coded
    assert len(coded) < limit
    tracemalloc.start()
    try:
        with pytest.raises(BodyTooLarge):
            await read_body(_Canned([(b"content-encoding", b"gzip")], coded), limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * limit, f"peak {peak} bytes"


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ([], b""),
        ([(b"content-type", b"application/json")], b"{}"),
        ([(b"Content-Type", b"application/json;charset=utf-8")], b"[]"),
        ([(b"content-type", b"text/plain; format=flowed")], b'"a"'),
        ([(b"x-other", b"charset=latin1")], b"1"),
    ],
)
def test_utf8_json_passes(headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    check_utf8_json(headers, body)
