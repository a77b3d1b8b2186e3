"""`python -m benchmarks [--quick]`: the proxy against nginx on canned homeserver answers.

Starts nginx (a canned upstream serving files, and a plain `proxy_pass` to it), the proxy
through its real command line, and wrk; runs several rounds with the targets alternating;
prints medians, spread (min-max over rounds), the ratios to nginx and PASS/FAIL. Stops
every process it started.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from . import bodies, long_lists, longpoll, rewrite_speed
from .servers import (
    LUA,
    MEDIA,
    MESSAGES,
    SYNC_1M,
    SYNC_8M,
    TINY,
    Proc,
    WrkResult,
    cpu_seconds,
    free_port,
    nginx_conf,
    start_nginx,
    start_proxy,
    wrk,
)  # fmt: skip

# (key, label, path, required ratio of the proxy's req/s to nginx's)
SCENARIOS = [
    ("tiny", "tiny authenticated pass-through (`/pushrules/`)", TINY, 0.15),
    ("messages", "`/messages` 18 KB, filtered", MESSAGES, 0.08),
    ("sync1m", "`/sync` 1 MB, filtered", SYNC_1M, 0.2),
    ("media", "1 MiB media download, streamed", MEDIA, 1.0),
]


def _get(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {bodies.TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        data: bytes = response.read()
        return data


def _spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return (fmt.format(statistics.median(values)) + " (" + fmt.format(min(values)) + "-"
            + fmt.format(max(values)) + ")")  # fmt: skip


def _beside(what: str, runs: list[WrkResult], nginx: list[WrkResult], tag: str) -> str:
    """A row for a variant of the proxy measured beside the main one."""
    ratios = [p.rps / n.rps for p, n in zip(runs, nginx, strict=True)]
    return (f"| ... same, {what} | | | {_spread([r.rps for r in runs])} "
            f"| {_spread(ratios, '{:.2f}')} | "
            f"| {_spread([r.cpu_us_per_req or 0 for r in runs])} | ({tag}) |")  # fmt: skip


def _load() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="ignore-proxy-bench-"))
        self.workdir.chmod(0o755)
        self.procs: list[Proc] = []
        self.lines: list[str] = []

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def run(self) -> int:
        try:
            return self._run()
        finally:
            for proc in reversed(self.procs):
                proc.stop()
            if self.args.keep:
                self.say(f"kept {self.workdir}")
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _wrk(self, url: str, proc: Proc | None, connections: int | None = None) -> WrkResult:
        before = cpu_seconds(proc.pid) if proc else 0.0
        result = wrk(url, self.args.duration, connections or self.args.connections, self.lua)
        if proc is not None:
            result.cpu_us_per_req = (cpu_seconds(proc.pid) - before) / max(result.requests, 1) * 1e6
        return result

    def _run(self) -> int:
        args = self.args
        self.say(f"workdir {self.workdir}; load average {_load()}")
        files = bodies.write_all(self.workdir / "files")
        # In-process, first, while nothing else of the run is busy.
        self.say("rewrite speed (in-process, 8 MB /sync)...")
        speed = rewrite_speed.measure(files["sync_8m.json"].read_bytes(), args.repeat)
        self.lua = self.workdir / "auth.lua"
        self.lua.write_text(LUA)
        up_port, ngx_port, px_port, pxlog_port = (free_port() for _ in range(4))
        nginx = start_nginx(nginx_conf(self.workdir, files, up_port, ngx_port), [up_port, ngx_port])
        self.procs.append(nginx)
        upstream = f"http://127.0.0.1:{up_port}"
        workers = {"IGNORE_PROXY_WORKERS": str(args.workers)}
        proxy = start_proxy(upstream, px_port, "warning", self.workdir / "proxy.log", workers)
        self.procs.append(proxy)
        proxy_info = start_proxy(upstream, pxlog_port, "info", self.workdir / "proxy-info.log",
                                 workers)  # fmt: skip
        self.procs.append(proxy_info)
        px1_port = free_port()
        proxy_one = start_proxy(upstream, px1_port, "warning", self.workdir / "proxy-one.log")
        self.procs.append(proxy_one)
        bases = {
            "direct": (f"http://127.0.0.1:{up_port}", None),
            "nginx": (f"http://127.0.0.1:{ngx_port}", None),
            "proxy": (f"http://127.0.0.1:{px_port}", proxy),
            "proxy+log": (f"http://127.0.0.1:{pxlog_port}", proxy_info),
            "proxy/1": (f"http://127.0.0.1:{px1_port}", proxy_one),
        }
        self._check(bases)
        results: dict[str, dict[str, list[WrkResult]]] = {}
        for key, _, path, _ in SCENARIOS:
            targets = ["direct", "nginx", "proxy", "proxy/1"]
            targets += ["proxy+log"] if key == "tiny" else []
            results[key] = {t: [] for t in targets}
            for round_ in range(args.rounds):
                order = targets[round_ % len(targets) :] + targets[: round_ % len(targets)]
                for target in order:
                    base, proc = bases[target]
                    res = self._wrk(base + path, proc)
                    results[key][target].append(res)
                    self.say(f"{key:9} round {round_ + 1} {target:9} {res.rps:10,.0f} req/s"
                             f"  p99 {res.p99_ms:7.1f} ms  errors {res.errors}"
                             + (f"  cpu {res.cpu_us_per_req:,.0f} us/req"
                                if res.cpu_us_per_req else ""))  # fmt: skip
        stall = self._stall(bases["proxy"][0], proxy)
        gc.collect()
        for proc in (proxy, proxy_info, proxy_one):
            proc.stop()
        polls = self._long_polls()
        lists = self._long_lists()
        return self._report(results, stall, speed, polls, lists)

    def _check(self, bases: dict[str, tuple[str, Proc | None]]) -> None:
        """Every target answers, and the proxy really filters."""
        ignored = bodies.IGNORED.encode()
        for _, _, path, _ in SCENARIOS:
            direct = _get(bases["direct"][0] + path)
            for target in ("nginx", "proxy", "proxy+log", "proxy/1"):
                got = _get(bases[target][0] + path)
                if path in (TINY, MEDIA) or target == "nginx":
                    assert got == direct, (target, path)
                else:
                    assert got.count(ignored) < direct.count(ignored), (target, path)
        big = _get(bases["proxy"][0] + SYNC_8M)
        assert big.count(ignored) < files_count(bases["direct"][0] + SYNC_8M, ignored)

    def _stall(self, base: str, proxy: Proc) -> dict[str, WrkResult]:
        """p99 of a tiny request alone, and while two clients pull filtered 8 MB syncs."""
        self.say("event-loop stall: tiny alone, then next to 8 MB /sync rewrites...")
        alone = wrk(base + TINY, self.args.duration, 4, self.lua)
        big = subprocess.Popen(
            ["wrk", "-t1", "-c2", f"-d{int(self.args.duration) + 2}s", "--timeout=30s",
             "-s", str(self.lua), base + SYNC_8M],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            time.sleep(1.0)
            beside = wrk(base + TINY, self.args.duration, 4, self.lua)
        finally:
            out, _ = big.communicate(timeout=60)
        syncs = float(out.split("Requests/sec:")[1].split()[0]) if "Requests/sec:" in out else 0.0
        self.say(f"  tiny p99 alone {alone.p99_ms:.1f} ms, beside 8 MB syncs {beside.p99_ms:.1f}"
                 f" ms (max {beside.max_ms:.0f} ms); 8 MB syncs {syncs:.1f}/s")  # fmt: skip
        return {"alone": alone, "beside": beside, "syncs_per_s": syncs}  # type: ignore[dict-item]

    def _long_polls(self) -> list[dict[str, float]]:
        """Thousands of idle clients: a fresh proxy (default settings, one worker) each."""
        runs = []
        for count in self.args.long_polls:
            self.say(f"{count} concurrent /sync?timeout=20000 long-polls (fresh proxy)...")
            stats = longpoll.measure(count, self.workdir)
            if stats["failures"]:
                self.say(f"  failures: {stats['failure_kinds']}")
            runs.append(stats)
        return runs

    def _long_lists(self) -> dict[str, Any]:
        self.say("ignore lists of 10 and 10,000 entries, 1 MB /sync, one worker (fresh proxy)...")
        sync = self.workdir / "sync_1m_no_list.json"
        sync.write_bytes(long_lists.sync_body())
        sync.chmod(0o644)
        rounds = max(self.args.rounds, 2)
        figures = long_lists.measure(self.workdir, sync, rounds, int(self.args.duration))
        self.say(f"  CPU per /sync {figures['cpu_ms']}, ratio {figures['ratio']:.2f}, tiny p99 "
                 f"beside {figures['tiny_beside_p99']:.1f} ms")  # fmt: skip
        return figures

    def _report(self, results: dict[str, dict[str, list[WrkResult]]], stall: dict[str, WrkResult],
                speed: dict[str, float], polls: list[dict[str, float]],
                lists: dict[str, Any]) -> int:  # fmt: skip
        rows = []
        failed = 0
        header = ("| target | direct req/s | nginx req/s | proxy req/s | ratio to nginx "
                  "| needed | proxy CPU us/req | verdict |")  # fmt: skip
        rows.append(header)
        rows.append("|---|---:|---:|---:|---:|---:|---:|---|")
        for key, label, _, needed in SCENARIOS:
            res = results[key]
            ratios = [p.rps / n.rps for p, n in zip(res["proxy"], res["nginx"], strict=True)]
            ratio = statistics.median(ratios)
            errors = sum(r.errors for r in res["proxy"])
            ok = ratio >= needed and errors == 0
            failed += not ok
            rows.append(
                f"| {label} | {_spread([r.rps for r in res['direct']])} "
                f"| {_spread([r.rps for r in res['nginx']])} "
                f"| {_spread([r.rps for r in res['proxy']])} "
                f"| {_spread(ratios, '{:.2f}')} | >= {needed} "
                f"| {_spread([r.cpu_us_per_req or 0 for r in res['proxy']])} "
                f"| {'PASS' if ok else 'FAIL'}{f' ({errors} errors)' if errors else ''} |"
            )
            rows.append(_beside("one worker", res["proxy/1"], res["nginx"], "one worker"))
            if "proxy+log" in res:
                rows.append(_beside("default `info` access log", res["proxy+log"], res["nginx"],
                                    "info"))  # fmt: skip
        for stats in polls:
            failed += stats["count"] == longpoll.TARGET_COUNT and not longpoll.meets_target(stats)
            rows.append(longpoll.row(stats))
        ok = speed["ours_mb_s"] >= 250 and speed["speedup"] >= 2
        failed += not ok
        rows.append(
            f"| rewriting the 8 MB `/sync` body alone (CPU time, median of {self.args.repeat}) "
            f"| | orjson {speed['orjson_ms']:.0f} ms ({speed['orjson_min_ms']:.0f}-"
            f"{speed['orjson_max_ms']:.0f}) | {speed['ours_ms']:.0f} ms "
            f"({speed['ours_min_ms']:.0f}-{speed['ours_max_ms']:.0f}) = "
            f"{speed['ours_mb_s']:.0f} MB/s | {speed['speedup']:.2f} x orjson "
            f"| >= 250 MB/s, >= 2 x | | {'PASS' if ok else 'FAIL'} |"
        )
        rows.append(
            f"| ... the issue's sketch (per-event msgspec decode, ~300 MB/s where the issue was "
            f"written), same run | | | {speed['reference_mb_s']:.0f} MB/s "
            f"| {speed['ours_mb_s'] / speed['reference_mb_s']:.2f} x it | | | (yardstick) |"
        )
        alone, beside = stall["alone"], stall["beside"]
        rows.append(
            f"| tiny request p99 while 8 MB syncs are rewritten ({stall['syncs_per_s']:.1f}/s) "
            f"| | | p99 {beside.p99_ms:.1f} ms (alone {alone.p99_ms:.1f} ms), "
            f"max {beside.max_ms:.0f} ms | | (reported) | | |"
        )
        text, ok = long_lists.row(lists)
        failed += not ok
        rows.append(text)
        print()
        args = self.args
        print(f"ignore-proxy benchmark: {args.rounds} round(s) x {args.duration} s, "
              f"wrk {args.connections} connections, proxy --workers {args.workers} "
              f"(nginx: worker_processes auto, {os.cpu_count()} cores), "
              f"load average at end {_load()}")  # fmt: skip
        print("\n".join(rows))
        print(f"\n{'all targets met' if not failed else f'{failed} target(s) not met'}")
        return 0


def files_count(url: str, needle: bytes) -> int:
    return _get(url).count(needle)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s (a smoke run)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="the proxy's workers (default: the cores, as nginx's "
                        "worker_processes auto); one worker is measured beside it")  # fmt: skip
    parser.add_argument("--long-polls", type=int, nargs="+",
                        default=[longpoll.TARGET_COUNT, 10_000],
                        help="concurrent long-polls, one fresh proxy each")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    parser.add_argument("--repeat", type=int, default=25, help="8 MB rewrite repetitions")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration, args.repeat = 1, 2, 5
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not on the PATH (Debian: apt-get install -y {tool})")
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
