"""cluster.py: two instances' stores sharing list changes through a real redis-server."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import respx

from ignore_proxy.cluster import ClusterChannel
from ignore_proxy.config import Cluster
from ignore_proxy.identity import Credentials
from ignore_proxy.ignore_lists import IgnoreListStore

from .conftest import Clock
from .e2e.harness.redis import RedisServer, redis_binary
from .fake_homeserver import BOB, FakeHomeserver, build_app, client_for

ALICE = "@alice:hs.test"
CAROL = "@carol:hs.test"
EVE = "@eve:evil.test"
ALICE_PATH = "/_matrix/client/v3/user/%40alice%3Ahs.test/account_data/m.ignored_user_list"
CAROL_PATH = "/_matrix/client/v3/user/%40carol%3Ahs.test/account_data/m.ignored_user_list"
CHANNEL = "test:ignore-list-changed"
FALLBACK_TTL = 5.0


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    redis_binary()  # fail loudly when it is missing
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Instance:
    def __init__(self, store: IgnoreListStore, cluster: ClusterChannel) -> None:
        self.store = store
        self.cluster = cluster


@pytest.fixture
async def instances(
    redis_server: RedisServer, client: httpx.AsyncClient, clock: Clock
) -> AsyncIterator[tuple[Instance, Instance]]:
    settings = Cluster(redis_url=redis_server.url, channel=CHANNEL, fallback_list_ttl=FALLBACK_TTL)
    made = []
    for _ in range(2):
        store = IgnoreListStore(client, ttl=60.0, max_users=100, timer=clock)
        cluster = ClusterChannel(settings, store)
        await cluster.start()
        made.append(Instance(store, cluster))
    a, b = made
    try:
        await until(lambda: a.cluster.up and b.cluster.up)
        yield a, b
    finally:
        for instance in made:
            await instance.cluster.stop()


async def until(condition: Callable[[], bool]) -> None:
    """Wait for what another task or process does; a hang fails after 15 s."""
    deadline = time.monotonic() + 15.0
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_a_write_through_one_instance_makes_the_other_read_the_list_again(
    instances: tuple[Instance, Instance], upstream: respx.MockRouter
) -> None:
    a, b = instances
    upstream.get(ALICE_PATH).respond(200, json={"ignored_users": {}})
    await b.store.ensure_fresh(ALICE, Credentials("tok"))
    assert b.store.known(ALICE)
    a.store.set(ALICE, frozenset({EVE}))
    await a.store.shared(ALICE)
    assert a.cluster.published == 1
    await until(lambda: not b.store.known(ALICE))
    assert a.store.known(ALICE) is False  # its own message came back: read once more
    assert b.cluster.heard == 1


async def test_only_the_user_id_is_published(
    instances: tuple[Instance, Instance], redis_server: RedisServer
) -> None:
    a, _ = instances
    with redis_server.client() as raw:
        listener = raw.pubsub()
        listener.subscribe(CHANNEL)
        assert listener.get_message(timeout=5)["type"] == "subscribe"
        a.store.set(ALICE, frozenset({EVE}))
        await a.store.shared(ALICE)
        message = listener.get_message(timeout=5)
        listener.close()
    assert message is not None
    assert message["data"] == ALICE.encode()


@pytest.mark.slow
async def test_redis_down_shortens_lists_logs_once_and_recovers(
    instances: tuple[Instance, Instance],
    redis_server: RedisServer,
    upstream: respx.MockRouter,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = instances
    route = upstream.get(ALICE_PATH).respond(200, json={"ignored_users": {}})
    await b.store.ensure_fresh(ALICE, Credentials("tok"))
    upstream.get(CAROL_PATH).respond(200, json={"ignored_users": {EVE: {}}})
    await b.store.ensure_fresh(CAROL, Credentials("tok"))  # nobody changes it meanwhile
    caplog.set_level(logging.INFO, "ignore_proxy.cluster")
    redis_server.stop()
    await until(lambda: not b.cluster.up)
    assert b.cluster.state()["redis"] == "unavailable"
    assert b.cluster.state()["list_ttl"] == FALLBACK_TTL
    clock.now += FALLBACK_TTL + 1  # well inside the 60 s list_ttl
    await b.store.ensure_fresh(ALICE, Credentials("tok"))
    assert route.call_count == 2
    # A write through A meanwhile: its answer is not held up, and it is sent again later.
    a.store.set(ALICE, frozenset({EVE}))
    await a.store.shared(ALICE)
    assert a.cluster.publish_failures >= 1
    await asyncio.sleep(2.5)  # several reconnection attempts
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len([r for r in warnings if r.name == "ignore_proxy.cluster"]) == 2  # one each
    assert "unavailable" in warnings[0].getMessage()
    redis_server.start()
    await until(lambda: a.cluster.up and b.cluster.up)
    assert not b.store.known(CAROL)  # what was held through the outage is forgotten
    await b.store.ensure_fresh(ALICE, Credentials("tok"))
    await until(lambda: a.cluster.published >= 1)  # the write's message, sent again
    clock.now += FALLBACK_TTL + 1
    await b.store.ensure_fresh(ALICE, Credentials("tok"))  # forgotten on hearing it
    b_reads = route.call_count
    clock.now += FALLBACK_TTL + 1  # the full TTL again
    await b.store.ensure_fresh(ALICE, Credentials("tok"))
    assert route.call_count == b_reads


async def test_a_publish_not_accepted_in_time_lets_the_answer_go_and_shortens_lists(
    instances: tuple[Instance, Instance], redis_server: RedisServer, upstream: respx.MockRouter
) -> None:
    a, b = instances
    upstream.get(ALICE_PATH).respond(200, json={"ignored_users": {}})
    await b.store.ensure_fresh(ALICE, Credentials("tok"))
    with redis_server.client() as raw:
        raw.client_pause(1500, all=False)  # write commands wait, PUBLISH among them
    a.store.set(ALICE, frozenset({EVE}))
    await a.store.shared(ALICE)  # returns after publish_timeout, unaccepted
    assert a.cluster.publishes_late == 1
    assert not a.cluster.up
    assert b.store.known(ALICE)
    await until(lambda: a.cluster.up)  # accepted once the pause ends
    await until(lambda: not b.store.known(ALICE))


@pytest.mark.slow
async def test_a_silent_subscription_is_noticed_and_lists_are_forgotten(
    instances: tuple[Instance, Instance], redis_server: RedisServer, upstream: respx.MockRouter
) -> None:
    _, b = instances
    upstream.get(ALICE_PATH).respond(200, json={"ignored_users": {}})
    await b.store.ensure_fresh(ALICE, Credentials("tok"))
    # Redis answers nothing for 4 s, the connection stays open: a peer gone silent.
    with redis_server.client() as raw:
        raw.client_pause(4000)
    await until(lambda: not b.cluster.up)
    assert "subscription lost" in b.cluster.state()["reason"]
    await until(lambda: b.cluster.up)
    assert not b.store.known(ALICE)


async def test_a_message_that_is_not_a_user_id_forgets_every_list(
    instances: tuple[Instance, Instance], redis_server: RedisServer, upstream: respx.MockRouter
) -> None:
    _, b = instances
    upstream.get(ALICE_PATH).respond(200, json={"ignored_users": {}})
    await b.store.ensure_fresh(ALICE, Credentials("tok"))
    with redis_server.client() as raw:
        raw.publish(CHANNEL, b"\xff not a user")
    await until(lambda: not b.store.known(ALICE))


async def test_an_unreachable_redis_at_start_serves_with_short_lists(
    client: httpx.AsyncClient, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    from .e2e.harness.procs import free_port

    store = IgnoreListStore(client, ttl=60.0, max_users=100, timer=clock)
    cluster = ClusterChannel(
        Cluster(redis_url=f"redis://127.0.0.1:{free_port()}/0", fallback_list_ttl=3.0), store
    )
    with caplog.at_level(logging.WARNING, "ignore_proxy.cluster"):
        await cluster.start()
        try:
            await until(lambda: bool(caplog.records))
            assert not cluster.up
            assert cluster.state()["list_ttl"] == 3.0
            assert "redis://" not in caplog.text  # the URL may hold a password
        finally:
            await cluster.stop()


async def test_a_list_write_through_the_proxy_answers_after_the_bounded_wait(
    redis_server: RedisServer,
) -> None:
    homeserver = FakeHomeserver()
    app = build_app(homeserver, cluster_redis_url=redis_server.url)
    cluster = app.cluster
    assert cluster is not None
    async with app.lifespan(app.own), client_for(app, "alice-token") as alice:
        await until(lambda: cluster.up)
        ready = await alice.get("/_ignore_proxy/health/ready")
        assert ready.json()["cluster"] == {"redis": "connected"}
        with redis_server.client() as raw:
            raw.client_pause(1000, all=False)  # PUBLISH waits a second
        written = await alice.put(
            "/_matrix/client/v3/user/%40alice%3Ahs/account_data/m.ignored_user_list",
            json={"ignored_users": {BOB: {}}},
        )
        assert written.status_code == 200, written.text
        assert homeserver.account_data["@alice:hs"] == {"ignored_users": {BOB: {}}}
        # The answer waited for the publish (bounded), and left without it.
        assert cluster.publishes_late == 1
        ready = await alice.get("/_ignore_proxy/health/ready")
        assert ready.status_code == 200
        assert ready.json()["cluster"]["redis"] == "unavailable"
        assert "not accepted in time" in ready.json()["cluster"]["reason"]
        await until(lambda: cluster.up)  # accepted after the pause
        assert cluster.published >= 1
