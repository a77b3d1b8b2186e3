"""Subprocess management: every child gets its own process group and is always reaped."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

_LIVE: dict[int, subprocess.Popen[bytes]] = {}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ManagedProcess:
    """A child process in its own session whose output goes to a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        _LIVE[self.proc.pid] = self.proc

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no log>"

    def failure(self, what: str) -> str:
        return (
            f"{self.name}: {what}\n  argv: {' '.join(self.argv)}\n"
            f"  log {self.log_path}:\n{self.log_tail()}"
        )

    def wait_http(
        self,
        url: str,
        timeout: float,
        ok: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200,
    ) -> None:
        """Poll ``url`` until ``ok``; fail with the process log if it dies or times out."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(self.failure(f"exited with {self.proc.returncode}"))
                try:
                    resp = client.get(url)
                    if ok(resp):
                        return
                    last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                except httpx.HTTPError as exc:
                    last = repr(exc)
                time.sleep(0.1)
        raise RuntimeError(self.failure(f"not ready after {timeout}s at {url} ({last})"))

    def stop(self, grace: float = 10.0) -> None:
        _terminate(self.proc, grace)
        _LIVE.pop(self.proc.pid, None)
        self._log.close()


def _terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    # Kill leftovers of the group (and the leader if SIGTERM was not enough).
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


@atexit.register
def _reap_all() -> None:  # pragma: no cover - safety net for aborted sessions
    for proc in list(_LIVE.values()):
        _terminate(proc, 2.0)
    _LIVE.clear()
