"""What the proxy says when the homeserver fails it, and at start: through the real
command line, read from its stderr."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme

from ignore_proxy.config import load_settings
from ignore_proxy.logs import _RateLimit, log_start

from .servers import Upstream, free_port, run_proxy, serve_upstream

TOKEN = "syt_never_in_a_log_line"
VERSIONS = "/_matrix/client/versions"


@contextlib.contextmanager
def raw_upstream(answer: bytes | None) -> Iterator[str]:
    """An upstream that reads a request head, then sends `answer` raw (None: nothing)."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            with contextlib.suppress(OSError):
                conn.recv(65536)
                if answer is not None:
                    conn.sendall(answer)
                    conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        for conn in held:
            conn.close()


@contextlib.contextmanager
def untrusted_tls_upstream(tmp_path: Path) -> Iterator[str]:
    authority = trustme.CA()
    cert = tmp_path / "cert.pem"
    authority.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(cert))
    with serve_upstream(Upstream(), ssl_certfile=str(cert)) as url:
        yield url


@contextlib.contextmanager
def failing_upstream(cause: str, tmp_path: Path) -> Iterator[str]:
    if cause == "refused":
        yield f"http://127.0.0.1:{free_port()}"
    elif cause == "dns":
        yield "http://no-such-homeserver.invalid:8008"
    elif cause == "tls":
        with untrusted_tls_upstream(tmp_path) as url:
            yield url
    elif cause == "timeout":
        with raw_upstream(None) as url:
            yield url
    else:
        with raw_upstream(b"NOT HTTP AT ALL\r\n\r\n") as url:
            yield url


def warnings_of(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ignore_proxy.upstream: " in line]


@pytest.mark.parametrize(
    ("cause", "detail"),
    [
        ("refused", r"127\.0\.0\.1:\d+ refused the connection"),
        ("dns", r"cannot resolve no-such-homeserver\.invalid:8008: "),
        ("tls", r"TLS certificate of localhost:\d+ not accepted: unable to get local issuer"),
        ("timeout", r"the homeserver did not answer in time"),
        ("bad answer", r"malformed answer"),
    ],
)
def test_each_upstream_failure_is_one_warning_naming_its_cause(
    cause: str, detail: str, tmp_path: Path
) -> None:
    log_path = tmp_path / "proxy.log"
    with (
        failing_upstream(cause, tmp_path) as upstream,
        run_proxy(upstream, log_path=log_path, timeouts_read="0.5", timeouts_connect="2") as proxy,
    ):
        for attempt in range(3):
            response = httpx.get(
                f"{proxy.url}{VERSIONS}?access_token={TOKEN}",
                headers={"X-Request-ID": f"req-{attempt}", "Authorization": f"Bearer {TOKEN}"},
                timeout=10,
            )
            assert response.status_code in (502, 504)
            assert response.json()["errcode"] == "M_UNKNOWN"
        proxy.stop()
    log = log_path.read_text()
    (warning,) = warnings_of(log)  # three failures, one line: the rest wait for the next
    assert re.search(rf"WARNING ignore_proxy\.upstream: upstream {cause}: {detail}", warning)
    assert warning.endswith("; route versions id=req-0"), warning
    # The access line of that request carries the same id.
    assert re.search(r"GET versions 50[24] [\d.]+ms id=req-0$", log, re.M), log
    assert TOKEN not in log and "/_matrix" not in log


def test_the_warning_limit_counts_what_it_left_out() -> None:
    limit = _RateLimit(0.2)
    assert limit.admit("refused") == 0
    assert limit.admit("refused") is None
    assert limit.admit("refused") is None
    assert limit.admit("dns") == 0  # each cause has its own
    time.sleep(0.25)
    assert limit.admit("refused") == 2


def test_the_start_line_names_what_is_served_without_secrets(tmp_path: Path) -> None:
    log_path = tmp_path / "proxy.log"
    with serve_upstream(Upstream()) as upstream:
        with_password = upstream.replace("http://", "http://operator:hunter2@")
        with run_proxy(
            with_password, log_path=log_path, metrics=True, ignore_reject_invites="yes"
        ) as proxy:
            proxy.stop()
    (line,) = [line for line in log_path.read_text().splitlines() if "ignore_proxy.start" in line]
    assert f"upstream {upstream}, listen {proxy.url.removeprefix('http://')}, workers 1" in line
    assert f"metrics {proxy.metrics_url.removeprefix('http://')}" in line
    assert "ignore.reject_invites=true" in line and "timeouts.read=60.0" in line
    assert "hunter2" not in line and "operator" not in line


def test_an_answer_cut_off_while_relayed_is_one_warning_too(tmp_path: Path) -> None:
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10
    log_path = tmp_path / "proxy.log"
    with raw_upstream(cut) as upstream, run_proxy(upstream, log_path=log_path) as proxy:
        for _ in range(2):
            with pytest.raises(httpx.TransportError):  # cut off for the client too
                httpx.get(proxy.url + "/_matrix/client/v3/pushrules/", timeout=10)
        proxy.stop()
    (warning,) = warnings_of(log_path.read_text())
    assert "upstream bad answer: the answer was cut off: " in warning, warning
    assert warning.endswith("; route relayed id=-"), warning


def test_the_start_line_holds_no_redis_password(caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings(
        environ={
            "IGNORE_PROXY_CLUSTER_REDIS_URL": "redis://ops:hunter2@redis.example:6379/0"
            "?password=hunter3"
        }
    )
    with caplog.at_level(logging.INFO, logger="ignore_proxy.start"):
        log_start(settings)
    (record,) = caplog.records
    line = record.getMessage()
    assert "cluster.redis_url=redis://redis.example:6379/0 " in line, line
    fields = repr(record.__dict__["fields"])
    for secret in ("hunter2", "hunter3", "ops"):
        assert secret not in line and secret not in fields
