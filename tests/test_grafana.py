"""The shipped Grafana dashboard queries only what the proxy serves: every series, label
and route class in its queries is checked against the `/metrics` output of the proxy
(through its real command line) after filtered traffic."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ignore_proxy.routes import ROUTES

from .fake_homeserver import asgi_app
from .servers import run_proxy, serve_upstream
from .test_observability import SYNC, TOKEN, homeserver

DASHBOARD = Path(__file__).parent.parent / "config" / "grafana" / "ignore-proxy.json"
# PromQL words and Grafana's variables: not series or labels.
_NOT_LABELS = {"le", "job"}


def queries() -> list[str]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    found = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert found, "no queries"
    return found


def served_series() -> dict[str, set[str]]:
    """Each sample name the proxy serves, with its label names."""
    with (
        serve_upstream(asgi_app(homeserver())) as upstream,
        run_proxy(upstream, metrics=True) as proxy,
    ):
        for _ in range(2):  # the second finds the caches warm
            answer = httpx.get(proxy.url + SYNC, headers={"Authorization": f"Bearer {TOKEN}"})
            assert answer.status_code == 200
        text = httpx.get(proxy.metrics_url + "/metrics").text
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def test_every_query_asks_for_what_the_proxy_serves() -> None:
    series = served_series()
    route_classes = {route.name for route in ROUTES} | {"passthrough"}
    for expr in queries():
        names = set(re.findall(r"\b(ignore_proxy_[a-z_]+)\b", expr))
        assert names, expr
        for name in names:
            assert name in series, f"{name} is not served ({expr})"
        labels = set(re.findall(r"\b([a-z_]+)\s*(?:=~|!~|!=|=)\s*\"", expr))
        for group in re.findall(r"by \(([^)]*)\)", expr):
            labels.update(label.strip() for label in group.split(","))
        served_labels = set().union(*(series[name] for name in names))
        assert labels - _NOT_LABELS <= served_labels, (expr, served_labels)
        for pattern in re.findall(r'route\s*(?:=~|!~)\s*"([^"]*)"', expr):
            assert set(pattern.split("|")) <= route_classes, pattern


def test_the_dashboard_shows_what_operators_look_at() -> None:
    text = " ".join(queries())
    for needed in (
        "ignore_proxy_requests_total",
        "ignore_proxy_upstream_latency_seconds_bucket",
        "ignore_proxy_rewrite_seconds_bucket",
        "ignore_proxy_events_removed_total",
        "ignore_proxy_identity_cache_total",
        "ignore_proxy_ignore_list_cache_total",
        "ignore_proxy_long_polls_in_flight",
    ):
        assert needed in text, needed
