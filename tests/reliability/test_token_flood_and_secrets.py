# ruff: noqa: ASYNC210, ASYNC220, ASYNC230, B023
"""A flood of distinct invalid tokens (upstream lookups, memory, a real user's latency),
and secrets: no token in any log line or metric, no cookie carried across users."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time

import httpx

from ..servers import free_port, run_proxy
from .harness import (
    SYNC,
    Conn,
    MiniHomeserver,
    Request,
    fetch,
    raw_upstream,
    request_bytes,
    rss_kib,
    wait_until,
)

FLOOD = int(os.environ.get("IGNORE_PROXY_FLOOD_TOKENS", "10000"))


async def test_a_dead_token_retried_costs_one_lookup() -> None:
    """A client with a logged-out token retrying /sync: the negative cache must answer,
    although each upstream 401 makes the proxy forget the token."""

    async def ok(req: Request, conn: Conn) -> bool:
        await conn.json(200, {"next_batch": "s"})
        return True

    homeserver = MiniHomeserver(route=ok)
    with raw_upstream(homeserver) as upstream, run_proxy(upstream.url) as proxy:
        for _ in range(50):
            answer = await fetch(proxy.url, request_bytes("GET", SYNC, "dead-token"))
            assert answer is not None and answer.status == 401
        # the second request may start while the first lookup is still landing
        assert homeserver.whoami_calls <= 2


async def sync_latency(url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.monotonic()
        answer = await fetch(url, request_bytes("GET", SYNC, "alice-token"))
        assert answer is not None and answer.status == 200
        out.append(time.monotonic() - started)
        await asyncio.sleep(0.01)
    return out


async def test_token_flood() -> None:
    async def ok(req: Request, conn: Conn) -> bool:
        await conn.json(200, {"next_batch": "s"})
        return True

    homeserver = MiniHomeserver(route=ok, whoami_delay=0.02)
    with raw_upstream(homeserver) as upstream, run_proxy(upstream.url) as proxy:
        pid = proxy.process.pid
        before = await sync_latency(proxy.url, 20)
        rss_before = rss_kib(pid)
        calls_before = homeserver.whoami_calls
        gate = asyncio.Semaphore(200)

        async def bad(i: int) -> int:
            async with gate:
                answer = await fetch(proxy.url, request_bytes("GET", SYNC, f"invalid-{i:05d}"))
                return 0 if answer is None else answer.status

        started = time.monotonic()
        flood = asyncio.gather(*(bad(i) for i in range(FLOOD)))
        during = await sync_latency(proxy.url, 20)
        statuses = await flood
        seconds = time.monotonic() - started
        assert set(statuses) == {401}
        # The flood's answers are the homeserver's own 401s: lookups the proxy has yet to
        # send may still be queued behind its 32 slots. Wait for one per token, or for
        # the calls to stop (none in flight, no new one for a second).
        seen = -1
        for _ in range(30):
            if homeserver.whoami_calls - calls_before >= FLOOD:
                break
            if homeserver.whoami_calls == seen and homeserver.whoami_in_flight == 0:
                break
            seen = homeserver.whoami_calls
            await asyncio.sleep(1)
        assert wait_until(lambda: homeserver.whoami_in_flight == 0)
        lookups = homeserver.whoami_calls - calls_before
        rss_after = rss_kib(pid)
        # the same invalid tokens again: answered from the negative cache, where it holds them
        again = await asyncio.gather(*(bad(i) for i in range(FLOOD - 500, FLOOD)))
        assert set(again) == {401}
        repeat_lookups = homeserver.whoami_calls - calls_before - lookups
        p50 = statistics.median(before), statistics.median(during)
        print(
            f"token flood: {FLOOD} invalid tokens in {seconds:.1f}s, {lookups} whoami calls "
            f"(peak {homeserver.whoami_peak} concurrent), repeat of last 500: "
            f"{repeat_lookups} more; proxy RSS {rss_before} -> {rss_after} KiB; real user's "
            f"sync p50 {p50[0] * 1000:.1f} ms before, {p50[1] * 1000:.1f} ms during "
            f"(max {max(during) * 1000:.0f} ms)"
        )
        assert lookups <= FLOOD  # at most one per distinct token
        assert repeat_lookups == 0
        assert rss_after - rss_before < 64 * 1024
        assert max(during) < 2.0


TOKENS = ["syt_SECRETalice_token_0123", "syt_SECRETcharlie_9876"]


async def test_no_token_in_logs_or_metrics_and_no_cookie_crosses_users() -> None:
    cookies_seen: list[tuple[str, bytes]] = []

    async def route(req: Request, conn: Conn) -> bool:
        cookies_seen.append((req.token or "", req.headers.get(b"cookie", b"")))
        if "stall" in req.path:
            await conn.idle(5)
            return False
        if "reset" in req.path:
            conn.reset()
            return False
        if "bad" in req.path:
            await conn.respond(200, b'{"rooms": "@bob:hs" truncated')
            return True
        await conn.respond(
            200,
            b'{"next_batch": "s"}',
            extra=b"set-cookie: session=%s; Path=/\r\n" % (req.token or "").encode(),
        )
        return True

    homeserver = MiniHomeserver(
        route=route,
        tokens={TOKENS[0]: "@alice:hs", TOKENS[1]: "@charlie:hs"},
    )
    metrics_port = free_port()
    for fmt in ("text", "json"):
        with raw_upstream(homeserver) as upstream:
            env = {
                "IGNORE_PROXY_LOGGING_LEVEL": "debug",
                "IGNORE_PROXY_LOGGING_FORMAT": fmt,
                "IGNORE_PROXY_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
                "IGNORE_PROXY_TIMEOUTS_READ": "0.5",
            }
            port = free_port()
            log_path = f"/tmp/ignore-proxy-secrets-{os.getpid()}-{fmt}.log"
            with open(log_path, "wb") as log:
                process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "ignore_proxy",
                        "--upstream",
                        upstream.url,
                        "--listen",
                        f"127.0.0.1:{port}",
                    ],
                    env={**os.environ, **env},
                    stderr=log,
                    stdout=log,
                )
            url = f"http://127.0.0.1:{port}"
            try:
                assert wait_until(lambda: _live(url), 20)
                paths = [
                    SYNC,
                    SYNC + "/stall",
                    "/_matrix/client/v3/rooms/!r/messages/reset",
                    "/_matrix/client/v3/rooms/!r:hs/messages",
                    SYNC + "bad",
                    "/_matrix/client/v3/rooms/!r:hs/event/$x",
                ]
                for token in (*TOKENS, "syt_SECRETinvalid_5555"):
                    for path in paths:
                        for raw in (
                            request_bytes("GET", path, token),
                            request_bytes("GET", f"{path}?access_token={token}&timeout=1"),
                            request_bytes("GET", f"{path}?access_token={token}&user_id=%40x"),
                        ):
                            await fetch(url, raw)
                await fetch(url, b"GARBAGE /x?access_token=syt_SECRETgarbage HTTP/1.1\r\n\r\n")
                metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
            finally:
                process.terminate()
                process.wait(10)
            with open(log_path, encoding="utf-8", errors="replace") as log_file:
                logged = log_file.read()
            os.unlink(log_path)
            assert logged.count("\n") > 10, logged[:500]  # debug level did log
            assert "SECRET" not in logged, [ln for ln in logged.splitlines() if "SECRET" in ln]
            assert "SECRET" not in metrics
            assert "never retrieved" not in logged, "lookup tasks' errors left unretrieved"
    for token, cookie in cookies_seen:
        assert cookie == b"", f"a cookie reached upstream with {token[:12]}: {cookie!r}"
    print(f"secrets: {len(cookies_seen)} upstream requests, no cookie, no token in logs/metrics")


def _live(url: str) -> bool:
    try:
        return httpx.get(url + "/_ignore_proxy/health/live").status_code == 200
    except httpx.TransportError:
        return False
