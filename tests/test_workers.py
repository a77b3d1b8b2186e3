"""`workers` > 1: several processes on one address, through the real command line.

Connections are spread over the workers by the kernel (SO_REUSEPORT), so each request
below goes on a new connection: with two workers, twenty of them reach both.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from ignore_proxy.workers import Siblings

from .fake_homeserver import ALICE, BOB, CHARLIE, asgi_app
from .servers import free_port, run_proxy, serve_upstream
from .test_observability import (
    IGNORE_LIST,
    SYNC,
    TOKEN,
    homeserver,
    scrape,
)

AUTH = {"Authorization": f"Bearer {TOKEN}"}
BOBS_MESSAGE = '"$b1"'  # a message of bob's in the homeserver's sync
FRESH_CONNECTIONS = 20


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.extend(int(child) for child in (task / "children").read_text().split())
    return found


def sync_on_a_new_connection(url: str) -> str:
    with httpx.Client() as client:  # a client per request: a new connection each time
        response = client.get(url + SYNC, headers=AUTH)
        assert response.status_code == 200
        return response.text


@pytest.mark.slow
def test_two_workers_serve_and_stop_together(tmp_path: Path) -> None:
    with (
        serve_upstream(asgi_app(homeserver())) as upstream,
        run_proxy(
            upstream,
            log_path=tmp_path / "proxy.log",
            metrics=True,
            workers="2",
            logging_level="info",
        ) as proxy,
    ):
        workers = children(proxy.process.pid)
        assert len(workers) == 2
        bodies = [sync_on_a_new_connection(proxy.url) for _ in range(FRESH_CONNECTIONS)]
        assert all(BOBS_MESSAGE not in body for body in bodies)
        served = scrape(proxy)
        key = ("ignore_proxy_requests_total", (("route", "sync"), ("status", "200")))
        assert served[key] == FRESH_CONNECTIONS  # the parent sums the workers' metrics
        time.sleep(5.5)  # the cache series are copied into the shared store every 5 s
        lists = scrape(proxy)[("ignore_proxy_ignore_lists_cached", ())]
        assert lists == 2  # alice's list, once in each worker
        assert proxy.stop() == 0
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists() or _zombie(pid)


def _zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_a_list_changed_through_one_worker_holds_in_all_at_once(tmp_path: Path) -> None:
    hs = homeserver()
    hs.ignore(ALICE)  # nobody ignored yet: bob's messages show
    with (
        serve_upstream(asgi_app(hs)) as upstream,
        run_proxy(upstream, log_path=tmp_path / "proxy.log", metrics=True, workers="2") as proxy,
    ):
        # Every worker learns the list (nobody ignored) and keeps it for `list_ttl`.
        before = [sync_on_a_new_connection(proxy.url) for _ in range(FRESH_CONNECTIONS)]
        assert all(BOBS_MESSAGE in body for body in before)
        assert hs.calls["account_data"] == 2  # one read per worker: both were reached
        with httpx.Client() as client:
            answer = client.put(
                proxy.url + IGNORE_LIST,
                headers=AUTH,
                content=json.dumps({"ignored_users": {BOB: {}, CHARLIE: {}}}),
            )
            assert answer.status_code == 200
        after = [sync_on_a_new_connection(proxy.url) for _ in range(FRESH_CONNECTIONS)]
        assert all(BOBS_MESSAGE not in body for body in after)
        # The worker that took the PUT knew the new list; the other forgot its own and
        # read the list again.
        assert hs.calls["account_data"] == 3


def test_a_worker_that_dies_stops_the_others_and_the_parent_exits_1(tmp_path: Path) -> None:
    with (
        serve_upstream(asgi_app(homeserver())) as upstream,
        run_proxy(upstream, log_path=tmp_path / "proxy.log", metrics=True, workers="2") as proxy,
    ):
        first, second = children(proxy.process.pid)
        os.kill(first, signal.SIGKILL)
        assert proxy.process.wait(timeout=15) == 1
        deadline = time.monotonic() + 5
        while Path(f"/proc/{second}").exists() and not _zombie(second):
            assert time.monotonic() < deadline, "the other worker kept serving"
            time.sleep(0.05)
        assert "ended" in (tmp_path / "proxy.log").read_text()


def test_workers_do_not_outlive_a_killed_parent(tmp_path: Path) -> None:
    with (
        serve_upstream(asgi_app(homeserver())) as upstream,
        run_proxy(upstream, log_path=tmp_path / "proxy.log", metrics=True, workers="2") as proxy,
    ):
        # Ready is one worker answering; the other may still be starting on a busy machine.
        deadline = time.monotonic() + 10
        while len(workers := children(proxy.process.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(workers) == 2, "the proxy did not start two workers"
        assert not any(_zombie(pid) for pid in workers)
        proxy.process.kill()  # SIGKILL: no chance to stop them
        proxy.process.wait()
        deadline = time.monotonic() + 5
        for pid in workers:
            while Path(f"/proc/{pid}").exists() and not _zombie(pid):
                assert time.monotonic() < deadline, "a worker kept serving without its parent"
                time.sleep(0.05)


def test_workers_killed_parent_while_they_start_do_not_serve_alone() -> None:
    """The parent killed right after it forked, before the workers serve: they must not
    take the reaper for their parent and serve on alone."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IGNORE_PROXY_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "ignore_proxy", "--upstream", "http://127.0.0.1:1",
         "--listen", f"127.0.0.1:{free_port()}", "--workers", "2"],
        env={**clean, "IGNORE_PROXY_LOGGING_LEVEL": "error"},
    )  # fmt: skip
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 20
        while len(workers := children(process.pid)) < 2:
            assert process.poll() is None and time.monotonic() < deadline, "no two workers"
            time.sleep(0.002)
        process.kill()
        process.wait()
        deadline = time.monotonic() + 5
        for pid in workers:
            while Path(f"/proc/{pid}").exists() and not _zombie(pid):
                assert time.monotonic() < deadline, "a worker serves on without its parent"
                time.sleep(0.05)
    finally:
        process.kill()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_burst_of_changes_reaches_a_busy_sibling_whole() -> None:
    """The kernel holds a few hundred datagrams for a sibling that is not reading (its
    loop busy for a moment): a longer burst of list changes waits for it instead of
    losing some."""
    outbox, inbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    own_inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    count = 2000
    received: list[bytes] = []

    def busy_sibling() -> None:
        time.sleep(0.3)
        while len(received) < count:
            received.append(inbox.recv(4096))

    with outbox, inbox, own_inbox:
        reader = threading.Thread(target=busy_sibling, daemon=True)
        reader.start()
        siblings = Siblings(own_inbox, [outbox], os.getpid())
        for i in range(count):
            siblings.changed(f"@user{i}:hs")
        reader.join(timeout=10)
    assert received == [f"@user{i}:hs".encode() for i in range(count)]
