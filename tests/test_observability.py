"""Metrics and logs of the proxy as operators run it: its real command line in a
subprocess, a homeserver on a real socket, real traffic, then `/metrics` scraped from the
separate listener and the proxy's stderr read line by line."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .fake_homeserver import ALICE, BOB, CHARLIE, ROOM, FakeHomeserver, asgi_app, message, state
from .servers import ProxyProcess, run_proxy, serve_upstream

TOKEN = "alice-token"  # a test token, and the secret the logs must never show
SECRET_BODY = "the-secret-message-body-4f2a"
SECRET_LIST_ENTRY = "@secretly-ignored:hs"
SYNC = "/_matrix/client/v3/sync"
EVENT = "/_matrix/client/v3/rooms/%21room%3Ahs/event/%24b1"
IGNORE_LIST = "/_matrix/client/v3/user/%40alice%3Ahs/account_data/m.ignored_user_list"


def homeserver() -> FakeHomeserver:
    hs = FakeHomeserver()
    hs.ignore(ALICE, BOB)
    hs.answers[("GET", "/sync")] = {
        "next_batch": "s2",
        "rooms": {
            "join": {
                ROOM: {
                    "timeline": {
                        "events": [
                            message("$a1", ALICE),
                            message("$b1", BOB, SECRET_BODY),
                            message("$b3", BOB, SECRET_BODY),
                            state("$b2", BOB),
                            message("$c1", CHARLIE, SECRET_BODY),
                        ],
                        "limited": False,
                        "prev_batch": "p1",
                    }
                }
            }
        },
    }
    hs.answers[("GET", f"/rooms/{ROOM}/event/$b1")] = message("$b1", BOB, SECRET_BODY)
    return hs


def scrape(proxy: ProxyProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(proxy.metrics_url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def send_traffic(proxy: ProxyProcess) -> list[str]:
    """Requests carrying the token both ways, a message body and an ignore-list write;
    returns the X-Request-IDs sent, one per request."""
    ids: list[str] = []
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=proxy.url, timeout=30) as client:

        def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
            request_id = f"req-{len(ids)}-{os.urandom(4).hex()}"
            ids.append(request_id)
            headers = {**kwargs.pop("headers", {}), "X-Request-ID": request_id}
            return client.request(method, path, headers=headers, **kwargs)

        synced = call("GET", SYNC, headers=bearer)
        assert synced.status_code == 200
        events = synced.json()["rooms"]["join"][ROOM]["timeline"]["events"]
        assert [event["event_id"] for event in events] == ["$a1", "$b2", "$c1"]
        assert call("GET", f"{SYNC}?access_token={TOKEN}").status_code == 200
        ignored = call("GET", EVENT, headers=bearer)
        assert ignored.status_code == 404 and ignored.json()["errcode"] == "M_SENDER_IGNORED"
        assert call("GET", f"{EVENT}?access_token={TOKEN}").status_code == 404
        written = call(
            "PUT",
            IGNORE_LIST,
            headers=bearer,
            json={"ignored_users": {BOB: {}, SECRET_LIST_ENTRY: {}}},
        )
        assert written.status_code == 200
        call("GET", "/_matrix/client/v3/capabilities", headers=bearer)  # passes through
        call(
            "GET", "/_matrix/client/v3/sync?timeout=0", headers={"authorization": f"Bearer {TOKEN}"}
        )
    return ids


@pytest.mark.slow
def test_metrics_listener_serves_the_series_after_real_traffic(tmp_path: Path) -> None:
    with (
        serve_upstream(asgi_app(homeserver(), long_poll_hold=1.0)) as upstream,
        run_proxy(
            upstream, log_path=tmp_path / "proxy.log", metrics=True, logging_level="warning"
        ) as proxy,
    ):
        sent = len(send_traffic(proxy))
        # A long-poll in flight shows in the gauge while it waits upstream.
        waiting = _start_long_poll(proxy)
        try:
            deadline = time.monotonic() + 5
            while value(scrape(proxy), "ignore_proxy_long_polls_in_flight") < 1:
                assert time.monotonic() < deadline, "the long-poll never showed"
                time.sleep(0.02)
        finally:
            waiting.join()
        # A request is counted just after its answer left: wait for the last one.
        deadline = time.monotonic() + 5
        while True:
            samples = scrape(proxy)
            counted = sum(v for (name, _), v in samples.items() if name.endswith("requests_total"))
            if counted == sent + 1 or time.monotonic() > deadline:
                break
            time.sleep(0.02)

        assert value(samples, "ignore_proxy_requests_total", route="sync", status="200") >= 4
        assert value(samples, "ignore_proxy_requests_total", route="event", status="404") == 2
        assert value(samples, "ignore_proxy_requests_total", route="ignore_list", status="200") == 1
        assert value(samples, "ignore_proxy_requests_total", route="passthrough", status="404") == 1
        assert value(samples, "ignore_proxy_upstream_latency_seconds_count", route="sync") >= 4
        assert value(samples, "ignore_proxy_upstream_latency_seconds_sum", route="sync") > 0
        assert value(samples, "ignore_proxy_rewrite_seconds_count", route="sync") >= 2
        assert value(samples, "ignore_proxy_rewrite_bytes_total", route="sync") > 0
        # Two of Bob's messages on each filtered sync; his state event stays.
        assert value(samples, "ignore_proxy_events_removed_total", route="sync") >= 4
        assert value(samples, "ignore_proxy_events_removed_total", route="event") == 2
        assert value(samples, "ignore_proxy_identity_cache_total", result="miss") >= 1
        assert value(samples, "ignore_proxy_identity_cache_total", result="hit") >= 1
        assert value(samples, "ignore_proxy_identity_cache_total", result="failure") == 0
        assert value(samples, "ignore_proxy_whoami_requests_total") >= 1
        assert value(samples, "ignore_proxy_ignore_list_reads_total", result="ok") >= 1
        assert value(samples, "ignore_proxy_ignore_list_reads_total", result="failure") == 0
        assert value(samples, "ignore_proxy_ignore_lists_cached") == 1
        assert value(samples, "ignore_proxy_identities_cached") >= 1
        assert value(samples, "ignore_proxy_long_polls_in_flight") == 0
        # Label values are route classes and statuses only: never a token, user or path.
        text = httpx.get(proxy.metrics_url + "/metrics").text
        for secret in (TOKEN, ALICE, "!room", "/_matrix"):
            assert secret not in text

        # The address nginx exposes serves no metrics: /metrics is just forwarded.
        forwarded = httpx.get(proxy.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert "# TYPE" not in forwarded.text and "ignore_proxy_" not in forwarded.text
        assert forwarded.json()["errcode"] == "M_UNRECOGNIZED"  # the homeserver's answer
        # And the metrics listener serves nothing else.
        assert httpx.get(proxy.metrics_url + "/_matrix/client/versions").status_code == 404
        assert httpx.post(proxy.metrics_url + "/metrics").status_code == 405
        assert proxy.stop() == 0, "SIGTERM stops both listeners cleanly"
    with pytest.raises(httpx.TransportError):
        httpx.get(proxy.metrics_url + "/metrics")


def _start_long_poll(proxy: ProxyProcess) -> threading.Thread:
    def poll() -> None:
        httpx.get(
            f"{proxy.url}{SYNC}?timeout=30000&since=s3",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    return thread


ACCESS_TEXT = re.compile(
    r" INFO ignore_proxy\.access: (?P<method>[A-Z]+) (?P<route>\w+) (?P<status>\d+) "
    r"(?P<ms>[\d.]+)ms id=(?P<id>\S+)$"
)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_logs_at_debug_carry_one_access_line_per_request_and_no_secret(
    tmp_path: Path, log_format: str
) -> None:
    log_path = tmp_path / "proxy.log"
    with (
        serve_upstream(asgi_app(homeserver())) as upstream,
        run_proxy(
            upstream,
            log_path=log_path,
            metrics=True,
            logging_level="debug",
            logging_format=log_format,
        ) as proxy,
    ):
        ids = send_traffic(proxy)
        assert proxy.stop() == 0
    lines = proxy.log_lines()
    assert lines, "debug logging wrote nothing"
    text = "\n".join(lines)
    for secret in (TOKEN, SECRET_BODY, SECRET_LIST_ENTRY, "access_token", "ignored_users"):
        assert secret not in text, f"{secret!r} reached the log"
    assert "authorization" not in text.lower()
    assert "bearer" not in text.lower()

    access: list[dict[str, Any]] = []
    if log_format == "json":
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        assert {"time", "level", "logger", "message"} <= set(records[0])
        assert any(r["logger"].startswith("uvicorn") for r in records)
        access = [r for r in records if r["logger"] == "ignore_proxy.access"]
        for record in access:
            assert record["level"] == "info"
            assert isinstance(record["duration_ms"], float) and record["duration_ms"] >= 0
    else:
        assert any(" uvicorn.error: " in line for line in lines)
        for line in lines:
            if "ignore_proxy.access" in line:
                found = ACCESS_TEXT.search(line)
                assert found, line
                access.append(
                    {
                        "method": found["method"],
                        "route": found["route"],
                        "status": int(found["status"]),
                        "request_id": found["id"],
                    }
                )
    # One line per request, under the X-Request-ID the client sent.
    assert [record["request_id"] for record in access] == ids
    assert [(r["method"], r["route"], int(r["status"])) for r in access] == [
        ("GET", "sync", 200),
        ("GET", "sync", 200),
        ("GET", "event", 404),
        ("GET", "event", 404),
        ("PUT", "ignore_list", 200),
        ("GET", "passthrough", 404),
        ("GET", "sync", 200),
    ]


def test_a_request_without_an_id_gets_a_fresh_one_and_a_bad_id_is_replaced(
    tmp_path: Path,
) -> None:
    log_path = tmp_path / "proxy.log"
    with (
        serve_upstream(asgi_app(homeserver())) as upstream,
        run_proxy(upstream, log_path=log_path, metrics=True, logging_format="json") as proxy,
    ):
        httpx.get(proxy.url + "/_matrix/client/versions")
        httpx.get(
            proxy.url + "/_matrix/client/versions",
            headers={"X-Request-ID": f"token={TOKEN} <script>"},
        )
        proxy.stop()
    access = [
        json.loads(line) for line in proxy.log_lines() if '"logger":"ignore_proxy.access"' in line
    ]
    assert len(access) == 2
    for record in access:
        assert re.fullmatch(r"[0-9a-f]{16}", record["request_id"])
    assert access[0]["request_id"] != access[1]["request_id"]
    assert TOKEN not in log_path.read_text()
