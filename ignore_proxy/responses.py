"""Respond: relay an upstream answer as it came, or with a body the proxy rewrote."""

from __future__ import annotations

import logging
import zlib

import httpx
from starlette.types import Send

from .upstream import BODY_HEADERS, UpstreamResponse, forwardable

log = logging.getLogger(__name__)


class BodyTooLarge(Exception):
    pass


async def relay(send: Send, response: UpstreamResponse) -> None:
    """Stream an upstream answer byte for byte: status, raw header pairs, raw body."""
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": forwardable(response.headers),
        }
    )
    more = True
    try:
        async for chunk in response.aiter_raw():
            # The last chunk ends the answer itself: one message fewer per small answer.
            more = not response.at_eof
            await send({"type": "http.response.body", "body": chunk, "more_body": more})
    except httpx.TransportError as exc:
        # The status line is gone already: all that is left is to cut the connection, so
        # the client sees a truncated answer rather than a complete-looking one.
        log.warning("upstream failed mid-body: %s", type(exc).__name__)
        return
    if more:
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _header(response: UpstreamResponse, name: bytes) -> bytes | None:
    for key, value in response.headers:
        if key.lower() == name:
            return value
    return None


async def read_body(response: UpstreamResponse, limit: int) -> bytes:
    """The whole decoded upstream body, refusing more than `limit` bytes."""
    length = _header(response, b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BodyTooLarge
    parts: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        parts.append(chunk)
    body = b"".join(parts)
    encoding = (_header(response, b"content-encoding") or b"").strip().lower()
    if encoding in (b"gzip", b"x-gzip", b"deflate"):
        # An upstream that compresses although asked not to still gets filtered.
        body = _decompress(body, encoding, limit)
    return body


def _decompress(body: bytes, encoding: bytes, limit: int) -> bytes:
    window = 16 + zlib.MAX_WBITS if encoding != b"deflate" else zlib.MAX_WBITS
    try:
        decoder = zlib.decompressobj(window)
        try:
            data = decoder.decompress(body, limit + 1)
        except zlib.error:
            if encoding != b"deflate":
                raise
            decoder = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as some servers send
            data = decoder.decompress(body, limit + 1)
    except zlib.error as exc:
        raise httpx.RemoteProtocolError(f"undecodable {encoding.decode()} body") from exc
    if len(data) > limit:
        raise BodyTooLarge
    return data


async def send_rewritten(send: Send, response: UpstreamResponse, body: bytes) -> None:
    """Send upstream's status and headers with a new body (and its own length)."""
    headers = forwardable(response.headers, BODY_HEADERS)
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
