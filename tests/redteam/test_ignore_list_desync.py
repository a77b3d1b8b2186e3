"""The proxy's cached ignore list can fall behind the homeserver's.

A `/sync` answer computed before a `PUT` of the list, but read by the proxy after it,
carries the older list in `account_data`; `Proxy._respond_filtered` stores whatever a
sync answer carries (`IgnoreListStore.set`, no ordering against the PUT), so the PUT is
undone in the proxy until `ignore.list_ttl` (300 s) or the next sync that carries the
list. On a homeserver that does not filter (Conduit, or no-ignore Synapse), every other
endpoint then shows the newly ignored user, for every client of the user: a new
device's initial sync (seconds long on a big account) racing an "Ignore" click on the
phone is enough."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.fake_homeserver import (
    ALICE,
    BOB,
    CHARLIE,
    ROOM,
    FakeHomeserver,
    build_app,
    client_for,
    message,
)

SYNC = "/_matrix/client/v3/sync"
LIST = f"/_matrix/client/v3/user/{ALICE}/account_data/m.ignored_user_list"
MESSAGES = f"/_matrix/client/v3/rooms/{ROOM}/messages"
JSON_TYPE = {"content-type": "application/json"}


async def test_a_sync_answer_older_than_a_put_does_not_undo_it() -> None:
    hs = FakeHomeserver()
    hs.account_data[ALICE] = {"ignored_users": {}}
    # computed by the homeserver before the PUT: the list as it was then
    old_sync = {
        "next_batch": "s2",
        "account_data": {
            "events": [{"type": "m.ignored_user_list", "content": {"ignored_users": {}}}]
        },
        "rooms": {"join": {ROOM: {"timeline": {"events": [message("$c1", CHARLIE)]}}}},
    }
    hs.answers[("GET", "/sync")] = old_sync
    hs.answers[("GET", f"/rooms/{ROOM}/messages")] = {
        "chunk": [message("$b1", BOB, "bob after the ignore")],
        "start": "t1",
    }
    sync_started, gate = asyncio.Event(), asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/sync"):
            sync_started.set()
            await gate.wait()
        return hs(request)

    app = build_app(handler)
    async with client_for(app, "alice-token") as laptop, client_for(app, "alice-phone") as phone:
        initial_sync = asyncio.create_task(laptop.get(SYNC))  # a new device, slow
        await sync_started.wait()
        put = await phone.put(LIST, json={"ignored_users": {BOB: {}}})  # "Ignore bob"
        assert put.status_code == 200
        assert hs.account_data[ALICE] == {"ignored_users": {BOB: {}}}
        before = await phone.get(MESSAGES)
        assert "bob after the ignore" not in before.text  # the PUT took effect
        gate.set()
        assert (await initial_sync).status_code == 200
        page = await phone.get(MESSAGES)
    assert page.status_code == 200
    assert "bob after the ignore" not in page.text, page.text


async def test_a_put_under_another_path_user_still_updates_the_list() -> None:
    """Conduit (and grapevine) serve `PUT /user/{userId}/account_data/{type}` for the
    sender, never reading `{userId}` (`set_global_account_data_route` uses
    `body.sender_user`). `Proxy._remember_written_list` stores the list only when the
    path's user is the sender: alice's list changed on the homeserver, not in the
    proxy, until `ignore.list_ttl` or a sync that carries it."""
    hs = FakeHomeserver()
    hs.account_data[ALICE] = {"ignored_users": {}}
    hs.answers[("GET", f"/rooms/{ROOM}/messages")] = {
        "chunk": [message("$b1", BOB, "bob after the ignore")],
        "start": "t1",
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT" and "/account_data/" in request.url.path:
            user = hs.user_of(request)  # as Conduit: the sender's, whatever the path says
            assert user is not None
            hs.account_data[user] = json.loads(request.content)
            return httpx.Response(200, headers=JSON_TYPE, content=b"{}")
        return hs(request)

    app = build_app(handler)
    async with client_for(app, "alice-token") as alice:
        assert "bob after the ignore" in (await alice.get(MESSAGES)).text  # list loaded
        other = "/_matrix/client/v3/user/%40Alice%3Ahs/account_data/m.ignored_user_list"
        put = await alice.put(other, json={"ignored_users": {BOB: {}}})
        assert put.status_code == 200
        assert hs.account_data[ALICE] == {"ignored_users": {BOB: {}}}
        page = await alice.get(MESSAGES)
    assert "bob after the ignore" not in page.text, page.text
