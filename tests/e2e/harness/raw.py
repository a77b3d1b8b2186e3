"""HTTP/1.1 requests with the request target sent byte for byte: httpx resolves dot
segments and would never send `/relations/$e/..` as it stands."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class RawResponse:
    status_code: int
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


async def raw_request(
    base_url: str,
    method: str,
    target: str,
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes | None = None,
) -> RawResponse:
    url = httpx.URL(base_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    head = [f"{method} {target} HTTP/1.1".encode(), f"Host: {url.host}".encode()]
    head += [b"Connection: close", f"Content-Length: {len(body or b'')}".encode()]
    head += [name + b": " + value for name, value in headers or []]
    writer.write(b"\r\n".join(head) + b"\r\n\r\n" + (body or b""))
    try:
        answer = await asyncio.wait_for(reader.read(), 60)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    head_bytes, _, payload = rest.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head_bytes.lower():
        payload = _unchunk(payload)
    return RawResponse(int(status_line.split()[1]), payload.decode())


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out
