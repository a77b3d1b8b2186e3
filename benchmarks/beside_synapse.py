"""The cost beside a real homeserver: what the proxy adds to Synapse's work and latency.

    python -m benchmarks.beside_synapse            # 60 s; --seconds, --users, --rooms
    python -m benchmarks.beside_synapse --compare  # then through two reference relays

Starts Synapse with its ignore support switched off (standing in for Conduit or Dendrite,
as the e2e tests do: tests/e2e/harness, tests/e2e/synapse_no_ignore.py) and the proxy in
front of it through its command line (default settings, one worker). 50 users in 10
rooms (each in two rooms, each ignoring one other member) then, for 60 s, through the
proxy: every user keeps a `/sync` long-poll open, as a client does, and sends a message
every few seconds (in a process of its own). Beside that load, a prober sends the same
`/sync?timeout=0` (from where its last probe of that user ended) and `/messages` request
straight to Synapse and through the proxy, one right after the other in random order,
and times each.

Prints the proxy's CPU seconds (utime+stime, /proc) as a share of Synapse's over the same
60 s, and the latency of each probed request through the proxy and straight to Synapse
(p50, p99) with what the proxy adds. Synapse's CPU includes the probes sent straight to
it (a few percent of its requests), so the share is slightly understated; the row says
how many. With `--compare`, the same traffic then goes through two reference relays
that judge nothing (benchmarks/relays.py: the proxy's own server and pool alone, and a
bare uvloop relay), one after the other against the same Synapse, and a table gives each
front's CPU per request and share. Needs Synapse in the environment (the e2e tests'
`pip install -e .[e2e]`).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import multiprocessing.queues
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx

from tests.e2e.harness.procs import ManagedProcess, free_port
from tests.e2e.harness.proxy import start_proxy
from tests.e2e.harness.synapse import (
    RegisteredUser,
    SynapseServer,
    launch_synapse,
    register_user,
    wait_synapse,
)

from . import relays
from .servers import cpu_seconds

CS = "/_matrix/client/v3"
TARGET_CPU_SHARE = 0.05
TARGET_ADDED_P50_MS = 2.0
_SEND_EVERY_S = 5.0  # per user, on average: 10 messages a second from 50 users
_PROBE_EVERY_S = 0.1


def _q(value: str) -> str:
    return quote(value, safe="")


@dataclass
class User:
    account: RegisteredUser
    rooms: list[str] = field(default_factory=list)
    since: str | None = None

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.account.access_token}"}


@dataclass
class Probes:
    """Latencies in seconds of each pair (straight to Synapse, through the proxy), by kind."""

    pairs: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    errors: int = 0

    def add(self, kind: str, direct: float, proxied: float) -> None:
        self.pairs.setdefault(kind, []).append((direct, proxied))


@dataclass
class Load:
    syncs: int = 0
    sends: int = 0
    errors: int = 0


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(share * len(ordered)), len(ordered) - 1)]


async def _setup(http: httpx.AsyncClient, synapse: SynapseServer, users: int,
                 rooms: int) -> list[User]:  # fmt: skip
    """Users, public rooms (each user in two), one ignored member each, a few messages."""
    run = uuid.uuid4().hex[:6]
    people = [User(await register_user(http, synapse, f"bench{run}_{i}")) for i in range(users)]
    room_ids = []
    for index in range(rooms):
        creator = people[index * users // rooms]
        room = {"preset": "public_chat", "name": f"room {index}"}
        answer = await http.post(f"{synapse.url}{CS}/createRoom", headers=creator.auth, json=room)
        answer.raise_for_status()
        room_ids.append(answer.json()["room_id"])
    for index, user in enumerate(people):
        home = index * rooms // users
        user.rooms = [room_ids[home], room_ids[(home + 1) % rooms]]
        for room_id in user.rooms:
            answer = await http.post(f"{synapse.url}{CS}/join/{_q(room_id)}", headers=user.auth)
            answer.raise_for_status()
    for index, user in enumerate(people):
        ignored = people[(index + 1) % users].account.user_id  # a member of the same room
        answer = await http.put(
            f"{synapse.url}{CS}/user/{_q(user.account.user_id)}/account_data/m.ignored_user_list",
            headers=user.auth, json={"ignored_users": {ignored: {}}},
        )  # fmt: skip
        answer.raise_for_status()
    for user in people:  # some history for /messages and the first syncs
        for room_id in user.rooms:
            await _send(http, synapse.url, user, room_id)
    return people


async def _send(http: httpx.AsyncClient, base: str, user: User, room_id: str) -> None:
    path = f"{CS}/rooms/{_q(room_id)}/send/m.room.message/{uuid.uuid4().hex}"
    body = {"msgtype": "m.text", "body": f"hello from {user.account.localpart}"}
    answer = await http.put(base + path, headers=user.auth, json=body)
    answer.raise_for_status()


async def _syncing(http: httpx.AsyncClient, base: str, user: User, until: float,
                   load: Load) -> None:  # fmt: skip
    """A client's sync loop: a long-poll, then the next from where it ended."""
    while time.monotonic() < until:
        params = {"timeout": "30000"}
        if user.since:
            params["since"] = user.since
        try:
            answer = await http.get(f"{base}{CS}/sync", headers=user.auth, params=params,
                                    timeout=max(until - time.monotonic(), 0.1) + 35)  # fmt: skip
            answer.raise_for_status()
            user.since = answer.json()["next_batch"]
            load.syncs += 1
        except httpx.HTTPError:
            load.errors += 1
            await asyncio.sleep(0.5)


async def _sending(http: httpx.AsyncClient, base: str, user: User, until: float,
                   load: Load, rng: random.Random) -> None:  # fmt: skip
    while True:
        await asyncio.sleep(rng.expovariate(1 / _SEND_EVERY_S))
        if time.monotonic() >= until:
            return
        try:
            await _send(http, base, user, rng.choice(user.rooms))
            load.sends += 1
        except httpx.HTTPError:
            load.errors += 1


def _load_process(proxy_url: str, people: list[User], seconds: float,
                  results: multiprocessing.queues.Queue[tuple[int, int, int]]) -> None:  # fmt: skip
    """The clients' load, in a process of its own: its event loop, busy with 50 clients,
    must not delay the prober's."""

    async def run() -> Load:
        load = Load()
        rng = random.Random(17)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(trust_env=False, timeout=60, limits=limits) as http:
            until = time.monotonic() + seconds
            await asyncio.gather(
                *(_syncing(http, proxy_url, user, until, load) for user in people),
                *(_sending(http, proxy_url, user, until, load, rng) for user in people),
            )
        return load

    load = asyncio.run(run())
    results.put((load.syncs, load.sends, load.errors))


async def _timed(http: httpx.AsyncClient, url: str, headers: dict[str, str],
                 params: dict[str, str]) -> tuple[float, httpx.Response]:  # fmt: skip
    started = time.perf_counter()
    answer = await http.get(url, headers=headers, params=params)
    answer.read()
    elapsed = time.perf_counter() - started
    answer.raise_for_status()
    return elapsed, answer


async def _probing(direct: httpx.AsyncClient, proxied: httpx.AsyncClient, bases: dict[str, str],
                   people: list[User], until: float, probes: Probes,
                   rng: random.Random) -> None:  # fmt: skip
    """The same request straight to Synapse and through the proxy, back to back."""
    clients = {"direct": direct, "proxy": proxied}
    while time.monotonic() < until:
        await asyncio.sleep(_PROBE_EVERY_S)
        user = rng.choice(people)
        if rng.random() < 0.5 and user.since:
            kind, path = "sync", f"{CS}/sync"
            params = {"since": user.since, "timeout": "0"}
        else:
            kind = "messages"
            path = f"{CS}/rooms/{_q(rng.choice(user.rooms))}/messages"
            params = {"dir": "b", "limit": "20"}
        order = ["direct", "proxy"]
        rng.shuffle(order)
        try:
            took = {}
            for via in order:
                took[via], answer = await _timed(clients[via], bases[via] + path, user.auth, params)
            probes.add(kind, took["direct"], took["proxy"])
            if kind == "sync":  # the next probe of this user: what came since this one
                user.since = answer.json()["next_batch"]
        except httpx.HTTPError:
            probes.errors += 1


@dataclass
class Front:
    """What the clients talk to: the proxy, or a reference relay (benchmarks/relays.py)."""

    name: str
    url: str
    process: ManagedProcess


def _start_front(name: str, workdir: Path, upstream: str, workers: int) -> Front:
    if name == "proxy":
        os.environ["E2E_PROXY_WORKERS"] = str(workers)
        proxy = start_proxy(workdir / "proxy", upstream)
        return Front("proxy", proxy.url, proxy.process)
    url = f"http://127.0.0.1:{free_port()}"
    argv = relays.command(name, upstream, url.removeprefix("http://"))
    process = ManagedProcess(f"{name}-relay", argv, workdir / f"{name}-relay.log",
                             cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    try:
        process.wait_http(f"{url}{CS.rsplit('/', 1)[0]}/versions", 30.0)
    except BaseException:
        process.stop()
        raise
    return Front(relays.RELAYS[name], url, process)


@dataclass
class Run:
    """One front's figures over the same traffic."""

    front: str
    load: Load
    probes: Probes
    front_cpu: float
    synapse_cpu: float
    load_average: float


async def _traffic(args: argparse.Namespace, front: Front, synapse: SynapseServer,
                   people: list[User], direct: httpx.AsyncClient,
                   proxied: httpx.AsyncClient) -> Run:  # fmt: skip
    for user in people:  # each user's first sync, and the front learns them
        answer = await proxied.get(f"{front.url}{CS}/sync", headers=user.auth,
                                   params={"timeout": "0"})  # fmt: skip
        answer.raise_for_status()
        user.since = answer.json()["next_batch"]
    probes = Probes()
    bases = {"direct": synapse.url, "proxy": front.url}
    print(f"traffic for {args.seconds} s through the {front.name}...", file=sys.stderr)
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.queues.Queue[tuple[int, int, int]] = context.Queue()
    clients = context.Process(target=_load_process,
                              args=(front.url, people, args.seconds, results))  # fmt: skip
    load_average = os.getloadavg()[0]
    cpu_before = cpu_seconds(front.process.proc.pid), cpu_seconds(synapse.process.proc.pid)
    clients.start()
    until = time.monotonic() + args.seconds
    await _probing(direct, proxied, bases, people, until, probes, random.Random(7))
    load = Load(*await asyncio.to_thread(results.get, True, args.seconds + 60))
    front_cpu = cpu_seconds(front.process.proc.pid) - cpu_before[0]
    synapse_cpu = cpu_seconds(synapse.process.proc.pid) - cpu_before[1]
    clients.join(10)
    load_average = (load_average + os.getloadavg()[0]) / 2
    return Run(front.name, load, probes, front_cpu, synapse_cpu, load_average)


async def _measure(args: argparse.Namespace, workdir: Path) -> int:
    synapse = launch_synapse("no-ignore", workdir / "synapse")
    runs: list[Run] = []
    try:
        wait_synapse(synapse)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with (
            httpx.AsyncClient(trust_env=False, timeout=60, limits=limits) as direct,
            httpx.AsyncClient(trust_env=False, timeout=60, limits=limits) as proxied,
        ):
            print(f"setting up {args.users} users in {args.rooms} rooms...", file=sys.stderr)
            people = await _setup(direct, synapse, args.users, args.rooms)
            for name in ["proxy", *(relays.RELAYS if args.compare else [])]:
                front = _start_front(name, workdir, synapse.url, args.workers)
                try:
                    runs.append(await _traffic(args, front, synapse, people, direct, proxied))
                finally:
                    front.process.stop()
        return _report(args, runs)
    finally:
        synapse.stop()


def _report(args: argparse.Namespace, runs: list[Run]) -> int:
    proxy = runs[0]
    load, probes = proxy.load, proxy.probes
    share = proxy.front_cpu / proxy.synapse_cpu if proxy.synapse_cpu else float("inf")
    direct_probes = sum(len(pairs) for pairs in probes.pairs.values())
    print()
    print(f"beside Synapse (no-ignore mode): {args.users} users in {args.rooms} rooms, "
          f"{args.seconds} s, proxy --workers {args.workers}, {os.cpu_count()} cores, "
          f"load average {proxy.load_average:.1f} (mean of start and end)")  # fmt: skip
    print(f"through the proxy: {load.syncs} syncs answered, {load.sends} messages sent, "
          f"{load.errors} errors; {direct_probes} probes straight to Synapse, "
          f"{probes.errors} probe errors")  # fmt: skip
    print()
    print("| measure | straight to Synapse | through the proxy | added | target | verdict |")
    print("|---|---:|---:|---:|---|---|")
    ok = share <= TARGET_CPU_SHARE
    failed = not ok
    print(f"| CPU seconds | Synapse {proxy.synapse_cpu:.1f} s | proxy {proxy.front_cpu:.1f} s "
          f"| {share:.1%} of Synapse's | <= {TARGET_CPU_SHARE:.0%} "
          f"| {'PASS' if ok else 'FAIL'} |")  # fmt: skip
    for kind in ("sync", "messages"):
        pairs = probes.pairs.get(kind, [])
        label = "`/sync?since=...&timeout=0`" if kind == "sync" else "`/messages?dir=b&limit=20`"
        if not pairs:
            print(f"| {label} | no probes | | | | FAIL |")
            failed = True
            continue
        direct = [d * 1000 for d, _ in pairs]
        proxied = [p * 1000 for _, p in pairs]
        # What the proxy adds: the median of each pair's difference (the two requests of a
        # pair were sent back to back, so a busy moment of the machine hits both).
        added = statistics.median(p - d for d, p in zip(direct, proxied, strict=True))
        ok = added <= TARGET_ADDED_P50_MS
        failed |= not ok
        verdict = "PASS" if ok else "FAIL"
        print(f"| {label} p50 ({len(pairs)} pairs) | {_percentile(direct, 0.5):.1f} ms "
              f"| {_percentile(proxied, 0.5):.1f} ms | {added:+.1f} ms (median of the pairs' "
              f"differences) | <= {TARGET_ADDED_P50_MS:.0f} ms | {verdict} |")  # fmt: skip
        p99 = _percentile(direct, 0.99), _percentile(proxied, 0.99)
        print(f"| {label} p99 | {p99[0]:.1f} ms | {p99[1]:.1f} ms | {p99[1] - p99[0]:+.1f} ms "
              f"| (reported) | |")  # fmt: skip
    if len(runs) > 1:
        print()
        print("The same traffic through each front in turn (same Synapse, same users):")
        print()
        print("| front | requests | CPU per request | Synapse's per request | share |")
        print("|---|---:|---:|---:|---:|")
        for run in runs:
            served = (
                run.load.syncs
                + run.load.sends
                + sum(len(pairs) for pairs in run.probes.pairs.values())
            )
            synapse_served = served + sum(len(pairs) for pairs in run.probes.pairs.values())
            print(f"| {run.front} | {served:,} | {run.front_cpu / served * 1e6:,.0f} us "
                  f"| {run.synapse_cpu / synapse_served * 1e6:,.0f} us "
                  f"| {run.front_cpu / run.synapse_cpu:.1%} |")  # fmt: skip
    print(f"\n{'all targets met' if not failed else 'target(s) not met'}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.beside_synapse",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--rooms", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1, help="the proxy's (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    parser.add_argument("--compare", action="store_true",
                        help="then the same traffic through two reference relays that "
                             "judge nothing (benchmarks/relays.py)")  # fmt: skip
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ignore-proxy-beside-synapse-"))
    try:
        return asyncio.run(_measure(args, workdir))
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
