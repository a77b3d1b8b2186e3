"""A filtered 1 MB `/sync` for a user ignoring 10 accounts and for one ignoring 10,000,
through one proxy worker, in the same run: the proxy's CPU per `/sync` for each (rounds
alternate), their ratio, and the p99 of a tiny request while a client pulls the
10,000-entry user's `/sync` in a loop.

    python -m benchmarks.long_lists [--rounds N] [--duration S]

Its own canned upstream (nginx: `whoami` by token, each user's ignore list, the 1 MB
`/sync` of `bodies.py`) and proxy; stops every process it started. Part of
`python -m benchmarks`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from . import bodies
from .servers import SYNC_1M, TINY, Proc, cpu_seconds, free_port, start_nginx, start_proxy, wrk

SIZES = (10, 10_000)
"""The two lists' lengths: the short one is the baseline."""
_TOKENS = {size: f"syt_bench_list{size}_0abc" for size in SIZES}
_USERS = {size: f"@list{size}:bench.example" for size in SIZES}


def ignore_list(size: int) -> dict[str, Any]:
    """`size` ignored users: the body's ignored user and others, IDs of random lengths
    on a few servers, as a spam wave's are (deterministic)."""
    rng = random.Random(size)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789._-="
    servers = ["matrix.org", "example.com", "spam.example", "bench.example"]
    ids = {bodies.IGNORED}
    while len(ids) < size:
        local = "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 20)))
        server = rng.choice(servers) if rng.random() < 0.7 else f"s{rng.randint(0, 999)}.example"
        ids.add(f"@{local}:{server}")
    return {"ignored_users": {uid: {} for uid in sorted(ids)}}


def sync_body() -> bytes:
    """The 1 MB `/sync` of `bodies.py` as an incremental sync with no change to the
    ignore list brings it: without it (one there would replace the list the proxy knows)."""
    body = json.loads(bodies.sync_body(1_000_000, 1))
    events = body["account_data"]["events"]
    body["account_data"]["events"] = [e for e in events if e["type"] != "m.ignored_user_list"]
    return bodies._dumps(body)


def _conf(workdir: Path, sync: Path, port: int) -> Path:
    files = workdir / "files"
    files.mkdir(exist_ok=True)
    users = ""
    lists = ""
    for size in SIZES:
        (files / f"whoami{size}.json").write_text(
            json.dumps({"user_id": _USERS[size], "device_id": "D", "is_guest": False})
        )
        (files / f"ignored{size}.json").write_text(json.dumps(ignore_list(size)))
        users += f'        "Bearer {_TOKENS[size]}" {size};\n'
        route = f"/_matrix/client/v3/user/{_USERS[size]}/account_data/m.ignored_user_list"
        lists += f"location = {route} {{ alias {files}/ignored{size}.json; }}\n"
    for file in files.iterdir():
        os.chmod(file, 0o644)
    temp = workdir / "nginx-temp"
    temp.mkdir(exist_ok=True)
    os.chmod(temp, 0o777)
    conf = f"""
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    default_type application/json;
    client_body_temp_path {temp}/client;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    map $http_authorization $list_size {{
        default 10;
{users}    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location = /_matrix/client/v3/account/whoami {{ alias {files}/whoami$list_size.json; }}
        {lists}
        location = /_matrix/client/v3/sync {{ alias {sync}; }}
        location = {TINY} {{ return 200 '{{"global":{{}}}}'; }}
    }}
}}
"""
    conf_path = workdir / "nginx-lists.conf"
    conf_path.write_text(conf)
    return conf_path


def _lua(workdir: Path, size: int) -> Path:
    path = workdir / f"auth{size}.lua"
    path.write_text(f'wrk.headers["Authorization"] = "Bearer {_TOKENS[size]}"\n')
    return path


def _get(url: str, size: int) -> bytes:
    headers = {"Authorization": f"Bearer {_TOKENS[size]}"}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as r:
        data: bytes = r.read()
        return data


def measure(workdir: Path, sync: Path, rounds: int, duration: int) -> dict[str, Any]:
    """CPU per filtered `/sync` by list length (medians and per-round ratios), and the
    tiny request's p99 alone and beside the long list's `/sync` loop."""
    procs: list[Proc] = []
    try:
        up_port, px_port = free_port(), free_port()
        procs.append(start_nginx(_conf(workdir, sync, up_port), [up_port]))
        proxy = start_proxy(f"http://127.0.0.1:{up_port}", px_port, "warning",
                            workdir / "proxy-lists.log", {"IGNORE_PROXY_WORKERS": "1"})  # fmt: skip
        procs.append(proxy)
        base = f"http://127.0.0.1:{px_port}"
        direct = _get(f"http://127.0.0.1:{up_port}{SYNC_1M}", SIZES[0])
        answers = {size: _get(base + SYNC_1M, size) for size in SIZES}  # learns the lists
        ignored = bodies.IGNORED.encode()
        assert answers[SIZES[0]] == answers[SIZES[1]], "both lists filter the same body alike"
        assert answers[SIZES[0]].count(ignored) < direct.count(ignored), "nothing filtered"
        luas = {size: _lua(workdir, size) for size in SIZES}
        cpu: dict[int, list[float]] = {size: [] for size in SIZES}
        for round_ in range(rounds):
            for size in SIZES if round_ % 2 == 0 else SIZES[::-1]:
                before = cpu_seconds(proxy.pid)
                result = wrk(base + SYNC_1M, duration, 1, luas[size])
                assert result.errors == 0, result
                cpu[size].append((cpu_seconds(proxy.pid) - before) / result.requests * 1e3)
        short, long = SIZES
        ratios = [lo / sh for lo, sh in zip(cpu[long], cpu[short], strict=True)]
        alone = wrk(base + TINY, duration, 4, luas[short])
        beside, syncs = _tiny_beside(base, luas[long], luas[short], duration)
        beside_short, syncs_short = _tiny_beside(base, luas[short], luas[short], duration)
        return {
            "cpu_ms": {size: statistics.median(cpu[size]) for size in SIZES},
            "cpu_spread": {size: (min(cpu[size]), max(cpu[size])) for size in SIZES},
            "ratio": statistics.median(ratios),
            "ratio_spread": (min(ratios), max(ratios)),
            "tiny_alone_p99": alone.p99_ms,
            "tiny_beside_p99": beside.p99_ms,
            "tiny_beside_max": beside.max_ms,
            "syncs_per_s": syncs,
            "tiny_beside_short_p99": beside_short.p99_ms,
            "syncs_short_per_s": syncs_short,
        }
    finally:
        for proc in reversed(procs):
            proc.stop()


def _tiny_beside(base: str, sync_lua: Path, tiny_lua: Path, duration: int) -> tuple[Any, float]:
    """The tiny request's wrk result while one client pulls `/sync` back to back as the
    user of `sync_lua`, and that client's `/sync`s per second."""
    loop = _SyncLoop(base + SYNC_1M, sync_lua, duration + 2)
    try:
        time.sleep(1.0)
        beside = wrk(base + TINY, duration, 4, tiny_lua)
    finally:
        syncs = loop.finish()
    return beside, syncs


class _SyncLoop:
    """One client pulling `/sync` back to back (wrk, one connection) for `seconds`."""

    def __init__(self, url: str, lua: Path, seconds: int) -> None:
        import subprocess

        self.popen = subprocess.Popen(
            ["wrk", "-t1", "-c1", f"-d{seconds}s", "--timeout=30s", "-s", str(lua), url],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def finish(self) -> float:
        out, _ = self.popen.communicate(timeout=120)
        return float(out.split("Requests/sec:")[1].split()[0]) if "Requests/sec:" in out else 0.0


def row(figures: dict[str, Any]) -> tuple[str, bool]:
    """The benchmark table's row, and whether its targets are met."""
    short, long = SIZES
    cpu, spread = figures["cpu_ms"], figures["cpu_spread"]
    ok = figures["ratio"] <= 1.3 and figures["tiny_beside_p99"] <= 50
    text = (
        f"| `/sync` 1 MB, filtered, one worker: ignore list of {long:,} against {short} "
        f"| | | CPU {cpu[long]:.1f} ms ({spread[long][0]:.1f}-{spread[long][1]:.1f}) "
        f"against {cpu[short]:.1f} ms ({spread[short][0]:.1f}-{spread[short][1]:.1f}) "
        f"per `/sync`; tiny request p99 {figures['tiny_beside_p99']:.1f} ms (max "
        f"{figures['tiny_beside_max']:.0f} ms) beside {figures['syncs_per_s']:.0f} `/sync`/s "
        f"of the {long:,}-entry list (alone {figures['tiny_alone_p99']:.1f} ms; beside "
        f"{figures['syncs_short_per_s']:.0f} `/sync`/s of the {short}-entry list "
        f"{figures['tiny_beside_short_p99']:.1f} ms) "
        f"| {figures['ratio']:.2f} x ({figures['ratio_spread'][0]:.2f}-"
        f"{figures['ratio_spread'][1]:.2f}) | <= 1.3 x, p99 <= 50 ms | "
        f"| {'PASS' if ok else 'FAIL'} |"
    )
    return text, ok


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.long_lists", description=__doc__)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    args = parser.parse_args()
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not on the PATH (Debian: apt-get install -y {tool})")
    workdir = Path(tempfile.mkdtemp(prefix="ignore-proxy-lists-"))
    workdir.chmod(0o755)
    try:
        sync = workdir / "sync_1m.json"
        sync.write_bytes(sync_body())
        sync.chmod(0o644)
        figures = measure(workdir, sync, args.rounds, args.duration)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"{args.rounds} rounds x {args.duration} s, load average at end {load}")
    text, ok = row(figures)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
