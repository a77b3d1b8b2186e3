# ruff: noqa: ASYNC110
"""Upstream faults against the real proxy process: refused connections, resets mid-body,
stalls, malformed answers on filtered endpoints, a 20 MB sync, and an upstream restart
under 1,000 open long-polls. Each client gets a Matrix-shaped error or the right body,
the proxy keeps serving, and no connection or file descriptor is left behind."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Iterator

import pytest

from ..servers import ProxyProcess, run_proxy
from .harness import (
    ALICE,
    BOB,
    CHARLIE,
    ROOM,
    SYNC,
    Answer,
    Conn,
    MiniHomeserver,
    RawUpstream,
    Request,
    fetch,
    message,
    open_fds,
    raw_upstream,
    request_bytes,
    rss_kib,
    sync_body,
    wait_until,
)

READ_TIMEOUT = 1.0
MEDIA = "/_matrix/media/v3/download/hs/abc"


@pytest.fixture(scope="module")
def homeserver() -> MiniHomeserver:
    return MiniHomeserver()


@pytest.fixture(scope="module")
def upstream(homeserver: MiniHomeserver) -> Iterator[RawUpstream]:
    with raw_upstream(homeserver) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(upstream: RawUpstream) -> Iterator[ProxyProcess]:
    # No idle keep-alive: at rest, every upstream connection must be closed, so any
    # connection still open afterwards is a leak, counted from the upstream's side.
    env = {
        "IGNORE_PROXY_TIMEOUTS_READ": str(READ_TIMEOUT),
        "IGNORE_PROXY_TIMEOUTS_CONNECT": "1",
        "IGNORE_PROXY_LIMITS_MAX_KEEPALIVE_CONNECTIONS": "0",
    }
    with run_proxy(upstream.url, env) as process:
        yield process


@pytest.fixture
def checked(
    proxy: ProxyProcess, upstream: RawUpstream, homeserver: MiniHomeserver
) -> Iterator[ProxyProcess]:
    """Each test leaves no upstream connection and no proxy fd behind, and the proxy
    still filters correctly afterwards."""
    homeserver.route = None
    pid = proxy.process.pid
    assert wait_until(lambda: upstream.open == 0)
    fds = open_fds(pid)
    yield proxy
    homeserver.route = good_sync
    after = asyncio.run(fetch(proxy.url, request_bytes("GET", SYNC, "alice-token")))
    assert after is not None and after.status == 200, "the proxy stopped serving"
    assert [e["event_id"] for e in timeline(after)] == ["$a1", "$c1"]
    homeserver.route = None
    assert wait_until(lambda: upstream.open == 0), f"{upstream.open} upstream connections leaked"
    assert wait_until(lambda: open_fds(pid) <= fds), f"fds {fds} -> {open_fds(pid)}"


GOOD = json.dumps(sync_body(message("$a1", ALICE), message("$b1", BOB), message("$c1", CHARLIE)))


async def good_sync(req: Request, conn: Conn) -> bool:
    await conn.respond(200, GOOD.encode())
    return True


def timeline(answer: Answer) -> list[dict[str, object]]:
    events: list[dict[str, object]] = answer.json()["rooms"]["join"][ROOM]["timeline"]["events"]
    return events


def assert_matrix_error(answer: Answer | None, status: int) -> None:
    assert answer is not None, "connection dropped instead of an error answer"
    assert answer.status == status, (answer.status, answer.body[:200])
    body = answer.json()
    assert body["errcode"] == "M_UNKNOWN" and isinstance(body["error"], str)


async def get(proxy: ProxyProcess, path: str, token: str | None = "alice-token") -> Answer | None:
    return await fetch(proxy.url, request_bytes("GET", path, token), timeout=30)


async def test_refused_connections_are_502_then_service_resumes(
    checked: ProxyProcess, upstream: RawUpstream, homeserver: MiniHomeserver
) -> None:
    upstream.kill()
    try:
        for path, token in ((SYNC, "alice-token"), (MEDIA, None), (SYNC, "fresh-token")):
            assert_matrix_error(await get(checked, path, token), 502)
    finally:
        upstream.start()


@pytest.mark.parametrize("token", ["alice-token", "charlie-token", None])
async def test_reset_mid_body(
    checked: ProxyProcess, homeserver: MiniHomeserver, token: str
) -> None:
    """A cut after the headers: an error when the proxy filters (alice), else a visibly
    truncated answer, never a complete-looking one."""

    async def reset(req: Request, conn: Conn) -> bool:
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + GOOD.encode())
        await asyncio.sleep(0.05)
        conn.reset()
        return False

    homeserver.route = reset
    answer = await get(checked, SYNC if token else MEDIA, token)
    if token == "alice-token" or (answer is not None and answer.complete):
        assert_matrix_error(answer, 502)


async def test_stall_before_headers_is_504(
    checked: ProxyProcess, homeserver: MiniHomeserver
) -> None:
    async def stall(req: Request, conn: Conn) -> bool:
        await conn.idle(READ_TIMEOUT * 5)
        return False

    homeserver.route = stall
    started = time.monotonic()
    answers = await asyncio.gather(
        get(checked, SYNC),
        get(checked, SYNC, "charlie-token"),
        get(checked, MEDIA, None),
        get(checked, SYNC + "?timeout=500"),
    )
    for answer in answers:
        assert_matrix_error(answer, 504)
    assert time.monotonic() - started < READ_TIMEOUT + 0.5 + 2


@pytest.mark.parametrize("token", ["alice-token", "charlie-token"])
async def test_stall_mid_body(
    checked: ProxyProcess, homeserver: MiniHomeserver, token: str
) -> None:
    async def stall(req: Request, conn: Conn) -> bool:
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + GOOD.encode())
        await conn.idle(READ_TIMEOUT * 5)
        return False

    homeserver.route = stall
    started = time.monotonic()
    answer = await get(checked, SYNC, token)
    assert time.monotonic() - started < READ_TIMEOUT + 2
    if token == "alice-token" or (answer is not None and answer.complete):
        assert_matrix_error(answer, 504)


MALFORMED = [
    b"<html>bad gateway @bob:hs</html>",
    GOOD.encode()[: len(GOOD) // 2],
    GOOD.encode()[: GOOD.index("$c1")],
    b'{"next_batch": "s2", "rooms": {"join": {"!room:hs": {"timeline": {"events": ['
    + (json.dumps(message("$b1", BOB)).encode() + b"]}}}}}}}"),
    b'["' + BOB.encode() + b'"]',
    GOOD.encode() + b"trailing",
    b"\xff\xfe" + GOOD.encode(),
]


@pytest.mark.parametrize("body", MALFORMED)
async def test_malformed_json_on_filtered_endpoint_never_leaks(
    checked: ProxyProcess, homeserver: MiniHomeserver, body: bytes
) -> None:
    async def bad(req: Request, conn: Conn) -> bool:
        await conn.respond(200, body)
        return True

    homeserver.route = bad
    answer = await get(checked, SYNC)
    assert answer is not None
    if answer.status == 200:  # only if it cannot name bob at all
        assert b"bob" not in answer.body
    else:
        assert_matrix_error(answer, 502)


def big_sync(size: int) -> bytes:
    events, n = [], 0
    while n * 1100 < size:
        sender = (ALICE, BOB, CHARLIE)[n % 3]
        events.append(message(f"$e{n}", sender, "x" * 1000))
        n += 1
    return json.dumps(sync_body(*events)).encode()


async def test_20_mb_sync(checked: ProxyProcess, homeserver: MiniHomeserver) -> None:
    body = big_sync(20 * 1024 * 1024)
    assert len(body) >= 20 * 1024 * 1024

    async def big(req: Request, conn: Conn) -> bool:
        await conn.respond(200, body)
        return True

    homeserver.route = big
    pid = checked.process.pid
    before = rss_kib(pid)
    started = time.monotonic()
    alice, charlie = await asyncio.gather(get(checked, SYNC), get(checked, SYNC, "charlie-token"))
    seconds = time.monotonic() - started
    assert alice is not None and alice.status == 200 and alice.complete
    senders = [e["sender"] for e in timeline(alice)]
    total = body.count(b'"event_id"')
    assert BOB not in senders and len(senders) == total - total // 3
    assert charlie is not None and charlie.complete
    assert hashlib.sha256(charlie.body).digest() == hashlib.sha256(body).digest()
    grown = rss_kib(pid) - before
    print(f"20 MB sync: {len(body)} bytes, {seconds:.2f}s for both, proxy RSS +{grown} KiB")


async def test_upstream_restart_under_1000_long_polls() -> None:
    """The upstream cuts every connection and comes back on the same port: every one of
    1,000 open long-polls gets a quick Matrix error, and the next sync works."""
    holding = 0

    async def hold(req: Request, conn: Conn) -> bool:
        nonlocal holding
        if "timeout=" not in req.target.decode():
            await conn.respond(200, GOOD.encode())
            return True
        holding += 1
        await conn.idle(3600)
        return False

    homeserver = MiniHomeserver(route=hold)
    with raw_upstream(homeserver) as upstream, run_proxy(upstream.url) as proxy:
        pid = proxy.process.pid
        fds = open_fds(pid)
        tokens = ["alice-token", "charlie-token"]
        polls = [
            asyncio.create_task(
                fetch(proxy.url, request_bytes("GET", SYNC + "?timeout=30000", tokens[i % 2]), 30)
            )
            for i in range(1000)
        ]
        deadline = time.monotonic() + 30
        while holding < 1000 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert holding == 1000
        peak_fds = open_fds(pid)
        upstream.kill()
        cut = time.monotonic()
        await asyncio.sleep(0.1)
        upstream.start()
        answers = await asyncio.gather(*polls)
        waited = time.monotonic() - cut
        statuses: dict[int, int] = {}
        for answer in answers:
            assert answer is not None
            assert answer.status in (502, 504), answer.status
            assert answer.json()["errcode"] == "M_UNKNOWN"
            statuses[answer.status] = statuses.get(answer.status, 0) + 1
        assert waited < 5
        fresh = await fetch(proxy.url, request_bytes("GET", SYNC, "alice-token"))
        assert fresh is not None and fresh.status == 200
        assert [e["event_id"] for e in timeline(fresh)] == ["$a1", "$c1"]
        assert wait_until(lambda: open_fds(pid) <= fds + upstream.open, 10)
        leaked_fds = open_fds(pid) - fds - upstream.open
        print(
            f"restart: 1000 long-polls answered {statuses} within {waited:.2f}s; proxy fds "
            f"{fds} -> peak {peak_fds} -> {open_fds(pid)} ({upstream.open} idle upstream, "
            f"{leaked_fds} leaked)"
        )
        assert upstream.open <= 512  # the keep-alive pool, not one per long-poll


async def not_modified(req: Request, conn: Conn) -> bool:
    await conn.send(b'HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\netag: "x"\r\n\r\n')
    return True


async def test_304_with_content_length_is_relayed_whole(
    checked: ProxyProcess, homeserver: MiniHomeserver
) -> None:
    """A 304's Content-Length is the length of a body it does not carry: relayed with it,
    uvicorn would fail the answer ("Response content shorter than Content-Length")."""
    homeserver.route = not_modified
    answer = await get(checked, MEDIA, None)
    assert answer is not None and answer.status == 304
    assert answer.headers.get(b"etag") == b'"x"'
    assert b"content-length" not in answer.headers and answer.complete


async def test_304_on_a_filtered_route_is_refused(
    checked: ProxyProcess, homeserver: MiniHomeserver
) -> None:
    """The proxy sends no conditional header there: a 304 would leave the client with
    what it cached, filtered for an older list."""
    homeserver.route = not_modified
    answer = await get(checked, SYNC, "alice-token")
    assert answer is not None and answer.status == 502 and answer.complete
