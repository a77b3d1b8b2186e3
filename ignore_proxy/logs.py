"""Logging: plain text or JSON lines, one access line per request, never a secret.

Nothing here ever sees a token, an Authorization header, a query string or a body: the
access line is built from the method, the route class, the status, the duration and the
request id only.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import msgspec

from .config import Settings

access_log = logging.getLogger("ignore_proxy.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return msgspec.json.encode(line).decode()


def configure(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.logging.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.logging.level.upper())
    # httpx logs every request URL at INFO, and URLs can carry ?access_token=.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_request(
    method: str, route: str, status: int | str, seconds: float, headers: list[tuple[bytes, bytes]]
) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    request_id = _request_id(headers)
    duration_ms = round(seconds * 1000, 1)
    access_log.info(
        "%s %s %s %.1fms id=%s", method, route, status, duration_ms, request_id,
        extra={"fields": {"method": method, "route": route, "status": status,
                          "duration_ms": duration_ms, "request_id": request_id}},
    )  # fmt: skip


def _request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's (or nginx's) X-Request-ID if it looks like one, else a new one."""
    for name, value in headers:
        if name.lower() == b"x-request-id" and 0 < len(value) <= 128:
            text = value.decode("latin-1")
            if text.isascii() and text.replace("-", "").replace("_", "").isalnum():
                return text
    return os.urandom(8).hex()
