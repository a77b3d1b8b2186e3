"""Run Debian's redis-server on 127.0.0.1, without persistence, stoppable and restartable
on the same port (the proxies keep its URL)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import redis

from .procs import ManagedProcess, free_port


def redis_binary() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if found is None:
        raise RuntimeError(
            "redis-server is not installed: the cluster tests need it "
            "(Debian/Ubuntu: `apt-get install -y redis-server`; CI does this in .ci/run)"
        )
    return found


class RedisServer:
    """One redis-server; `stop()` and `start()` again keep its port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: ManagedProcess | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        argv = [
            redis_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
        ]  # fmt: skip
        self.process = ManagedProcess("redis-server", argv, self.workdir / "redis.log")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.proc.poll() is not None:
                raise RuntimeError(self.process.failure("exited"))
            if self.ping():
                return
            time.sleep(0.05)
        raise RuntimeError(self.process.failure("not answering PING"))

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def ping(self) -> bool:
        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.RedisError:
            return False
