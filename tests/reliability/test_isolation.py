"""Isolation under load: 100 users with different ignore lists hit every filtered endpoint
at once through one proxy. No user gets an event of someone they ignore; nobody loses an
event they did not ignore. Once in process, once through the real command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from ..fake_homeserver import asgi_app, build_app
from ..servers import free_port, run_proxy
from .universe import ROOM, Universe, Verdict, check, events_in, token, uid

ClientFor = Callable[[str], httpx.AsyncClient]


async def hammer(
    universe: Universe, client_for: ClientFor, appservice: bool = False, full: bool = True
) -> dict[str, int]:
    """Every user, every filtered endpoint, all at once. Returns the figures."""
    rng = random.Random(1)
    figures = {"requests": 0, "events_checked": 0, "leaked": 0, "wrongly_removed": 0}
    problems: list[str] = []
    sent_events: dict[str, list[dict[str, Any]]] = {}

    async def one(
        i: int, client: httpx.AsyncClient, name: str, method: str, path: str, body: Any
    ) -> None:
        user = uid(i)
        params = {"user_id": user} if appservice else {}
        response = await client.request(method, path, json=body, params=params)
        figures["requests"] += 1
        assert response.status_code == 200, (user, name, response.status_code, response.text)
        if path not in sent_events:
            answer = universe.answer(httpx.Request(method, "http://hs.test" + path))
            sent_events[path] = events_in(json.loads(answer.content))
        sent = sent_events[path]
        verdict = check(universe, user, name, sent, response.json())
        figures["events_checked"] += len(sent)
        record(user, verdict)

    def record(user: str, verdict: Verdict) -> None:
        figures["leaked"] += len(verdict.leaked)
        figures["wrongly_removed"] += len(verdict.wrongly_removed)
        problems.extend(f"{user} leak {x}" for x in verdict.leaked)
        problems.extend(f"{user} lost {x}" for x in verdict.wrongly_removed)

    async def single(i: int, client: httpx.AsyncClient, event_id: str, path: str) -> None:
        user = uid(i)
        params = {"user_id": user} if appservice else {}
        response = await client.get(path, params=params)
        figures["requests"] += 1
        event = universe.by_id[event_id]
        hidden = event["sender"] in universe.ignores[user] and "state_key" not in event
        if hidden:
            if response.status_code != 404 or response.json().get("sender") != event["sender"]:
                record(user, Verdict(leaked=[f"single:{path}"]))
            else:
                assert response.json()["errcode"] == "M_SENDER_IGNORED"
        else:
            if response.status_code != 200:
                record(user, Verdict(wrongly_removed=[f"single:{path}:{response.status_code}"]))
            elif "/context/" not in path and response.json()["event_id"] != event_id:
                record(user, Verdict(wrongly_removed=[f"single:{path}"]))

    async def nearest(i: int, client: httpx.AsyncClient, ts: int, forward: bool) -> None:
        user = uid(i)
        params = {"ts": str(ts), "dir": "f" if forward else "b"}
        if appservice:
            params["user_id"] = user
        response = await client.get(
            f"/_matrix/client/v1/rooms/{ROOM}/timestamp_to_event", params=params
        )
        figures["requests"] += 1
        seen = [e for e in universe.messages if e["sender"] not in universe.ignores[user]]
        found = [
            e
            for e in seen
            if (e["origin_server_ts"] >= ts if forward else e["origin_server_ts"] <= ts)
        ]
        want = (found[0] if forward else found[-1])["event_id"] if found else None
        got = response.json().get("event_id") if response.status_code == 200 else None
        if got != want:
            by_ignored = got is not None and universe.by_id[got]["sender"] in universe.ignores[user]
            record(
                user,
                Verdict(leaked=[f"ts:{ts}:{got}"])
                if by_ignored
                else Verdict(wrongly_removed=[f"ts:{ts}:{want}"]),
            )

    clients = [client_for(token(i)) for i in range(universe.users)]
    jobs = []
    for i, client in enumerate(clients):
        for request in universe.requests():
            jobs.append(one(i, client, *request))
        if not full:
            continue
        for event_id, path in universe.single_event_paths(rng, uid(i)):
            jobs.append(single(i, client, event_id, path))
        for _ in range(2):
            jobs.append(
                nearest(i, client, rng.randrange(len(universe.messages)), rng.random() < 0.5)
            )
    rng.shuffle(jobs)
    try:
        await asyncio.gather(*jobs)
    finally:
        for client in clients:
            await client.aclose()
    assert not problems, problems[:20]
    return figures


@pytest.mark.slow
async def test_100_users_in_process() -> None:
    universe = Universe()
    # Every request at once, in one loop with the homeserver: a few hundred connections
    # (thousands of connects at once overflow its listen queue), and requests wait longer
    # than the default 10 s for one.
    app = build_app(universe.homeserver, limits_max_connections="256", timeouts_pool="120")

    def client(tok: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://proxy.test",
            headers={"Authorization": f"Bearer {tok}"},
        )

    figures = await hammer(universe, client)
    print("isolation in process:", figures)
    # one whoami and one list read per user, however many requests raced for them
    assert universe.homeserver.calls["whoami"] == universe.users


@pytest.mark.slow
async def test_100_users_through_an_appservice_token() -> None:
    universe = Universe(seed=9)
    universe.homeserver.appservice_token = "as-token"
    app = build_app(universe.homeserver, limits_max_connections="256", timeouts_pool="120")

    def client(_: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://proxy.test",
            headers={"Authorization": "Bearer as-token"},
        )

    figures = await hammer(universe, client, appservice=True)
    print("isolation appservice:", figures)


def serve_universe(seed: int, port: int) -> None:
    """The entry point of the upstream process (`python -c`)."""
    config = uvicorn.Config(
        asgi_app(Universe(seed=seed).homeserver),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        backlog=4096,
    )
    uvicorn.Server(config).run()


@contextlib.contextmanager
def universe_upstream(seed: int) -> Iterator[str]:
    """The fake homeserver in its own process, so that it does not share a GIL with the
    clients of the test."""
    port = free_port()
    code = (
        "from tests.reliability.test_isolation import serve_universe; "
        f"serve_universe({seed}, {port})"
    )
    process = subprocess.Popen([sys.executable, "-c", code])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(url + "/_matrix/client/versions")
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("upstream did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.slow
async def test_100_users_through_the_real_proxy() -> None:
    universe = Universe(seed=10)
    with universe_upstream(10) as upstream, run_proxy(upstream) as proxy:
        limits = httpx.Limits(max_connections=2)

        def client(tok: str) -> httpx.AsyncClient:
            return httpx.AsyncClient(
                base_url=proxy.url,
                headers={"Authorization": f"Bearer {tok}"},
                limits=limits,
                timeout=60,
            )

        figures = await hammer(universe, client, full=False)
    print("isolation real proxy:", figures)
