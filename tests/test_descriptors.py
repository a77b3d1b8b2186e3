"""Open files: the proxy raises its soft limit to the hard one at start and takes its
upstream connection limit from it (ignore_proxy/descriptors.py)."""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ignore_proxy import descriptors, server
from ignore_proxy.config import load_settings
from ignore_proxy.upstream import create_pool

from .servers import Upstream, run_proxy, serve_upstream

# Far below what the clients below need (two descriptors each), far above what the
# proxy needs to start.
SOFT_START = 128
CLIENTS = 200


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[Upstream, str]]:
    app = Upstream()
    with serve_upstream(app) as url:
        yield app, url


def _open_files(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open files limit")


def test_the_proxy_raises_its_soft_limit_and_serves_past_the_one_it_started_with(
    upstream: tuple[Upstream, str],
) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard < 4 * CLIENTS:
        pytest.skip(f"the hard open files limit ({hard}) is too low for {CLIENTS} clients")
    with run_proxy(upstream[1], open_files=(SOFT_START, hard)) as proxy:
        assert _open_files(proxy.process.pid) == (hard, hard)

        async def poll_all() -> list[int]:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
            async with httpx.AsyncClient(limits=limits, timeout=30) as client:
                answers = await asyncio.gather(
                    *(
                        client.get(proxy.url + "/hold?seconds=1&timeout=1000")
                        for _ in range(CLIENTS)
                    )
                )
            return [answer.status_code for answer in answers]

        assert asyncio.run(poll_all()) == [200] * CLIENTS


def test_the_connection_limit_leaves_room_for_clients_upstreams_and_lookups() -> None:
    for open_files in (300, 1024, 20_000, 1_048_576):
        forwarded = descriptors.connection_limit(0, open_files)
        lookups = max(64, forwarded // 8)  # upstream.create_lookup_pool
        used = 2 * forwarded + lookups + descriptors.RESERVED
        assert open_files - 3 <= used <= open_files, (open_files, used)
    assert descriptors.connection_limit(0, 10) == 1  # never none at all
    assert descriptors.connection_limit(300, 20_000) == 300  # the operator's, as set


def test_the_default_pool_takes_its_limit_from_the_open_files_limit() -> None:
    pool = create_pool(load_settings(environ={}))
    assert pool._slots.semaphore is not None
    assert pool._slots.semaphore._value == descriptors.connection_limit(0)
    pool = create_pool(load_settings(environ={"IGNORE_PROXY_LIMITS_MAX_CONNECTIONS": "300"}))
    assert pool._slots.semaphore is not None
    assert pool._slots.semaphore._value == 300


def test_a_connection_limit_above_what_the_descriptors_allow_is_warned_of(
    caplog: pytest.LogCaptureFixture,
) -> None:
    room = descriptors.connection_limit(0)
    settings = load_settings(environ={"IGNORE_PROXY_LIMITS_MAX_CONNECTIONS": str(room + 1)})
    with caplog.at_level("WARNING", logger="ignore_proxy.server"):
        server._raise_open_files_limit(settings)
    assert "raise the hard limit" in caplog.text
