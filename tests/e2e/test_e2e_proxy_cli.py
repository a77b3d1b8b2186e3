"""The proxy's CLI, environment configuration and health endpoints, run for real."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from .conftest import Stack
from .harness.expect import SENDER_IGNORED_UNSTABLE
from .harness.matrix import CS, Actor, q, unique
from .harness.procs import free_port
from .harness.proxy import start_proxy
from .harness.synapse import register_user

pytestmark = pytest.mark.e2e


async def test_health_endpoints(stack: Stack, tmp_path: Path) -> None:
    proxy = stack.proxy("no-ignore")
    dead = start_proxy(tmp_path / "dead", f"http://127.0.0.1:{free_port()}")
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
            for url in (proxy.url, dead.url):
                live = await client.get(f"{url}/_ignore_proxy/health/live")
                assert live.status_code == 200, live.text
            ready = await client.get(f"{proxy.url}/_ignore_proxy/health/ready")
            assert ready.status_code == 200, ready.text
            # Upstream down: alive, but not ready.
            ready = await client.get(f"{dead.url}/_ignore_proxy/health/ready")
            assert ready.status_code >= 500, ready.text
            # And client requests get a Matrix-shaped error, not a hang.
            versions = await client.get(f"{dead.url}/_matrix/client/versions")
            assert versions.status_code in (502, 503, 504), versions.text
            assert "errcode" in versions.json()
    finally:
        dead.stop()


async def test_unstable_errcode_from_environment(stack: Stack, tmp_path: Path) -> None:
    synapse = stack.synapse("no-ignore")
    proxy = start_proxy(
        tmp_path / "proxy",
        synapse.url,
        {"IGNORE_PROXY_IGNORE_ERRCODE": SENDER_IGNORED_UNSTABLE},
    )
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            alice_u, bob_u = [
                await register_user(http, synapse, unique(n)) for n in ("alice", "bob")
            ]
            alice = Actor(alice_u, proxy.url, http, alice_u.access_token, alice_u.device_id)
            bob = Actor(bob_u, proxy.url, http, bob_u.access_token, bob_u.device_id)
            try:
                room = await bob.create_room(invite=[alice.user_id])
                await alice.join(room)
                await alice.set_ignored([bob.user_id])
                msg = await bob.send_text(room, "hi")
                resp = await alice.request("GET", f"{CS}/rooms/{q(room)}/event/{q(msg)}")
                assert resp.status_code == 404, resp.text
                assert resp.json()["errcode"] == SENDER_IGNORED_UNSTABLE
                assert resp.json()["sender"] == bob.user_id
            finally:
                await alice.close()
                await bob.close()
    finally:
        proxy.stop()


async def test_nginx_reuses_idle_upstream_connection(stack: Stack) -> None:
    """nginx keeps upstream connections to the proxy alive; after an idle gap longer than
    uvicorn's default keep-alive (5 s) a POST must not hit a closed connection (502)."""
    nginx = stack.nginx("no-ignore", "ignore-proxy-all-client.conf")
    login = {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": "nobody"},
        "password": "wrong",
    }
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        first = await client.post(f"{nginx.url}{CS}/login", json=login)
        assert first.status_code == 403, first.text
        await asyncio.sleep(6)
        second = await client.post(f"{nginx.url}{CS}/login", json=login)
        assert second.status_code == 403, second.text
