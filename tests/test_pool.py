"""The upstream pool on its own, against a real server on loopback."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ignore_proxy.pool import Timeouts, UpstreamPool

from .servers import Upstream, serve_upstream

TIMEOUTS = Timeouts(connect=5, read=5, write=5, pool=5)


async def test_a_hostname_is_looked_up_once_for_a_burst_of_new_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with serve_upstream(Upstream()) as url:
        port = url.rsplit(":", 1)[1]
        pool = UpstreamPool(
            f"http://localhost:{port}", max_connections=None, max_keepalive_connections=None
        )
        loop = asyncio.get_running_loop()
        lookups: list[Any] = []
        real = loop.getaddrinfo

        async def counted(*args: Any, **kwargs: Any) -> Any:
            lookups.append(args)
            return await real(*args, **kwargs)

        monkeypatch.setattr(loop, "getaddrinfo", counted)
        responses = await asyncio.gather(
            *(pool.send("GET", b"/x", [(b"host", b"hs")], None, TIMEOUTS) for _ in range(10))
        )
        assert pool.connections == 10  # ten new connections at once
        for response in responses:
            assert response.status_code == 200
            assert b'"ok":true' in await response.read()
            await response.aclose()
        assert len(lookups) == 1
        await pool.aclose()
