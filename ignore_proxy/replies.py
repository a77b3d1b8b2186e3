"""Respond: what an answer to a client is, and the one place where it leaves the proxy.

A handler returns a reply value (or raises a `MatrixError`, which is one); `send_reply`
writes it to the client. Nothing else in the request path writes to ASGI `send`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from starlette.types import Send

from .logs import log_upstream_failure
from .pool import PoolFull, TimedOut, UpstreamError
from .upstream import BODY_HEADERS, UpstreamResponse, forwardable

__all__ = [
    "Json",
    "MatrixError",
    "Relay",
    "Reply",
    "Rewritten",
    "error_body",
    "send_reply",
    "upstream_failure",
]


def error_body(errcode: str, error: str, **extra: Any) -> bytes:
    return msgspec.json.encode({"errcode": errcode, "error": error, **extra})


class MatrixError(Exception):
    """A Matrix error answer, raised anywhere on the request path and sent as it is."""

    def __init__(
        self,
        status: int,
        errcode: str,
        error: str,
        *,
        headers: tuple[tuple[bytes, bytes], ...] = (),
        **extra: Any,
    ) -> None:
        super().__init__(f"{status} {errcode}: {error}")
        self.status = status
        self.errcode = errcode
        self.error = error
        self.headers = headers
        self.extra = extra


@dataclass(frozen=True, slots=True)
class Relay:
    """The homeserver's answer as it came: status, raw header pairs, body streamed."""

    response: UpstreamResponse


@dataclass(frozen=True, slots=True)
class Rewritten:
    """The homeserver's status and headers with a body the proxy read whole (filtered)."""

    response: UpstreamResponse
    body: bytes


@dataclass(frozen=True, slots=True)
class Json:
    """An answer of the proxy's own (`SENDER_IGNORED`, the nearest unignored event)."""

    status: int
    body: bytes


Reply = Relay | Rewritten | Json | MatrixError


def upstream_failure(exc: UpstreamError, route: str, request_id: str) -> MatrixError:
    """What the client is told when the homeserver cannot be asked or did not answer:
    the one place the pool's failures become Matrix errors, and are logged."""
    log_upstream_failure(exc.cause, str(exc), route, request_id)
    if isinstance(exc, PoolFull):
        return MatrixError(503, "M_UNKNOWN", "Too many requests to the homeserver in flight",
                           headers=((b"retry-after", b"1"),))  # fmt: skip
    if isinstance(exc, TimedOut):
        return MatrixError(504, "M_UNKNOWN", "The homeserver did not answer in time")
    return MatrixError(502, "M_UNKNOWN", "The homeserver could not be reached")


# Statuses whose answers have no content, whatever Content-Length says (RFC 9110 8.6):
# relayed with it, uvicorn would wait for that many bytes and fail the answer.
_NO_CONTENT = frozenset({204, 304})
_CONTENT_LENGTH = frozenset({b"content-length"})
_JSON = (b"content-type", b"application/json")


async def send_reply(send: Send, reply: Reply) -> None:
    """Write a reply to the client: the one exit of the request path."""
    if isinstance(reply, Relay):
        await _stream(send, reply.response)
        return
    if isinstance(reply, Rewritten):
        status = reply.response.status_code
        headers = forwardable(reply.response.headers, BODY_HEADERS)
        body = reply.body
    elif isinstance(reply, Json):
        status, headers, body = reply.status, [_JSON], reply.body
    else:
        status, headers = reply.status, [_JSON, *reply.headers]
        body = error_body(reply.errcode, reply.error, **reply.extra)
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _stream(send: Send, response: UpstreamResponse) -> None:
    """Stream an upstream answer byte for byte: status, raw header pairs, raw body."""
    no_content = response.status_code in _NO_CONTENT
    drop = _CONTENT_LENGTH if no_content else frozenset()
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": forwardable(response.headers, drop),
        }
    )
    if no_content:
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    more = True
    try:
        async for chunk in response.aiter_raw():
            # The last chunk ends the answer itself: one message fewer per small answer.
            more = not response.at_eof
            await send({"type": "http.response.body", "body": chunk, "more_body": more})
    except UpstreamError as exc:
        # The status line is gone already: all that is left is to cut the connection, so
        # the client sees a truncated answer rather than a complete-looking one.
        # Said like every upstream failure (and limited like them); the route class and
        # request id are the access line's, which follows.
        log_upstream_failure(exc.cause, f"the answer was cut off: {exc}", "relayed", "-")
        return
    if more:
        await send({"type": "http.response.body", "body": b"", "more_body": False})
