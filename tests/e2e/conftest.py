"""End-to-end fixtures: real Synapse (stock and with ignore support switched off), the
real ignore-proxy CLI, and Debian's nginx with the shipped configs.

Each Synapse, proxy and nginx starts at most once per session, on first use, and is
stopped (whole process group) at session end, also after failures and Ctrl-C.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
import pytest

from .harness.matrix import Actor, unique
from .harness.nginx import NginxServer, nginx_binary, start_nginx
from .harness.proxy import ProxyServer, start_proxy
from .harness.synapse import (
    Mode,
    RegisteredUser,
    SynapseServer,
    launch_synapse,
    register_user,
    wait_synapse,
)

Via = Literal["direct", "proxy", "nginx-all", "nginx-selected"]

SHIPPED: dict[str, str] = {
    "nginx-all": "ignore-proxy-all-client.conf",
    "nginx-selected": "ignore-proxy-selected.conf",
}


class Stack:
    """Lazily started servers, shared by the whole session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._synapses: dict[Mode, SynapseServer] = {}
        self._proxies: dict[Mode, ProxyServer] = {}
        self._nginx: dict[tuple[Mode, str], NginxServer] = {}
        self._rejecting: dict[Mode, ProxyServer] = {}
        self._suppressing: dict[Mode, ProxyServer] = {}

    def synapse(self, mode: Mode) -> SynapseServer:
        if mode not in self._synapses:
            server = launch_synapse(mode, self.root / f"synapse-{mode}")
            self._synapses[mode] = server
            wait_synapse(server)
        return self._synapses[mode]

    def proxy(self, mode: Mode) -> ProxyServer:
        if mode not in self._proxies:
            upstream = self.synapse(mode).url
            self._proxies[mode] = start_proxy(self.root / f"proxy-{mode}", upstream)
        return self._proxies[mode]

    def rejecting_proxy(self, mode: Mode) -> ProxyServer:
        """A second proxy in front of the same homeserver, with ``ignore.reject_invites``
        switched on (through its environment variable)."""
        if mode not in self._rejecting:
            upstream = self.synapse(mode).url
            self._rejecting[mode] = start_proxy(
                self.root / f"proxy-{mode}-reject-invites",
                upstream,
                {"IGNORE_PROXY_IGNORE_REJECT_INVITES": "true"},
            )
        return self._rejecting[mode]

    def suppressing_proxy(self, mode: Mode) -> ProxyServer:
        """A proxy in front of the homeserver with ``ignore.suppress_push`` switched on."""
        if mode not in self._suppressing:
            upstream = self.synapse(mode).url
            self._suppressing[mode] = start_proxy(
                self.root / f"proxy-{mode}-suppress-push",
                upstream,
                {"IGNORE_PROXY_IGNORE_SUPPRESS_PUSH": "true"},
            )
        return self._suppressing[mode]

    def nginx(self, mode: Mode, shipped: str) -> NginxServer:
        key = (mode, shipped)
        if key not in self._nginx:
            proxy = self.proxy(mode).url.removeprefix("http://")
            hs = self.synapse(mode).url.removeprefix("http://")
            prefix = self.root / f"nginx-{mode}-{shipped.removesuffix('.conf')}"
            self._nginx[key] = start_nginx(prefix, shipped, proxy, hs)
        return self._nginx[key]

    def url(self, mode: Mode, via: Via) -> str:
        if via == "direct":
            return self.synapse(mode).url
        if via == "proxy":
            return self.proxy(mode).url
        return self.nginx(mode, SHIPPED[via]).url

    def stop(self) -> None:
        # Front to back, so nothing logs errors about a vanished upstream longer than needed.
        for servers in (
            self._nginx,
            self._proxies,
            self._rejecting,
            self._suppressing,
            self._synapses,
        ):
            for server in servers.values():
                server.stop()
            servers.clear()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    nginx_binary()  # fail early and loudly if nginx is missing
    s = Stack(tmp_path_factory.mktemp("e2e"))
    try:
        yield s
    finally:
        s.stop()


@dataclass(frozen=True)
class Target:
    """Where the clients of one test talk to."""

    mode: Mode
    via: Via
    url: str
    synapse: SynapseServer

    @property
    def filtering_upstream(self) -> bool:
        """Whether the homeserver itself already hides ignored senders."""
        return self.mode == "stock"


# Through the proxy: both homeserver modes, plain and behind each shipped nginx config.
PROXIED: list[tuple[Mode, Via]] = [
    ("stock", "proxy"),
    ("stock", "nginx-all"),
    ("no-ignore", "proxy"),
    ("no-ignore", "nginx-all"),
    ("no-ignore", "nginx-selected"),
]


def _target_id(param: tuple[Mode, Via]) -> str:
    return f"{param[0]}-{param[1]}"


@pytest.fixture(params=PROXIED, ids=_target_id)
def target(request: pytest.FixtureRequest, stack: Stack) -> Target:
    mode, via = request.param
    return Target(mode, via, stack.url(mode, via), stack.synapse(mode))


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=30.0) as client:
        yield client


@dataclass
class World:
    """alice, bob and charlie in one fresh room; alice may ignore bob."""

    target: Target
    http: httpx.AsyncClient
    alice: Actor
    bob: Actor
    charlie: Actor
    room_id: str
    actors: list[Actor] = field(default_factory=list)

    def actor(self, user: RegisteredUser, base_url: str | None = None) -> Actor:
        a = Actor(user, base_url or self.target.url, self.http, user.access_token, user.device_id)
        self.actors.append(a)
        return a


WorldFactory = Callable[..., Awaitable[World]]


@pytest.fixture
async def make_world(target: Target, http: httpx.AsyncClient) -> AsyncIterator[WorldFactory]:
    """Build a world: fresh users and room, so no state leaks between tests."""
    created: list[Actor] = []

    async def factory(*, alice_ignores_bob: bool = True) -> World:
        users = [
            await register_user(http, target.synapse, unique(name))
            for name in ("alice", "bob", "charlie")
        ]
        actors = [Actor(u, target.url, http, u.access_token, u.device_id) for u in users]
        created.extend(actors)
        alice, bob, charlie = actors
        room_id = await bob.create_room(name="e2e room", topic="before")
        await bob.invite(room_id, alice.user_id)
        await bob.invite(room_id, charlie.user_id)
        await alice.join(room_id)
        await charlie.join(room_id)
        if alice_ignores_bob:
            await alice.set_ignored([bob.user_id])
        world = World(target, http, alice, bob, charlie, room_id)
        world.actors = created
        return world

    yield factory
    for a in created:
        await a.close()


@pytest.fixture
async def world(make_world: WorldFactory) -> World:
    return await make_world()
