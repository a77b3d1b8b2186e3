"""Run ignore-proxy through its real CLI."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .procs import ManagedProcess, free_port


@dataclass
class ProxyServer:
    url: str
    upstream: str
    process: ManagedProcess

    def stop(self) -> None:
        self.process.stop()


def start_proxy(
    workdir: Path, upstream: str, extra_env: dict[str, str] | None = None
) -> ProxyServer:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IGNORE_PROXY_")}
    env.update(extra_env or {})
    argv = [
        sys.executable,
        "-m",
        "ignore_proxy",
        "--upstream",
        upstream,
        "--listen",
        f"127.0.0.1:{port}",
        # Several workers by default: a client's requests then reach different processes
        # (each on a new connection), which must agree on every user's ignore list.
        "--workers",
        os.environ.get("E2E_PROXY_WORKERS", "2"),
    ]
    proc = ManagedProcess("ignore-proxy", argv, workdir / "proxy.log", env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(f"{url}/_ignore_proxy/health/live", 30.0)
    except BaseException:
        proc.stop()
        raise
    return ProxyServer(url, upstream, proc)
