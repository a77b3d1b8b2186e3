"""The command line is a contract others script against."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .servers import Upstream, free_port, run_proxy, serve_upstream

EXAMPLE = Path(__file__).parent.parent / "config" / "ignore-proxy.toml"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IGNORE_PROXY_")}
    return subprocess.run(
        [sys.executable, "-m", "ignore_proxy", *args],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        text=True,
        timeout=30,
        env={**clean, **(env or {})},
    )


def test_check_config_accepts_the_example() -> None:
    result = cli("check-config", "--config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr


def test_bad_value_stops_with_one_line_and_status_2() -> None:
    result = cli(
        "--upstream",
        "http://127.0.0.1:8008",
        "--listen",
        "localhost",
        env={"IGNORE_PROXY_IGNORE_ON_UNAVAILABLE": "shrug"},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "listen" in lines[0] or "ignore.on_unavailable" in lines[0]
    result = cli("check-config", env={"IGNORE_PROXY_IGNORE_ON_UNAVAILABLE": "shrug"})
    assert result.returncode == 2
    assert "ignore.on_unavailable" in result.stderr
    assert "IGNORE_PROXY_IGNORE_ON_UNAVAILABLE" in result.stderr


def test_healthcheck_follows_the_running_proxy() -> None:
    with serve_upstream(Upstream()) as upstream, run_proxy(upstream) as proxy:
        listen = proxy.url.removeprefix("http://")
        assert cli("healthcheck", "--listen", listen).returncode == 0
        assert httpx.get(proxy.url + "/_ignore_proxy/health/ready").status_code == 200
    assert cli("healthcheck", "--listen", listen).returncode == 1


def test_serve_is_the_default_command_and_listens_where_told() -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ignore_proxy",
            "serve",
            "--upstream",
            "http://127.0.0.1:1",
            "--listen",
            f"127.0.0.1:{port}",
        ],
    )
    try:
        for _ in range(200):
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/_ignore_proxy/health/live")
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert response.status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_entry_point_is_installed() -> None:
    result = subprocess.run(
        [Path(sys.executable).parent / "ignore-proxy", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "--upstream" in result.stdout and "--listen" in result.stdout


def test_push_rules_needs_a_user_and_a_token_never_on_the_command_line() -> None:
    result = cli("push-rules", "--remove")
    assert result.returncode == 2 and "--user" in result.stderr
    result = cli("push-rules", "--remove", "--user", "@alice:hs")  # empty standard input
    assert result.returncode == 2 and "IGNORE_PROXY_ACCESS_TOKEN" in result.stderr
    result = cli("push-rules", "--user", "@alice:hs", "--token", "secret")
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr


def test_push_rules_reports_an_unreachable_homeserver() -> None:
    result = cli(
        "push-rules", "--user", "@alice:hs", "--upstream", f"http://127.0.0.1:{free_port()}",
        env={"IGNORE_PROXY_ACCESS_TOKEN": "secret"},
    )  # fmt: skip
    assert result.returncode == 1 and "whoami" in result.stderr
    assert "secret" not in result.stdout + result.stderr
