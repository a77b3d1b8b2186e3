"""Respond: relay an upstream answer as it came, or with a body the proxy rewrote."""

from __future__ import annotations

import logging

import httpx
from starlette.types import Send

from .upstream import BODY_HEADERS, forwardable

log = logging.getLogger(__name__)


class BodyTooLarge(Exception):
    pass


async def relay(send: Send, response: httpx.Response) -> None:
    """Stream an upstream answer byte for byte: status, raw header pairs, raw body."""
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": forwardable(response.headers.raw),
        }
    )
    try:
        async for chunk in response.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except httpx.TransportError as exc:
        # The status line is gone already: all that is left is to cut the connection, so
        # the client sees a truncated answer rather than a complete-looking one.
        log.warning("upstream failed mid-body: %s", type(exc).__name__)
        return
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def read_body(response: httpx.Response, limit: int) -> bytes:
    """The whole decoded upstream body, refusing more than `limit` bytes."""
    length = response.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BodyTooLarge
    parts: list[bytes] = []
    size = 0
    # Decoded: an upstream that compresses although asked not to still gets filtered.
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        parts.append(chunk)
    return b"".join(parts)


async def send_rewritten(send: Send, response: httpx.Response, body: bytes) -> None:
    """Send upstream's status and headers with a new body (and its own length)."""
    headers = forwardable(response.headers.raw, BODY_HEADERS)
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
