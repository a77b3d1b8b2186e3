"""Prometheus metrics. Served on their own listener (config `metrics.listen`), never on
the address nginx exposes. Label values are route classes and status codes only: never a
user, a token or a path."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import Receive, Scope, Send

from .identity import IdentityResolver
from .ignore_lists import IgnoreListStore

if TYPE_CHECKING:
    from .cluster import ClusterChannel

# Set (by `workers.py`) when several worker processes share one metrics store.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
PASSTHROUGH = "passthrough"  # the route class of everything not in the route table

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_REWRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ignore_proxy_requests", "Requests answered, by route class and status",
            ["route", "status"], registry=r,
        )  # fmt: skip
        self.upstream_latency = Histogram(
            "ignore_proxy_upstream_latency_seconds",
            "Time until the homeserver's answer headers arrived, by route class",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.rewrite_seconds = Histogram(
            "ignore_proxy_rewrite_seconds", "Time spent rewriting answers, by route class",
            ["route"], buckets=_REWRITE_BUCKETS, registry=r,
        )  # fmt: skip
        self.rewrite_bytes = Counter(
            "ignore_proxy_rewrite_bytes", "Bytes of answers rewritten, by route class",
            ["route"], registry=r,
        )  # fmt: skip
        self.events_removed = Counter(
            "ignore_proxy_events_removed",
            "Events (and invites, receipts, thread summaries) removed, by route class",
            ["route"], registry=r,
        )  # fmt: skip
        self.list_unavailable = Counter(
            "ignore_proxy_ignore_list_unavailable",
            "Requests whose user's ignore list could not be learned (answered 503 or passed)",
            registry=r,
        )
        self.long_polls = Gauge(
            "ignore_proxy_long_polls_in_flight", "Requests with ?timeout= waiting upstream",
            registry=r, multiprocess_mode="livesum",  # workers: the sum over live ones
        )  # fmt: skip
        # Children by label, looked up without prometheus_client's checks on every request.
        self._requests: dict[tuple[str, int | str], Counter] = {}
        self._latency: dict[str, Histogram] = {}
        self._mirror: _CacheMirror | None = None

    def count_request(self, route: str, status: int | str) -> None:
        child = self._requests.get((route, status))
        if child is None:
            child = self._requests[route, status] = self.requests.labels(route, str(status))
        child.inc()

    def observe_upstream(self, route: str, seconds: float) -> None:
        child = self._latency.get(route)
        if child is None:
            child = self._latency[route] = self.upstream_latency.labels(route)
        child.observe(seconds)

    def watch_caches(
        self,
        identity: IdentityResolver,
        ignore_lists: IgnoreListStore,
        cluster: ClusterChannel | None = None,
    ) -> None:
        collector = _CacheCollector(identity, ignore_lists, cluster)
        if os.environ.get(MULTIPROCESS_ENV):
            self._mirror = _CacheMirror(collector, self.registry)
        else:
            self.registry.register(collector)

    def start_mirroring(self, every: float = 5.0) -> None:
        """Workers: copy the caches' counters into the shared store now and then."""
        mirror = self._mirror
        if mirror is None:
            return
        loop = asyncio.get_running_loop()

        def tick() -> None:
            mirror.copy()
            loop.call_later(every, tick)

        tick()


class _CacheCollector(Collector):
    """Reads the caches' own counters at scrape time: nothing on the request path."""

    def __init__(
        self,
        identity: IdentityResolver,
        ignore_lists: IgnoreListStore,
        cluster: ClusterChannel | None = None,
    ) -> None:
        self.identity = identity
        self.ignore_lists = ignore_lists
        self.cluster = cluster

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        identity = CounterMetricFamily(
            "ignore_proxy_identity_cache", "Token lookups by result", labels=["result"]
        )
        identity.add_metric(["hit"], self.identity.hits)
        identity.add_metric(["miss"], self.identity.misses)
        identity.add_metric(["failure"], self.identity.failures)
        yield identity
        yield CounterMetricFamily(
            "ignore_proxy_whoami_requests", "whoami requests sent upstream",
            value=self.identity.lookups,
        )  # fmt: skip
        cache = CounterMetricFamily(
            "ignore_proxy_ignore_list_cache", "Ignore-list lookups by result", labels=["result"]
        )
        cache.add_metric(["hit"], self.ignore_lists.hits)
        cache.add_metric(["miss"], self.ignore_lists.misses)
        cache.add_metric(["failure"], self.ignore_lists.failures)
        yield cache
        lists = CounterMetricFamily(
            "ignore_proxy_ignore_list_reads", "Ignore-list reads from the homeserver by result",
            labels=["result"],
        )  # fmt: skip
        lists.add_metric(["ok"], self.ignore_lists.loads - self.ignore_lists.failures)
        lists.add_metric(["failure"], self.ignore_lists.failures)
        yield lists
        yield GaugeMetricFamily(
            "ignore_proxy_ignore_lists_cached", "Users whose ignore list is in memory",
            value=len(self.ignore_lists),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "ignore_proxy_identities_cached", "Tokens whose user is in memory",
            value=len(self.identity),
        )  # fmt: skip
        if self.cluster is not None:
            yield from _cluster_metrics(self.cluster)


def _cluster_metrics(cluster: ClusterChannel) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    yield GaugeMetricFamily(
        "ignore_proxy_cluster_redis_up",
        "1 while list changes are heard and told through Redis; 0 while lists live "
        "cluster.fallback_list_ttl (workers: the sum)",
        value=1 if cluster.up else 0,
    )
    published = CounterMetricFamily(
        "ignore_proxy_cluster_publishes", "List changes told through Redis, by result",
        labels=["result"],
    )  # fmt: skip
    published.add_metric(["ok"], cluster.published)
    published.add_metric(["failed"], cluster.publish_failures)
    published.add_metric(["late"], cluster.publishes_late)
    yield published
    yield CounterMetricFamily(
        "ignore_proxy_cluster_changes_heard", "List changes heard through Redis",
        value=cluster.heard,
    )  # fmt: skip
    yield CounterMetricFamily(
        "ignore_proxy_cluster_subscriptions",
        "Times Redis was subscribed to (every list held is forgotten then)",
        value=cluster.resubscriptions,
    )


class _CacheMirror:
    """prometheus_client's multiprocess mode (several workers) reads only its own metrics,
    never a collector of another process: the cache counters are copied into such
    metrics instead, a few seconds behind."""

    def __init__(self, source: _CacheCollector, registry: CollectorRegistry) -> None:
        self.source = source
        self.registry = registry
        self.metrics: dict[str, Counter | Gauge] = {}
        self.copied: dict[tuple[str, tuple[str, ...]], float] = {}

    def copy(self) -> None:
        for family in self.source.collect():
            for sample in family.samples:
                names = tuple(sample.labels)
                metric = self.metrics.get(family.name)
                if metric is None:
                    metric = self.metrics[family.name] = (
                        Counter(family.name, family.documentation, names, registry=self.registry)
                        if family.type == "counter"
                        else Gauge(family.name, family.documentation, names,
                                   registry=self.registry, multiprocess_mode="livesum")
                    )  # fmt: skip
                child = metric.labels(*sample.labels.values()) if names else metric
                if isinstance(child, Gauge):
                    child.set(sample.value)
                    continue
                key = (family.name, tuple(sample.labels.values()))
                delta = sample.value - self.copied.get(key, 0.0)
                self.copied[key] = sample.value
                if delta > 0:
                    child.inc(delta)


class MetricsEndpoint:
    """The ASGI app of the metrics listener: `GET /metrics` in Prometheus' text format,
    404 for anything else. It is served on its own address, never by the proxy's app."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] != "/metrics":
            status, content_type, body = 404, b"text/plain; charset=utf-8", b"Not Found\n"
        elif scope["method"] not in ("GET", "HEAD"):
            status, content_type, body = 405, b"text/plain; charset=utf-8", b"Method Not Allowed\n"
        else:
            status, content_type = 200, CONTENT_TYPE_LATEST.encode()
            body = generate_latest(self.registry)
        headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )
