"""The command line is a contract others script against."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

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


@contextlib.contextmanager
def taken_port() -> Iterator[int]:
    """A port another program listens on."""
    with socket.create_server(("127.0.0.1", 0)) as holder:
        yield holder.getsockname()[1]


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("which", ["listen", "metrics.listen"])
def test_a_taken_port_is_one_line_and_status_3(workers: str, which: str) -> None:
    with taken_port() as port:
        taken, free = f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"
        listen, metrics = (taken, free) if which == "listen" else (free, taken)
        result = cli(
            "--upstream", "http://127.0.0.1:8008", "--listen", listen, "--workers", workers,
            env={"IGNORE_PROXY_METRICS_LISTEN": metrics},
        )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert result.stderr.splitlines() == [
        f"ignore-proxy: cannot listen on {taken} ({which}): Address already in use"
    ]


def test_check_config_refuses_a_misspelled_variable() -> None:
    result = cli("check-config", env={"IGNORE_PROXY_IGNORE_REJECT_INVITE": "true"})
    assert result.returncode == 2
    assert result.stderr == (
        "ignore-proxy: unknown environment variable IGNORE_PROXY_IGNORE_REJECT_INVITE; "
        "did you mean IGNORE_PROXY_IGNORE_REJECT_INVITES?\n"
    )


def test_check_config_refuses_metrics_on_the_proxy_port() -> None:
    result = cli("check-config", env={"IGNORE_PROXY_METRICS_LISTEN": "0.0.0.0:8010"})
    assert result.returncode == 2
    assert "metrics.listen (IGNORE_PROXY_METRICS_LISTEN)" in result.stderr


def test_healthcheck_ignores_proxy_variables_and_exits_1_on_a_bad_config() -> None:
    with serve_upstream(Upstream()) as upstream, run_proxy(upstream) as proxy:
        listen = proxy.url.removeprefix("http://")
        nowhere = "http://127.0.0.1:1"
        proxies = {"http_proxy": nowhere, "HTTP_PROXY": nowhere, "all_proxy": nowhere}
        assert cli("healthcheck", "--listen", listen, env=proxies).returncode == 0
        # Docker reserves 2; a healthcheck that cannot read its configuration says unhealthy.
        bad = cli("healthcheck", "--listen", listen, env={"IGNORE_PROXY_WORKERS": "none"})
        assert bad.returncode == 1
        assert "IGNORE_PROXY_WORKERS" in bad.stderr


def test_healthcheck_finds_a_server_its_flag_moved(tmp_path: Path) -> None:
    """The image's HEALTHCHECK sees the container's environment, not `serve --listen`."""
    configured, moved = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {"IGNORE_PROXY_LISTEN": configured, "TMPDIR": str(tmp_path)}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IGNORE_PROXY_")}
    with serve_upstream(Upstream()) as upstream:
        process = subprocess.Popen(
            [sys.executable, "-m", "ignore_proxy", "serve", "--upstream", upstream,
             "--listen", moved],
            env={**clean, **env},
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while (result := cli("healthcheck", env=env)).returncode != 0:
                assert process.poll() is None and time.monotonic() < deadline, result.stderr
                time.sleep(0.1)
            # The flag still wins over the note.
            assert cli("healthcheck", "--listen", configured, env=env).returncode == 1
        finally:
            process.terminate()
            assert process.wait(timeout=10) == 0
    assert cli("healthcheck", env=env).returncode == 1  # the note went with the server
    assert not list(tmp_path.iterdir())


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
