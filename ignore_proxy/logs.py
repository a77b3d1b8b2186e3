"""Logging: plain text or JSON lines, one access line per request the proxy forwards (its
own health endpoints have none), a line at start, a warning per upstream failure (at most
one a few seconds per cause), never a secret.

Nothing here ever sees a token, an Authorization header, a path, a query string or a
body: the access line is built from the method, the route class, the status, the
duration and the request id only; the upstream failure line from the failure's cause,
the route class and the request id.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import time
from typing import TextIO
from urllib.parse import urlsplit

import msgspec

from . import __version__
from .config import Settings

access_log = logging.getLogger("ignore_proxy.access")
start_log = logging.getLogger("ignore_proxy.start")
upstream_log = logging.getLogger("ignore_proxy.upstream")
# One warning per cause in this many seconds; the next one counts those left out.
UPSTREAM_WARNING_INTERVAL = 10.0


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
    global _access_writer
    _access_writer = _AccessWriter(handler.stream, settings.logging.format == "json")
    root.setLevel(settings.logging.level.upper())
    # httpx logs every request URL at INFO, and URLs can carry ?access_token=.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_start(settings: Settings) -> None:
    """What the proxy serves and with which settings: the line to read when it misbehaves."""
    upstream = _without_secrets(settings.upstream)
    effective = msgspec.to_builtins(settings)
    effective["upstream"] = upstream
    effective["cluster"]["redis_url"] = _without_secrets(settings.cluster.redis_url)
    others = " ".join(
        # As TOML writes them, so a line can be compared with the config file.
        f"{section}.{key}={str(value).lower() if isinstance(value, bool) else value}"
        for section, table in effective.items()
        if isinstance(table, dict) and section != "metrics"  # named before
        for key, value in table.items()
    )
    start_log.info(
        "ignore-proxy %s: upstream %s, listen %s, workers %d, metrics %s; %s",
        __version__, upstream, settings.listen, settings.workers,
        settings.metrics.listen or "off", others,
        extra={"fields": {"version": __version__, "settings": effective}},
    )  # fmt: skip


def _without_secrets(url: str) -> str:
    """A URL setting as it may be logged: without its user:password, nor its query, where
    Redis takes a `password=` too."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2], query="").geturl()


class _RateLimit:
    """At most one line per key in `interval` seconds, and how many were left out."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def admit(self, key: str) -> int | None:
        """None to leave this line out, else how many were left out before it."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._left_out[key] = self._left_out.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._left_out.pop(key, 0)


_upstream_limit = _RateLimit(UPSTREAM_WARNING_INTERVAL)


def log_upstream_failure(cause: str, detail: str, route: str, request_id: str) -> None:
    """One warning for a request the homeserver failed: the cause in a word (`refused`,
    `dns`, `tls`, `timeout`, `bad answer`, ...), what happened, the route class and the
    request id; never the path (the pool's messages name none)."""
    left_out = _upstream_limit.admit(cause)
    if left_out is None:
        return
    more = f" ({left_out} more like it left out)" if left_out else ""
    upstream_log.warning(
        "upstream %s: %s; route %s id=%s%s", cause, detail, route, request_id, more,
        extra={"fields": {"cause": cause, "detail": detail, "route": route,
                          "request_id": request_id, "left_out": left_out}},
    )  # fmt: skip


def log_request(
    method: str,
    route: str,
    status: int | str,
    seconds: float,
    headers: list[tuple[bytes, bytes]],
    request_id: str | None = None,
) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    request_id = request_id or request_id_of(headers)
    duration_ms = round(seconds * 1000, 1)
    if _access_writer is not None:
        _access_writer.write(method, route, status, duration_ms, request_id)
        return
    access_log.info(
        "%s %s %s %.1fms id=%s", method, route, status, duration_ms, request_id,
        extra={"fields": {"method": method, "route": route, "status": status,
                          "duration_ms": duration_ms, "request_id": request_id}},
    )  # fmt: skip


class _AccessWriter:
    """Access lines written as `logging` would format them, without its per-record cost.

    Through `logging`, one line cost ~15 us of CPU plus a write per request (a tiny
    pass-through costs ~80 us in all; benchmarks/). Here lines are formatted directly and
    written once per turn of the event loop, however many requests ended in it.
    """

    def __init__(self, stream: TextIO, json_lines: bool) -> None:
        self.stream = stream
        self.json_lines = json_lines
        self.pending: list[str] = []
        self._second = -1
        self._stamp = ""
        atexit.register(self.flush)

    def write(
        self, method: str, route: str, status: int | str, duration_ms: float, request_id: str
    ) -> None:
        now = time.time()
        second = int(now)
        millis = int((now - second) * 1000)
        if second != self._second:
            self._second = second
            fmt = "%Y-%m-%dT%H:%M:%S" if self.json_lines else "%Y-%m-%d %H:%M:%S"
            self._stamp = time.strftime(
                fmt, (time.gmtime if self.json_lines else time.localtime)(now)
            )
        message = f"{method} {route} {status} {duration_ms:.1f}ms id={request_id}"
        if self.json_lines:
            line = msgspec.json.encode(
                {"time": f"{self._stamp}.{millis:03d}Z", "level": "info", "logger": access_log.name,
                 "message": message, "method": method, "route": route, "status": status,
                 "duration_ms": duration_ms, "request_id": request_id}
            ).decode()  # fmt: skip
        else:
            line = f"{self._stamp},{millis:03d} INFO {access_log.name}: {message}"
        if not self.pending:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no event loop: write at once
                self.pending.append(line)
                self.flush()
                return
        self.pending.append(line)

    def flush(self) -> None:
        if self.pending:
            lines, self.pending = self.pending, []
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()


_access_writer: _AccessWriter | None = None


def flush() -> None:
    """Write the access lines still waiting (a worker about to `os._exit`)."""
    if _access_writer is not None:
        _access_writer.flush()


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's (or nginx's) X-Request-ID if it looks like one, else a new one."""
    for name, value in headers:
        if name.lower() == b"x-request-id" and 0 < len(value) <= 128:
            text = value.decode("latin-1")
            if text.isascii() and text.replace("-", "").replace("_", "").isalnum():
                return text
    return os.urandom(8).hex()
