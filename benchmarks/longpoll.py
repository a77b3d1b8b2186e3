"""Thousands of idle clients: concurrent `/sync?timeout=20000` long-polls through a fresh
proxy with its default settings and one worker, against an upstream that holds each sync
for its timeout (as a homeserver with nothing new does), from a client that opens them
all at once and times every answer.

    python -m benchmarks.longpoll                  # 5,000 (the target), then 10,000
    python -m benchmarks.longpoll --clients 2000   # any counts
    python -m benchmarks.longpoll --compare        # then through two reference relays
    python -m benchmarks.longpoll serve PORT       # the upstream alone

The proxy starts with a soft descriptor limit of 1,024 (what most systems start a process
with), which it must raise by itself, and a hard limit of 17/8 per client (its own, its
upstream one, the lookups' share) plus a reserve.
Where the benchmark may not raise the hard limit that far (that needs CAP_SYS_RESOURCE),
the proxy gets the benchmark's own, and the row says which.

The upstream stamps each answer with when the request reached it and when it answered
(the machine's monotonic clock, which the client reads too), so each row also splits the
time into the way there (the proxy's work on the arriving burst) and the way back. With
`--compare`, the target's 5,000 long-polls then go through two reference relays that judge nothing
(benchmarks/relays.py): the proxy's own server and pool alone, and a bare uvloop relay.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from . import bodies, relays
from .servers import PeakPss, Proc, cpu_seconds, free_port, peak_rss_mib, start_proxy, wait_port

T = TypeVar("T")

HOLD = 20.0
TARGET_COUNT = 5000
TARGET_SLOWEST_S = 20.5
TARGET_PSS_MIB = 150.0
_SOFT_START = 1024  # the soft limit the proxy starts with, and must raise itself
_RESERVE = 200  # beyond the clients': the proxy's own (descriptors.RESERVED)
_STAMP = b"x-benchmark-upstream"  # the upstream's header: arrived, answered


def _answer(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip


class _Upstream(asyncio.Protocol):
    whoami = _answer(bodies._dumps(bodies.WHOAMI))
    ignored = _answer(bodies._dumps(bodies.IGNORE_LIST))
    sync = _answer(bodies.empty_sync())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            target = head.split(b" ", 2)[1]
            if b"/whoami" in target:
                self.transport.write(self.whoami)  # type: ignore[attr-defined]
            elif b"m.ignored_user_list" in target:
                self.transport.write(self.ignored)  # type: ignore[attr-defined]
            else:
                hold = HOLD if b"timeout=" in target else 0.0
                asyncio.get_running_loop().call_later(hold, self._send_sync, time.monotonic())

    def _send_sync(self, received: float) -> None:
        # When this request arrived and when it is answered, on the machine's monotonic
        # clock (the client's too): the client tells the way there from the way back.
        stamp = b"%s: %.6f %.6f\r\n" % (_STAMP, received, time.monotonic())
        if not self.transport.is_closing():
            self.transport.write(self.sync.replace(b"\r\n", b"\r\n" + stamp, 1))  # type: ignore[attr-defined]


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Upstream, "127.0.0.1", port, backlog=65535)
    async with server:
        await server.serve_forever()


async def _one(port: int, request: bytes, results: list[float], failures: list[str],
               filtered: bool, legs: list[tuple[float, float]]) -> None:  # fmt: skip
    try:
        async with asyncio.timeout(HOLD + 60):  # a front that drops a request fails it
            await _exchange(port, request, results, failures, filtered, legs)
    except Exception as exc:
        failures.append(type(exc).__name__)


async def _exchange(port: int, request: bytes, results: list[float], failures: list[str],
                    filtered: bool, legs: list[tuple[float, float]]) -> None:  # fmt: skip
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    # From the moment the request is sent: what the client sees as its long-poll.
    # (Opening thousands of connections at once costs this client's own loop time too.)
    started = time.monotonic()
    head = await reader.readuntil(b"\r\n\r\n")
    status = head.split(b" ", 2)[1]
    length = 0
    stamp: list[float] = []
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
        elif name.lower() == _STAMP:
            stamp = [float(part) for part in value.split()]
    body = await reader.readexactly(length)
    ended = time.monotonic()
    writer.close()
    if status != b"200":
        failures.append(status.decode())
    elif filtered and bodies.IGNORED.encode() in body:
        failures.append("unfiltered")
    else:
        results.append(ended - started)
        if len(stamp) == 2:  # until the upstream had it; from its answer on
            legs.append((stamp[0] - started, ended - stamp[1]))


async def poll_all(port: int, count: int, filtered: bool = True
                   ) -> tuple[list[float], list[str], list[tuple[float, float]]]:  # fmt: skip
    target = f"/_matrix/client/v3/sync?since=s1_0_0&timeout={int(HOLD * 1000)}"
    request = (f"GET {target} HTTP/1.1\r\nHost: bench.example\r\n"
               f"Authorization: Bearer {bodies.TOKEN}\r\n\r\n").encode()  # fmt: skip
    results: list[float] = []
    failures: list[str] = []
    legs: list[tuple[float, float]] = []
    await asyncio.gather(
        *(_one(port, request, results, failures, filtered, legs) for _ in range(count))
    )
    return results, failures, legs


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def run_client(port: int, count: int, filtered: bool = True
               ) -> tuple[list[float], list[str], list[tuple[float, float]]]:  # fmt: skip
    return _run(poll_all(port, count, filtered))


def _raise_own_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _proxy_limits(count: int) -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE to start the proxy with: the hard one raised to what
    `count` clients need where this process may raise its own (CAP_SYS_RESOURCE)."""
    wanted = 17 * count // 8 + _RESERVE  # descriptors.connection_limit's accounting
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, wanted))
            hard = wanted
        except (ValueError, OSError):
            pass  # the machine's limit: the row says which
    return min(_SOFT_START, hard), hard


def _start_relay(kind: str, upstream: str, port: int, open_files: tuple[int, int]) -> Proc:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, open_files)

    popen = subprocess.Popen(relays.command(kind, upstream, f"127.0.0.1:{port}"),
                             cwd=Path(__file__).resolve().parent.parent,
                             preexec_fn=limit)  # fmt: skip
    wait_port(port)
    return Proc(f"{kind}-relay", popen)


def measure(count: int, workdir: Path, front: str = "proxy") -> dict[str, float]:
    """One fresh upstream and proxy (default settings, one worker), `count` long-polls;
    or, with `front` one of `relays.RELAYS`, that relay instead of the proxy."""
    _raise_own_limit()
    soft, hard = _proxy_limits(count)
    up_port, px_port = free_port(), free_port()
    procs: list[Proc] = []
    try:
        command = [sys.executable, "-m", "benchmarks.longpoll", "serve", str(up_port)]
        upstream = subprocess.Popen(command, cwd=Path(__file__).resolve().parent.parent)
        procs.append(Proc("longpoll-upstream", upstream))
        wait_port(up_port)
        env = {"IGNORE_PROXY_WORKERS": "1"}
        upstream_url = f"http://127.0.0.1:{up_port}"
        if front == "proxy":
            proxy = start_proxy(upstream_url, px_port, "warning",
                                workdir / f"proxy-longpoll-{count}.log", env,
                                open_files=(soft, hard))  # fmt: skip
        else:
            proxy = _start_relay(front, upstream_url, px_port, (soft, hard))
        procs.append(proxy)
        request = urllib.request.Request(
            f"http://127.0.0.1:{px_port}/_matrix/client/v3/sync?since=warm",
            headers={"Authorization": f"Bearer {bodies.TOKEN}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:  # learn the user
            response.read()
        before = cpu_seconds(proxy.pid)
        load = os.getloadavg()[0]
        started = time.monotonic()
        with PeakPss(proxy.pid) as pss:
            times, failures, legs = run_client(px_port, count, filtered=front == "proxy")
        elapsed = time.monotonic() - started
        there = [leg[0] for leg in legs] or [float("nan")]
        back = [leg[1] for leg in legs] or [float("nan")]
        return {
            "front": relays.RELAYS.get(front, "proxy"),  # type: ignore[dict-item]
            "there_median_s": statistics.median(there), "there_max_s": max(there),
            "back_median_s": statistics.median(back), "back_max_s": max(back),
            "count": count, "answered": len(times), "failures": len(failures),
            "failure_kinds": ", ".join(sorted(set(failures))[:5]),  # type: ignore[dict-item]
            "max_s": max(times) if times else float("nan"),
            "median_s": statistics.median(times) if times else float("nan"),
            "elapsed_s": elapsed, "peak_rss_mib": peak_rss_mib(proxy.pid),
            "peak_pss_mib": pss.peak, "cpu_s": cpu_seconds(proxy.pid) - before,
            "open_files_hard": hard, "load": load,
        }  # fmt: skip
    finally:
        for proc in reversed(procs):
            proc.stop()


def meets_target(stats: dict[str, float]) -> bool:
    return (stats["answered"] == stats["count"] and stats["max_s"] <= TARGET_SLOWEST_S
            and stats["peak_pss_mib"] <= TARGET_PSS_MIB)  # fmt: skip


def row(stats: dict[str, float]) -> str:
    """A row of the `python -m benchmarks` table."""
    count = int(stats["count"])
    proxy = str(stats["front"]) == "proxy"
    target = count == TARGET_COUNT and proxy
    verdict = ("PASS" if meets_target(stats) else "FAIL") if target else "(reported)"
    failed = (
        f", {stats['failures']:.0f} failed ({stats['failure_kinds']})" if stats["failures"] else ""
    )
    return (
        f"| {count:,} concurrent `/sync?timeout=20000` long-polls, "
        f"{'one worker, default settings' if proxy else 'through the ' + str(stats['front'])} "
        f"(open files hard limit {stats['open_files_hard']:,.0f}) | | "
        f"| {stats['answered']:,.0f} answered{' and filtered' if proxy else ''}{failed}, slowest "
        f"{stats['max_s']:.2f} s after being sent (median {stats['median_s']:.2f} s: "
        f"{stats['there_median_s']:.2f} s until the upstream had it, at most "
        f"{stats['there_max_s']:.2f} s; {stats['back_median_s']:.2f} s from its answer back, "
        f"at most {stats['back_max_s']:.2f} s), peak "
        f"memory {stats['peak_pss_mib']:.0f} MiB (PSS; VmHWM {stats['peak_rss_mib']:.0f} MiB), "
        f"load {stats['load']:.1f} at start | "
        f"| {f'all, <= {TARGET_SLOWEST_S} s, <= {TARGET_PSS_MIB:.0f} MiB' if target else ''} "
        f"| {stats['cpu_s'] / max(count, 1) * 1e6:,.0f} | {verdict} |"
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.longpoll",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[TARGET_COUNT, 10_000])
    parser.add_argument("--compare", action="store_true",
                        help="then the same long-polls through two reference relays that "
                             "judge nothing (benchmarks/relays.py)")  # fmt: skip
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ignore-proxy-longpoll-"))
    try:
        rows = []
        for count in args.clients:
            print(f"{count} long-polls...", file=sys.stderr, flush=True)
            compared = relays.RELAYS if args.compare and count == TARGET_COUNT else {}
            for front in ["proxy", *compared]:
                stats = measure(count, workdir, front)
                rows.append(row(stats))
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        _raise_own_limit()
        _run(serve(int(sys.argv[2])))
    else:
        sys.exit(main())
