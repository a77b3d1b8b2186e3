"""Two proxy instances (replicas) in front of one no-ignore Synapse agree on alice's list
through a real redis-server (cluster.redis_url); with Redis stopped, lists live the
fallback TTL, and it is said once in the log, in the ready detail and in a metric."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from .conftest import Stack
from .harness.matrix import CS, Actor, event_ids, q, unique
from .harness.procs import free_port
from .harness.proxy import ProxyServer, start_proxy
from .harness.redis import RedisServer, redis_binary
from .harness.synapse import register_user

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FALLBACK_TTL = 2.0  # seconds; ignore.list_ttl stays 300
WORKERS = int(os.environ.get("E2E_PROXY_WORKERS", "2"))
DOWN_LINE = "cluster: Redis unavailable"


@dataclass
class Instance:
    proxy: ProxyServer
    metrics_url: str

    def log(self) -> str:
        return self.proxy.process.log_path.read_text(errors="replace")


@dataclass
class Cluster:
    redis: RedisServer
    a: Instance
    b: Instance


@pytest.fixture
async def cluster(stack: Stack, tmp_path: Path) -> AsyncIterator[Cluster]:
    redis_binary()
    upstream = stack.synapse("no-ignore").url
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    instances: list[Instance] = []
    try:
        for name in ("a", "b"):
            metrics = f"127.0.0.1:{free_port()}"
            env = {
                "IGNORE_PROXY_CLUSTER_REDIS_URL": redis.url,
                "IGNORE_PROXY_CLUSTER_FALLBACK_LIST_TTL": str(FALLBACK_TTL),
                # A loaded test machine must not make a publish late (a log line more):
                # the bounded wait itself is tests/test_cluster.py's.
                "IGNORE_PROXY_CLUSTER_PUBLISH_TIMEOUT": "2",
                "IGNORE_PROXY_METRICS_LISTEN": metrics,
            }
            proxy = start_proxy(tmp_path / f"proxy-{name}", upstream, env)
            instances.append(Instance(proxy, f"http://{metrics}/metrics"))
        yield Cluster(redis, *instances)
    finally:
        for instance in instances:
            instance.proxy.stop()
        redis.stop()


async def redis_up(http: httpx.AsyncClient, instance: Instance) -> float:
    """ignore_proxy_cluster_redis_up: the number of the instance's processes hearing Redis
    (workers' metrics are copied to the parent every few seconds)."""
    text = (await http.get(instance.metrics_url)).text
    found = re.search(r"^ignore_proxy_cluster_redis_up(?:\{[^}]*\})? (\S+)$", text, re.M)
    return float(found.group(1)) if found else -1.0


async def until(condition: Callable[[], Awaitable[bool]], within: float = 60.0) -> float:
    """Seconds until `condition` held; fails after `within`."""
    start = time.monotonic()
    while not await condition():
        if time.monotonic() - start > within:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)
    return time.monotonic() - start


async def test_two_instances_agree_through_redis_and_fall_back_without_it(
    cluster: Cluster, stack: Stack, http: httpx.AsyncClient
) -> None:
    synapse = stack.synapse("no-ignore")
    users = [await register_user(http, synapse, unique(n)) for n in ("alice", "bob", "charlie")]
    alice_a, alice_b = (
        Actor(users[0], i.proxy.url, http, users[0].access_token, users[0].device_id)
        for i in (cluster.a, cluster.b)
    )
    bob, charlie = (
        Actor(u, cluster.a.proxy.url, http, u.access_token, u.device_id) for u in users[1:]
    )
    room = await bob.create_room(name="replicas")
    for actor in (alice_a, charlie):
        await bob.invite(room, actor.user_id)
        await actor.join(room)
    try:
        await _scenario(cluster, http, room, alice_a, alice_b, bob, charlie)
    finally:
        for actor in (alice_a, alice_b, bob, charlie):
            await actor.close()


async def _scenario(
    cluster: Cluster,
    http: httpx.AsyncClient,
    room: str,
    alice_a: Actor,
    alice_b: Actor,
    bob: Actor,
    charlie: Actor,
) -> None:
    bob_msg = await bob.send_text(room, "from bob")
    charlie_msg = await charlie.send_text(room, "from charlie")

    async def bob_seen_through_b() -> bool:
        path = f"{CS}/rooms/{q(room)}/messages"
        chunk = (await alice_b.get_json(path, params={"dir": "b", "limit": "50"}))["chunk"]
        assert charlie_msg in event_ids(chunk)
        return bob_msg in event_ids(chunk)

    async def all_hear_redis() -> bool:
        return all([await redis_up(http, i) == WORKERS for i in (cluster.a, cluster.b)])

    await until(all_hear_redis)

    # Redis up: a change through A is heard by every process of B before A answers.
    for _ in range(2 * WORKERS):
        assert await bob_seen_through_b()  # B's processes hold alice's list (nobody)
    await alice_a.set_ignored([bob.user_id])
    for _ in range(2 * WORKERS):
        assert not await bob_seen_through_b()

    # Redis stopped: the instances keep serving, with lists re-read every FALLBACK_TTL.
    cluster.redis.stop()
    await until(lambda: _says_unavailable(http, cluster.b))
    await alice_a.set_ignored([])  # its answer does not wait for the dead Redis
    took = await until(bob_seen_through_b)
    await alice_a.set_ignored([bob.user_id])
    took = max(took, await until(lambda: _not(bob_seen_through_b)))
    print(f"without Redis, B followed A after at most {took:.1f} s")
    assert took < 60  # the fallback TTL, not ignore.list_ttl (300 s), let B see it
    await asyncio.sleep(2 * FALLBACK_TTL)  # every process of B re-read it by now
    for _ in range(2 * WORKERS):
        assert not await bob_seen_through_b()
    ready = await http.get(f"{cluster.b.proxy.url}/_ignore_proxy/health/ready")
    assert ready.status_code == 200, ready.text  # ready: it serves
    assert ready.json()["cluster"]["redis"] == "unavailable"
    assert ready.json()["cluster"]["list_ttl"] == FALLBACK_TTL
    await until(lambda: _redis_up_is(http, cluster.b, 0))
    # Once per process, however many reconnections failed meanwhile.
    assert cluster.b.log().count(DOWN_LINE) == WORKERS, cluster.b.log()[-3000:]
    assert cluster.a.log().count(DOWN_LINE) == WORKERS, cluster.a.log()[-3000:]

    # Redis back: both instances hear it again, and B follows A at once.
    cluster.redis.start()
    await until(all_hear_redis)
    await alice_a.set_ignored([])
    for _ in range(2 * WORKERS):
        assert await bob_seen_through_b()
    await alice_a.set_ignored([bob.user_id])
    for _ in range(2 * WORKERS):
        assert not await bob_seen_through_b()
    assert cluster.b.log().count(DOWN_LINE) == WORKERS


async def _says_unavailable(http: httpx.AsyncClient, instance: Instance) -> bool:
    ready = await http.get(f"{instance.proxy.url}/_ignore_proxy/health/ready")
    return bool(ready.json().get("cluster", {}).get("redis") == "unavailable")


async def _redis_up_is(http: httpx.AsyncClient, instance: Instance, value: float) -> bool:
    return await redis_up(http, instance) == value


async def _not(condition: Callable[[], Awaitable[bool]]) -> bool:
    return not await condition()
