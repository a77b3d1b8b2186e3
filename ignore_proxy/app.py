"""Assembly: the shared upstream client, the caches, the proxy, and the proxy's own endpoints."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .calls import Services
from .config import Settings
from .identity import IdentityResolver
from .ignore_lists import IgnoreListStore
from .metrics import Metrics
from .proxy import Proxy
from .upstream import PoolTransport, create_client, create_lookup_pool, create_pool

if TYPE_CHECKING:
    from .cluster import ClusterChannel

# The proxy's own endpoints live under a prefix no Matrix path can start with.
OWN_PREFIX = "/_ignore_proxy/"
READY_PROBE = "/_matrix/client/versions"


class IgnoreProxyApp:
    """Everything goes to the proxy except the proxy's own endpoints and lifespan events."""

    def __init__(self, settings: Settings):
        self.settings = settings
        pool = create_pool(settings)
        # The proxy's own lookups go through httpx over a pool of their own.
        self.client = create_client(settings, PoolTransport(create_lookup_pool(settings)))
        self.identity = IdentityResolver(
            self.client,
            max_size=settings.identity.cache_size,
            ttl=settings.identity.cache_ttl,
            negative_ttl=settings.identity.negative_ttl,
            max_concurrent=settings.identity.max_concurrent_lookups,
        )
        self.ignore_lists = IgnoreListStore(
            self.client, ttl=settings.ignore.list_ttl, max_users=settings.ignore.list_cache_size
        )
        # Other instances in front of the same homeserver, told of list changes (Redis).
        self.cluster: ClusterChannel | None = None
        if settings.cluster.redis_url:
            from .cluster import ClusterChannel  # the Redis client only when it is used

            self.cluster = ClusterChannel(settings.cluster, self.ignore_lists)
        self.metrics = Metrics()
        self.metrics.watch_caches(self.identity, self.ignore_lists, self.cluster)
        services = Services(settings, self.client, self.identity, self.ignore_lists, self.metrics)
        self.pool = pool
        self.proxy = Proxy(settings, pool, services)
        self.own = Starlette(
            routes=[
                Route(OWN_PREFIX + "health/live", self.live),
                Route(OWN_PREFIX + "health/ready", self.ready),
            ],
            lifespan=self.lifespan,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith(OWN_PREFIX):
            await self.proxy(scope, receive, send)
        else:
            await self.own(scope, receive, send)

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        if self.cluster is not None:
            await self.cluster.start()
        try:
            yield
        finally:
            if self.cluster is not None:
                await self.cluster.stop()
            await self.client.aclose()
            await self.pool.aclose()

    async def live(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        # Redis down does not make the instance unready: it serves with short-lived lists.
        cluster = {} if self.cluster is None else {"cluster": self.cluster.state()}
        try:
            response = await self.client.get(READY_PROBE, timeout=5.0)
        except httpx.TransportError as exc:
            return JSONResponse(
                {"status": "unavailable", "reason": type(exc).__name__, **cluster},
                status_code=503,
            )
        if response.status_code != 200:
            return JSONResponse(
                {
                    "status": "unavailable",
                    "reason": f"upstream answered {response.status_code}",
                    **cluster,
                },
                status_code=503,
            )
        return JSONResponse({"status": "ok", **cluster})


def create_app(settings: Settings) -> IgnoreProxyApp:
    return IgnoreProxyApp(settings)
