# ruff: noqa: ASYNC210
"""A flood of distinct invalid tokens (upstream lookups, memory, a real user's latency),
and secrets: no token in any log line or metric, no cookie carried across users."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path

import httpx
import pytest

from ..servers import run_proxy
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

# Not an IGNORE_PROXY_* name: the proxy refuses unknown ones, and it inherits this environment.
FLOOD = int(os.environ.get("TEST_FLOOD_TOKENS", "10000"))


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


@pytest.mark.slow
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


# Every token holds SECRET: none may reach a log line or a metric.
ALICE_TOKEN = "syt_SECRETalice_token_0123"
CHARLIE_TOKEN = "syt_SECRETcharlie_9876"
NO_LIST_TOKEN = "syt_SECRETdave_list_down_4321"  # the homeserver fails reading dave's list
NO_WHOAMI_TOKEN = "syt_SECRETerin_whoami_down_77"  # ... and looking up erin's token
INVALID_TOKEN = "syt_SECRETinvalid_5555"  # refused credentials (whoami 401)
TOKENS = [ALICE_TOKEN, CHARLIE_TOKEN, NO_LIST_TOKEN, NO_WHOAMI_TOKEN, INVALID_TOKEN]

# Filtered routes, each with its request body (None: a GET).
FILTERED = {
    "sync": ("GET", SYNC, None),
    "sliding_sync": ("POST", "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync", b"{}"),
    "messages": ("GET", "/_matrix/client/v3/rooms/!r:hs/messages", None),
    "event": ("GET", "/_matrix/client/v3/rooms/!r:hs/event/$x", None),
}
# What the stand-in does on a filtered route when asked by `?fault=`, and the status the
# client must get for a token with a readable list.
FAULTS = {
    "": 200,
    "500": 500,  # the homeserver's error, passed on
    "401": 401,  # the token refused by the route itself (revoked meanwhile)
    "stall": 504,  # no answer within timeouts.read
    "reset": 502,  # the connection cut before an answer
    "malformed": 502,  # a body the filter cannot read: fail closed
}
# Spellings of filtered routes that homeservers read differently: the matcher refuses
# them (400) before any upstream request (ignore_proxy/routes.py). A path matching no
# route (`/sync/stall`) is no error path: it passes through untouched.
REFUSED = {
    "refused_sync": ("GET", "/_matrix/client/v3/Sync", None),
    "refused_event": ("GET", "/_matrix/client/v3/rooms/!r:hs/event/$x%2Fy", None),
}


async def test_no_token_in_logs_or_metrics_and_no_cookie_crosses_users(tmp_path: Path) -> None:
    """On every filtered route's error paths (upstream error, timeout, reset, malformed
    body, ignore list or identity unavailable, refused credentials, refused path), at
    debug level, in both log formats: no token in a log line or a metric."""
    cookies_seen: list[tuple[str, bytes]] = []

    async def route(req: Request, conn: Conn) -> bool:
        cookies_seen.append((req.token or "", req.headers.get(b"cookie", b"")))
        fault = req.query.get("fault", [""])[0]
        if fault == "500":
            await conn.json(500, {"errcode": "M_UNKNOWN", "error": "down"})
        elif fault == "401":
            await conn.json(401, {"errcode": "M_UNKNOWN_TOKEN", "error": "revoked"})
        elif fault == "stall":
            await conn.idle(5)
            return False
        elif fault == "reset":
            conn.reset()
            return False
        elif fault == "malformed":
            await conn.respond(200, b'{"rooms": "@bob:hs" truncated')
        else:
            await conn.respond(
                200,
                b'{"next_batch": "s", "chunk": []}',
                extra=b"set-cookie: session=%s; Path=/\r\n" % (req.token or "").encode(),
            )
        return True

    homeserver = MiniHomeserver(
        route=route,
        tokens={
            ALICE_TOKEN: "@alice:hs",
            CHARLIE_TOKEN: "@charlie:hs",
            NO_LIST_TOKEN: "@dave:hs",
            NO_WHOAMI_TOKEN: "@erin:hs",
        },
    )

    async def standin(req: Request, conn: Conn) -> bool | None:
        if req.token == NO_WHOAMI_TOKEN and req.path.endswith("/account/whoami"):
            await conn.json(500, {"errcode": "M_UNKNOWN", "error": "down"})
            return True
        if req.token == NO_LIST_TOKEN and "/account_data/m.ignored_user_list" in req.path:
            await conn.json(500, {"errcode": "M_UNKNOWN", "error": "down"})
            return True
        return await homeserver(req, conn)

    for fmt in ("text", "json"):
        log_path = tmp_path / f"proxy-{fmt}.log"
        with (
            raw_upstream(standin) as upstream,
            run_proxy(
                upstream.url,
                log_path=log_path,
                metrics=True,
                logging_level="debug",
                logging_format=fmt,
                timeouts_read="0.5",
            ) as proxy,
        ):
            statuses = await _every_error_path(proxy.url)
            await fetch(proxy.url, b"GARBAGE /x?access_token=syt_SECRETgarbage HTTP/1.1\r\n\r\n")
            metrics = httpx.get(proxy.metrics_url + "/metrics").text
            assert proxy.stop() == 0
            logged = log_path.read_text(encoding="utf-8", errors="replace")
            _assert_each_error_path_was_taken(statuses)
            assert logged.count("\n") > 10, logged[:500]  # debug level did log
            assert "SECRET" not in logged, [ln for ln in logged.splitlines() if "SECRET" in ln]
            assert "SECRET" not in metrics
            assert "never retrieved" not in logged, "lookup tasks' errors left unretrieved"
    for token, cookie in cookies_seen:
        assert cookie == b"", f"a cookie reached upstream with {token[:12]}: {cookie!r}"
    print(f"secrets: {len(cookies_seen)} upstream requests, no cookie, no token in logs/metrics")


Statuses = dict[tuple[str, str, str], set[int | None]]  # (token, route, fault): statuses


async def _every_error_path(url: str) -> Statuses:
    """Each token, on each filtered route, with each fault, the token in each place a
    client may put it; all at once (the stalls take timeouts.read)."""
    keys: list[tuple[str, str, str]] = []
    requests = []
    for token in TOKENS:
        for name, (method, path, body) in {**FILTERED, **REFUSED}.items():
            for fault in FAULTS if name in FILTERED else [""]:
                query = f"fault={fault}&" if fault else ""
                for raw in (
                    request_bytes(method, f"{path}?{query}", token, body=body),
                    request_bytes(method, f"{path}?{query}access_token={token}", body=body),
                    request_bytes(
                        method, f"{path}?{query}access_token={token}&user_id=%40x", body=body
                    ),
                ):
                    keys.append((token, name, fault))
                    requests.append(fetch(url, raw))
    answers = await asyncio.gather(*requests)
    statuses: Statuses = {}
    for key, answer in zip(keys, answers, strict=True):
        statuses.setdefault(key, set()).add(None if answer is None else answer.status)
    return statuses


def _assert_each_error_path_was_taken(statuses: Statuses) -> None:
    """The answers show that each request took the error path meant for it."""
    for (token, name, fault), seen in statuses.items():
        upstream_failed = fault not in ("", "malformed")
        if name in REFUSED:
            expected = {400}
        elif token == INVALID_TOKEN:
            expected = {401}
        elif token in (NO_LIST_TOKEN, NO_WHOAMI_TOKEN):
            # Nothing to filter unknown: 503. The homeserver's own failure needs no
            # filtering and may be passed on first.
            expected = {503, FAULTS[fault]} if upstream_failed else {503}
        elif token == CHARLIE_TOKEN and fault == "malformed":
            expected = {200}  # charlie ignores nobody: his answers are never parsed
        else:
            expected = {FAULTS[fault]}
        assert seen and seen <= expected, (token[:16], name, fault, seen)
    assert len(statuses) == len(TOKENS) * (len(FILTERED) * len(FAULTS) + len(REFUSED))


def _live(url: str) -> bool:
    try:
        return httpx.get(url + "/_ignore_proxy/health/live").status_code == 200
    except httpx.TransportError:
        return False
