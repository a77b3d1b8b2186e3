"""Starting: the metrics directories a killed `--workers` parent leaves behind are removed
by the next start, and only those."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from ignore_proxy import startup

from .servers import Upstream, free_port, serve_upstream


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_only_directories_of_dead_parents_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone, alive = dead_pid(), os.getpid()
    stale = tmp_path / f"ignore-proxy-metrics-{gone}-abc"
    running = tmp_path / f"ignore-proxy-metrics-{alive}-def"
    legacy_stale = tmp_path / "ignore-proxy-metrics-x1y2"  # named by an earlier version
    legacy_running = tmp_path / "ignore-proxy-metrics-z3w4"
    legacy_new = tmp_path / "ignore-proxy-metrics-v5u6"
    other = tmp_path / "something-else"
    for path in (stale, running, legacy_stale, legacy_running, legacy_new, other):
        path.mkdir()
    (legacy_stale / f"counter_{gone}.db").write_bytes(b"")
    (legacy_running / f"counter_{alive}.db").write_bytes(b"")
    an_hour_ago = time.time() - 3600
    for path in (legacy_stale, legacy_running):
        os.utime(path, (an_hour_ago, an_hour_ago))

    removed = startup.remove_stale_metrics_dirs()

    assert sorted(removed) == sorted([str(stale), str(legacy_stale)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (running, legacy_running, legacy_new, other)
    )


@pytest.mark.slow
def test_a_killed_parent_s_directory_goes_at_the_next_start(tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IGNORE_PROXY_")}

    def start(upstream: str) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        env = {
            **clean,
            "TMPDIR": str(tmp_path),
            "IGNORE_PROXY_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
            "IGNORE_PROXY_LOGGING_LEVEL": "warning",
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "ignore_proxy", "--upstream", upstream,
             "--listen", f"127.0.0.1:{port}", "--workers", "2"],
            env=env,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}/_ignore_proxy/health/live"
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None and time.monotonic() < deadline
            try:
                if httpx.get(url).status_code == 200:
                    return process, url
            except httpx.TransportError:
                time.sleep(0.05)

    def metrics_dirs() -> list[str]:
        return sorted(p.name for p in tmp_path.glob("ignore-proxy-metrics-*"))

    with serve_upstream(Upstream()) as upstream:
        first, _ = start(upstream)
        (left,) = metrics_dirs()
        assert left.startswith(f"ignore-proxy-metrics-{first.pid}-")
        first.send_signal(signal.SIGKILL)  # no chance to clean up
        first.wait()
        assert metrics_dirs() == [left]
        second, _ = start(upstream)
        try:
            (own,) = metrics_dirs()
            assert own.startswith(f"ignore-proxy-metrics-{second.pid}-")
        finally:
            second.terminate()
            assert second.wait(timeout=15) == 0
        assert metrics_dirs() == []


def test_a_note_of_a_server_that_is_gone_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    note = startup.note_listen("127.0.0.1:8010", "127.0.0.1:9000")
    assert note is not None
    assert startup.noted_listen("127.0.0.1:8010") == "127.0.0.1:9000"
    assert startup.noted_listen("127.0.0.1:8011") is None  # another configuration's
    note.write_text(f"127.0.0.1:9000 {dead_pid()}\n")  # killed before it could remove it
    assert startup.noted_listen("127.0.0.1:8010") is None
    startup.forget_listen(note, "127.0.0.1:9000")
    assert note.exists(), "not this server's note: left alone"
    assert startup.note_listen("127.0.0.1:8010", "127.0.0.1:8010") is None  # not moved
