"""Matrix-shaped error answers, built in one place."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.types import Send


def error_body(errcode: str, error: str, **extra: Any) -> bytes:
    return msgspec.json.encode({"errcode": errcode, "error": error, **extra})


async def send_error(
    send: Send,
    status: int,
    errcode: str,
    error: str,
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    **extra: Any,
) -> None:
    """Send a complete JSON error response (`{"errcode", "error", ...extra}`)."""
    await send_json(send, status, error_body(errcode, error, **extra), headers=headers)


async def send_json(
    send: Send, status: int, body: bytes, *, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
