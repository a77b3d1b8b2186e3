"""The proxy's rules in one process (`proxy.py` and its handlers): a scripted homeserver
that filters nothing, the proxy as production assembles it, and clients of several users."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from .fake_homeserver import (
    ALICE,
    BOB,
    CHARLIE,
    DAVE,
    ROOM,
    FakeHomeserver,
    build_app,
    client_for,
    client_path,
    message,
    state,
)

SYNC = "/_matrix/client/v3/sync"


def sync_body(*events: dict[str, Any], account_data: list[Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "next_batch": "s2",
        "rooms": {
            "join": {
                ROOM: {"timeline": {"events": list(events), "limited": False, "prev_batch": "p1"}}
            }
        },
    }
    if account_data is not None:
        body["account_data"] = {"events": account_data}
    return body


def timeline(response: httpx.Response) -> list[str]:
    events = response.json()["rooms"]["join"][ROOM]["timeline"]["events"]
    return [event["event_id"] for event in events]


@pytest.fixture
def homeserver() -> FakeHomeserver:
    hs = FakeHomeserver()
    hs.ignore(ALICE, BOB)
    hs.answers[("GET", "/sync")] = sync_body(
        message("$a1", ALICE), message("$b1", BOB), state("$b2", BOB), message("$c1", CHARLIE)
    )
    return hs


async def test_sync_hides_ignored_senders_but_keeps_their_state(homeserver: FakeHomeserver) -> None:
    app = build_app(homeserver)
    async with client_for(app, "alice-token") as alice, client_for(app, "charlie-token") as charlie:
        assert timeline(await alice.get(SYNC)) == ["$a1", "$b2", "$c1"]
        response = await charlie.get(SYNC)
        assert timeline(response) == ["$a1", "$b1", "$b2", "$c1"]
        assert response.json()["next_batch"] == "s2"


async def test_user_who_ignores_nobody_gets_the_bytes_upstream_sent(
    homeserver: FakeHomeserver, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = (
        b'{"chunk": [ {"sender": "@bob:hs", "type": "m.room.message", "event_id": "$1"} ],  "x":1}'
    )
    homeserver.answers[("GET", f"/rooms/{ROOM}/messages")] = raw

    async def never_read(*_: object) -> bytes:
        raise AssertionError("read a body that needed no filtering")

    monkeypatch.setattr("ignore_proxy.calls.read_body", never_read)
    app = build_app(homeserver)
    async with client_for(app, "charlie-token") as charlie:
        response = await charlie.get(f"/_matrix/client/v3/rooms/{ROOM}/messages")
    assert response.content == raw


FILTERED, REFUSED = 200, 400


@pytest.mark.parametrize(
    ("path", "outcome"),
    [
        ("/_matrix/client/r0/sync", FILTERED),
        ("/_matrix/client/unstable/sync", FILTERED),
        ("/_matrix/client/unstable/org.matrix.msc3575/sync", FILTERED),
        # Homeservers would not serve these as /sync, a lenient one or a normalising
        # proxy in front would: the proxy cannot tell which, so it refuses.
        ("/_matrix/client/v3/sync/", REFUSED),
        ("//_matrix//client/v3//sync", REFUSED),
        ("/_matrix/client/v3/%73ync", REFUSED),
        ("/_matrix/client/V3/SYNC", REFUSED),
        ("/_matrix/client/v3/rooms/%2e%2E/sync", REFUSED),
        ("/_matrix/client/v3%2Fsync", REFUSED),
    ],
)
async def test_path_variants_are_filtered_or_refused(
    homeserver: FakeHomeserver, path: str, outcome: int
) -> None:
    def any_sync(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=sync_body(message("$b1", BOB), message("$c1", CHARLIE)))

    del homeserver.answers[("GET", "/sync")]
    homeserver.fallback = any_sync
    app = build_app(homeserver)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://proxy.test") as client:
        # Sent as raw bytes so that httpx does not normalise the path.
        url = httpx.URL("http://proxy.test").copy_with(
            raw_path=path.encode() + b"?access_token=alice-token"
        )
        response = await client.get(url)
    # The fake homeserver answers every spelling; none may carry bob's message.
    assert response.status_code == outcome, response.text
    assert "$b1" not in response.text
    if outcome == FILTERED:
        assert "$c1" in response.text
    else:
        assert response.json()["errcode"] == "M_UNRECOGNIZED"
        assert not homeserver.requests, "a refused request must not reach the homeserver"


async def test_lookups_do_not_wait_for_connections_held_by_forwarded_requests(
    homeserver: FakeHomeserver,
) -> None:
    """As many requests in flight as upstream connections (parked long-polls), each of a
    token the proxy has not seen: their answers wait for whoami and the list, which must
    not wait for the connections those answers hold."""
    arrived: list[httpx.Request] = []
    all_arrived = asyncio.Event()

    async def held_sync(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/sync"):
            arrived.append(request)
            if len(arrived) == 2:
                all_arrived.set()
            await asyncio.wait_for(all_arrived.wait(), 5)
        return homeserver(request)

    app = build_app(held_sync, limits_max_connections="2", timeouts_pool="2")
    async with client_for(app, "alice-token") as laptop, client_for(app, "alice-phone") as phone:
        answers = await asyncio.gather(laptop.get(SYNC), phone.get(SYNC))
    for response in answers:
        assert response.status_code == 200, response.text
        assert timeline(response) == ["$a1", "$b2", "$c1"]


async def test_a_list_forgotten_while_the_homeserver_answers_is_read_again(
    homeserver: FakeHomeserver,
) -> None:
    """With several workers, a list changed through another one is forgotten here while a
    long-poll waits: the answer must get the new list, never none at all."""
    homeserver.account_data.clear()  # nobody ignored yet
    gate = asyncio.Event()

    async def held_sync(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/sync"):
            await gate.wait()
        return homeserver(request)

    app = build_app(held_sync)
    async with client_for(app, "alice-token") as alice:
        poll = asyncio.create_task(alice.get(SYNC))
        while not app.ignore_lists.known(ALICE):  # noqa: ASYNC110 (the store signals nothing)
            await asyncio.sleep(0.01)
        homeserver.ignore(ALICE, BOB)  # written through the other worker...
        app.ignore_lists.forget(ALICE)  # ...which told this one
        gate.set()
        response = await poll
    assert timeline(response) == ["$a1", "$b2", "$c1"]


async def test_token_in_query_string_is_the_same_user(homeserver: FakeHomeserver) -> None:
    app = build_app(homeserver)
    async with client_for(app) as anonymous:
        response = await anonymous.get(SYNC, params={"access_token": "alice-token"})
    assert timeline(response) == ["$a1", "$b2", "$c1"]


async def test_ignore_list_put_through_the_proxy_applies_at_once_to_every_device(
    homeserver: FakeHomeserver,
) -> None:
    homeserver.account_data.clear()
    app = build_app(homeserver)
    async with client_for(app, "alice-token") as laptop, client_for(app, "alice-phone") as phone:
        assert "$b1" in timeline(await phone.get(SYNC))
        put = await laptop.put(
            f"/_matrix/client/v3/user/{ALICE}/account_data/m.ignored_user_list",
            json={"ignored_users": {BOB: {}}},
        )
        assert put.status_code == 200
        reads = homeserver.calls["account_data"]
        assert "$b1" not in timeline(await phone.get(SYNC))
        assert homeserver.calls["account_data"] == reads  # learned from the PUT, not re-read
        # Un-ignoring shows bob again.
        await laptop.put(
            "/_matrix/client/r0/user/%40alice%3Ahs/account_data/m.ignored_user_list",
            json={"ignored_users": {}},
        )
        assert "$b1" in timeline(await phone.get(SYNC))


async def test_ignore_list_delete_form_of_msc3391(homeserver: FakeHomeserver) -> None:
    app = build_app(homeserver)
    async with client_for(app, "alice-token") as alice:
        assert "$b1" not in timeline(await alice.get(SYNC))
        response = await alice.delete(
            f"/_matrix/client/unstable/org.matrix.msc3391/user/{ALICE}/account_data/m.ignored_user_list"
        )
        assert response.status_code == 200
        assert "$b1" in timeline(await alice.get(SYNC))


@pytest.mark.parametrize(
    ("body", "errcode"),
    [
        (b"not json", "M_BAD_JSON"),
        (b'{"ignored_users": []}', "M_BAD_JSON"),
        (b'{"other": 1}', "M_BAD_JSON"),
        (b'{"ignored_users": {"bob": {}}}', "M_INVALID_PARAM"),
        (b'{"ignored_users": {"@alice:hs": {}}}', "M_INVALID_PARAM"),
    ],
)
async def test_bad_ignore_list_writes_are_refused_and_not_forwarded(
    homeserver: FakeHomeserver, body: bytes, errcode: str
) -> None:
    app = build_app(homeserver)
    async with client_for(app, "alice-token") as alice:
        response = await alice.put(
            f"/_matrix/client/v3/user/{ALICE}/account_data/m.ignored_user_list", content=body
        )
    assert response.status_code == 400
    assert response.json()["errcode"] == errcode
    assert homeserver.calls["account_data_write"] == 0


async def test_write_rejected_upstream_changes_nothing(homeserver: FakeHomeserver) -> None:
    app = build_app(homeserver)
    async with client_for(app, "alice-token") as alice:
        # Alice tries to write charlie's list: the homeserver says no.
        response = await alice.put(
            f"/_matrix/client/v3/user/{CHARLIE}/account_data/m.ignored_user_list",
            json={"ignored_users": {DAVE: {}}},
        )
        assert response.status_code == 403
    async with client_for(app, "charlie-token") as charlie:
        assert "$b1" in timeline(await charlie.get(SYNC))
    async with client_for(app, "alice-token") as alice:
        assert "$b1" not in timeline(await alice.get(SYNC))


async def test_a_write_whose_author_is_unknown_makes_the_paths_list_be_read_again(
    homeserver: FakeHomeserver,
) -> None:
    homeserver.account_data.clear()

    def whoami_down(request: httpx.Request) -> httpx.Response:
        token = request.headers.get("authorization", "")
        if request.url.path.endswith("/account/whoami") and token.endswith("alice-phone"):
            return httpx.Response(503, json={"errcode": "M_UNKNOWN", "error": "busy"})
        return homeserver(request)

    app = build_app(whoami_down)
    async with client_for(app, "alice-token") as laptop, client_for(app, "alice-phone") as phone:
        assert "$b1" in timeline(await laptop.get(SYNC))  # nobody ignored, and known so
        put = await phone.put(  # stored; whose token it was, the proxy cannot learn
            f"/_matrix/client/v3/user/{ALICE}/account_data/m.ignored_user_list",
            json={"ignored_users": {BOB: {}}},
        )
        assert put.status_code == 200
        assert "$b1" not in timeline(await laptop.get(SYNC))


async def test_ignore_list_from_sync_account_data_applies_to_that_same_response(
    homeserver: FakeHomeserver,
) -> None:
    homeserver.account_data.clear()
    ignored_now = {"type": "m.ignored_user_list", "content": {"ignored_users": {BOB: {}}}}
    homeserver.answers[("GET", "/sync")] = sync_body(
        message("$b1", BOB), message("$c1", CHARLIE), account_data=[ignored_now]
    )
    app = build_app(homeserver)
    async with client_for(app, "alice-token") as alice:
        assert timeline(await alice.get(SYNC)) == ["$c1"]
        homeserver.answers[("GET", "/sync")] = sync_body(message("$b3", BOB))
        assert timeline(await alice.get(SYNC)) == []


async def test_concurrent_first_requests_cost_one_whoami_and_one_list_read(
    homeserver: FakeHomeserver,
) -> None:
    app = build_app(homeserver)
    async with client_for(app, "alice-token") as alice:
        responses = await asyncio.gather(*(alice.get(SYNC) for _ in range(100)))
    assert all(timeline(r) == ["$a1", "$b2", "$c1"] for r in responses)
    assert homeserver.calls["whoami"] == 1
    assert homeserver.calls["account_data"] == 1


async def test_appservice_acting_for_two_users_gets_each_users_list(
    homeserver: FakeHomeserver,
) -> None:
    homeserver.ignore(DAVE, CHARLIE)
    app = build_app(homeserver)
    async with client_for(app, "as-token") as appservice:
        as_alice = await appservice.get(SYNC, params={"user_id": ALICE})
        as_dave = await appservice.get(SYNC, params={"user_id": DAVE})
    assert timeline(as_alice) == ["$a1", "$b2", "$c1"]
    assert timeline(as_dave) == ["$a1", "$b1", "$b2"]


async def test_unavailable_list_refuses_rather_than_leaks(homeserver: FakeHomeserver) -> None:
    homeserver.account_data_status = 500
    app = build_app(homeserver)
    async with client_for(app, "alice-token") as alice:
        response = await alice.get(SYNC)
    assert response.status_code == 503
    assert response.json()["errcode"] == "M_UNKNOWN"
    assert "retry-after" in response.headers
    unavailable = app.metrics.registry.get_sample_value(
        "ignore_proxy_ignore_list_unavailable_total"
    )
    assert unavailable == 1

    passing = build_app(homeserver, ignore_on_unavailable="pass")
    async with client_for(passing, "alice-token") as alice:
        assert "$b1" in timeline(await alice.get(SYNC))


@pytest.mark.parametrize("errcode", ["M_SENDER_IGNORED", "UK.TIMEDOUT.MSC4406.SENDER_IGNORED"])
async def test_single_event_of_ignored_sender_is_404_with_sender(
    homeserver: FakeHomeserver, errcode: str
) -> None:
    homeserver.answers[("GET", f"/rooms/{ROOM}/event/$b1")] = message("$b1", BOB)
    homeserver.answers[("GET", f"/rooms/{ROOM}/event/$b2")] = state("$b2", BOB)
    homeserver.answers[("GET", "/events/$b1")] = message("$b1", BOB)
    app = build_app(homeserver, ignore_errcode=errcode)
    async with client_for(app, "alice-token") as alice:
        for path in (f"/_matrix/client/v3/rooms/{ROOM}/event/$b1", "/_matrix/client/v3/events/$b1"):
            response = await alice.get(path)
            assert response.status_code == 404
            assert response.json() == {
                "errcode": errcode,
                "error": "You have ignored the user that sent this event",
                "sender": BOB,
            }
        kept = await alice.get(f"/_matrix/client/v3/rooms/{ROOM}/event/$b2")
        assert kept.status_code == 200 and kept.json()["event_id"] == "$b2"


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, {"errcode": "UK.TIMEDOUT.MSC4406.SENDER_IGNORED", "error": "x", "sender": BOB}),
        (404, {"errcode": "M_SENDER_IGNORED", "error": "x", "sender": BOB}),
        (403, {"errcode": "m_sender_ignored", "error": "x", "sender": BOB}),
    ],
)
async def test_homeservers_own_sender_ignored_answer_is_normalised(
    homeserver: FakeHomeserver, status: int, body: dict[str, Any]
) -> None:
    homeserver.answers[("GET", f"/rooms/{ROOM}/event/$b1")] = lambda _: httpx.Response(
        status, json=body
    )
    app = build_app(homeserver)
    async with client_for(app, "alice-token") as alice:
        response = await alice.get(f"/_matrix/client/v3/rooms/{ROOM}/event/$b1")
    assert response.status_code == 404
    assert response.json()["errcode"] == "M_SENDER_IGNORED"
    assert response.json()["sender"] == BOB


async def test_other_errors_pass_unchanged(homeserver: FakeHomeserver) -> None:
    app = build_app(homeserver)
    async with client_for(app, "alice-token") as alice:
        response = await alice.get(f"/_matrix/client/v3/rooms/{ROOM}/event/$missing")
    assert response.status_code == 404
    assert response.json()["errcode"] == "M_UNRECOGNIZED"


async def test_relations_of_an_ignored_parent_is_404(homeserver: FakeHomeserver) -> None:
    homeserver.answers[("GET", f"/rooms/{ROOM}/event/$b1")] = message("$b1", BOB)
    homeserver.answers[("GET", f"/rooms/{ROOM}/event/$c1")] = message("$c1", CHARLIE)
    relations = {"chunk": [message("$r1", BOB), message("$r2", CHARLIE)], "next_batch": "n"}
    for parent in ("$b1", "$c1"):
        for suffix in ("", "/m.thread", "/m.thread/m.room.message"):
            homeserver.answers[("GET", f"/rooms/{ROOM}/relations/{parent}{suffix}")] = relations
    app = build_app(homeserver)
    async with client_for(app, "alice-token") as alice:
        for suffix in ("", "/m.thread", "/m.thread/m.room.message"):
            hidden = await alice.get(f"/_matrix/client/v1/rooms/{ROOM}/relations/$b1{suffix}")
            assert hidden.status_code == 404
            assert hidden.json()["sender"] == BOB
            shown = await alice.get(f"/_matrix/client/v1/rooms/{ROOM}/relations/$c1{suffix}")
            assert [e["event_id"] for e in shown.json()["chunk"]] == ["$r2"]
            assert shown.json()["next_batch"] == "n"


async def test_timestamp_to_event_steps_past_ignored_senders(homeserver: FakeHomeserver) -> None:
    timeline_events = [
        message("$c0", CHARLIE, origin_server_ts=100),
        message("$b1", BOB, origin_server_ts=200),
        message("$b2", BOB, origin_server_ts=300),
        message("$c3", CHARLIE, origin_server_ts=400),
    ]
    for event in timeline_events:
        homeserver.answers[("GET", f"/rooms/{ROOM}/event/{event['event_id']}")] = event

    def nearest(request: httpx.Request) -> httpx.Response:
        ts = int(request.url.params["ts"])
        forward = request.url.params.get("dir", "f") == "f"
        candidates = [
            e
            for e in timeline_events
            if (e["origin_server_ts"] >= ts if forward else e["origin_server_ts"] <= ts)
        ]
        if not candidates:
            return httpx.Response(404, json={"errcode": "M_NOT_FOUND", "error": "none"})
        event = candidates[0] if forward else candidates[-1]
        return httpx.Response(
            200, json={"event_id": event["event_id"], "origin_server_ts": event["origin_server_ts"]}
        )

    homeserver.answers[("GET", f"/rooms/{ROOM}/timestamp_to_event")] = nearest
    app = build_app(homeserver)
    path = f"/_matrix/client/v1/rooms/{ROOM}/timestamp_to_event"
    async with client_for(app, "alice-token") as alice, client_for(app, "charlie-token") as charlie:
        forward = await alice.get(path, params={"ts": 150, "dir": "f"})
        assert forward.json() == {"event_id": "$c3", "origin_server_ts": 400}
        backward = await alice.get(path, params={"ts": 350, "dir": "b"})
        assert backward.json() == {"event_id": "$c0", "origin_server_ts": 100}
        unfiltered = await charlie.get(path, params={"ts": 150, "dir": "f"})
        assert unfiltered.json()["event_id"] == "$b1"
        homeserver.ignore(ALICE, BOB, CHARLIE)
        app.ignore_lists.set(ALICE, frozenset({BOB, CHARLIE}))
        none_left = await alice.get(path, params={"ts": 150, "dir": "f"})
        assert none_left.status_code == 404


async def test_versions_advertise_msc4406(homeserver: FakeHomeserver) -> None:
    app = build_app(homeserver)
    async with client_for(app) as anonymous:
        response = await anonymous.get("/_matrix/client/versions")
    features = response.json()["unstable_features"]
    assert features["uk.timedout.msc4406"] is True
    assert features["a"] is True


async def test_messages_keeps_pagination_when_everything_is_removed(
    homeserver: FakeHomeserver,
) -> None:
    homeserver.answers[("GET", f"/rooms/{ROOM}/messages")] = {
        "chunk": [message("$b1", BOB)],
        "start": "t1",
        "end": "t2",
        "state": [state("$s", BOB)],
    }
    app = build_app(homeserver)
    async with client_for(app, "alice-token") as alice:
        body = (await alice.get(f"/_matrix/client/v3/rooms/{ROOM}/messages")).json()
    assert body == {"chunk": [], "start": "t1", "end": "t2", "state": [state("$s", BOB)]}


async def test_upstream_token_rejection_forgets_the_token(homeserver: FakeHomeserver) -> None:
    app = build_app(homeserver)
    async with client_for(app, "alice-token") as alice:
        await alice.get(SYNC)
        del homeserver.tokens["alice-token"]
        homeserver.tokens["alice-token"] = CHARLIE  # the same token string, another user now
        homeserver.answers[("GET", "/sync")] = lambda _: httpx.Response(
            401, json={"errcode": "M_UNKNOWN_TOKEN", "error": "gone"}
        )
        assert (await alice.get(SYNC)).status_code == 401
        homeserver.answers[("GET", "/sync")] = sync_body(message("$b1", BOB))
        assert timeline(await alice.get(SYNC)) == ["$b1"]  # charlie's view: nothing ignored


async def test_malformed_answer_on_filtered_endpoint_is_502_not_a_leak(
    homeserver: FakeHomeserver,
) -> None:
    homeserver.answers[("GET", "/sync")] = (
        b'{"rooms": {"join": {"!r": {"timeline": {"events": [{"sender": "@bob:hs"'
    )
    app = build_app(homeserver)
    async with client_for(app, "alice-token") as alice:
        response = await alice.get(SYNC)
    assert response.status_code == 502
    assert response.json()["errcode"] == "M_UNKNOWN"
    assert "@bob" not in response.text


async def test_thread_summary_points_at_the_latest_reply_of_someone_not_ignored(
    homeserver: FakeHomeserver,
) -> None:
    root = message("$root", CHARLIE)
    replies = [message("$r3", BOB), message("$r2", CHARLIE), message("$r1", BOB)]  # newest first
    root["unsigned"] = {
        "m.relations": {
            "m.thread": {"latest_event": replies[0], "count": 3, "current_user_participated": False}
        }
    }
    homeserver.answers[("GET", "/sync")] = sync_body(root)
    homeserver.answers[("GET", f"/rooms/{ROOM}/messages")] = {"chunk": [root], "start": "s"}
    homeserver.answers[("GET", f"/rooms/{ROOM}/relations/$root/m.thread")] = {"chunk": replies}
    app = build_app(homeserver)
    async with client_for(app, "alice-token") as alice:
        synced = (await alice.get(SYNC)).json()["rooms"]["join"][ROOM]["timeline"]["events"][0]
        paged = (await alice.get(f"/_matrix/client/v3/rooms/{ROOM}/messages")).json()["chunk"][0]
    for event in (synced, paged):
        thread = event["unsigned"]["m.relations"]["m.thread"]
        assert thread["latest_event"]["event_id"] == "$r2"
        assert thread["count"] == 1
        assert thread["current_user_participated"] is False


async def test_thread_of_only_ignored_replies_loses_its_summary(
    homeserver: FakeHomeserver,
) -> None:
    root = message("$root", CHARLIE)
    root["unsigned"] = {
        "m.relations": {"m.thread": {"latest_event": message("$r1", BOB), "count": 1}}
    }
    homeserver.answers[("GET", "/sync")] = sync_body(root)
    homeserver.answers[("GET", f"/rooms/{ROOM}/relations/$root/m.thread")] = {
        "chunk": [message("$r1", BOB)]
    }
    app = build_app(homeserver)
    async with client_for(app, "alice-token") as alice:
        event = (await alice.get(SYNC)).json()["rooms"]["join"][ROOM]["timeline"]["events"][0]
    assert "m.relations" not in event["unsigned"]
    assert event["event_id"] == "$root"


def invite_sync(room_id: str, inviter: str) -> dict[str, Any]:
    member = {"type": "m.room.member", "sender": inviter, "state_key": ALICE,
              "content": {"membership": "invite"}}  # fmt: skip
    return {
        "next_batch": "s3",
        "rooms": {"invite": {room_id: {"invite_state": {"events": [member]}}}},
    }


@pytest.mark.parametrize("reject", [False, True])
async def test_invites_from_ignored_users_vanish_and_may_be_rejected(
    homeserver: FakeHomeserver, reject: bool
) -> None:
    homeserver.answers[("GET", "/sync")] = invite_sync("!bobs:hs", BOB)
    homeserver.answers[("POST", "/rooms/!bobs:hs/leave")] = {}
    app = build_app(homeserver, ignore_reject_invites="true" if reject else "false")
    async with client_for(app, "alice-token") as alice:
        for _ in range(3):
            assert (await alice.get(SYNC)).json()["rooms"]["invite"] == {}
        await asyncio.sleep(0.05)
    leaves = [r for r in homeserver.requests if r.url.path.endswith("/leave")]
    assert len(leaves) == (1 if reject else 0)
    if reject:
        assert leaves[0].headers["authorization"] == "Bearer alice-token"
        assert "/rooms/%21bobs%3Ahs/leave" in leaves[0].url.raw_path.decode()
    homeserver.answers[("GET", "/sync")] = invite_sync("!charlies:hs", CHARLIE)
    async with client_for(app, "alice-token") as alice:
        assert "!charlies:hs" in (await alice.get(SYNC)).json()["rooms"]["invite"]


@pytest.mark.parametrize(
    ("method", "path", "phone_forgotten"),
    [
        ("POST", "/_matrix/client/v3/logout", False),
        ("POST", "/_matrix/client/v3/logout/all", True),
        ("DELETE", "/_matrix/client/v3/devices/PHONE", True),
        ("POST", "/_matrix/client/v3/delete_devices", True),
        ("POST", "/_matrix/client/r0/account/password", True),
    ],
)
async def test_logout_and_device_changes_forget_cached_tokens(
    homeserver: FakeHomeserver, method: str, path: str, phone_forgotten: bool
) -> None:
    homeserver.answers[(method, client_path(path))] = {}
    app = build_app(homeserver)
    async with client_for(app, "alice-token") as laptop, client_for(app, "alice-phone") as phone:
        await laptop.get(SYNC)
        await phone.get(SYNC)
        assert homeserver.calls["whoami"] == 2
        assert (await laptop.request(method, path, json={})).status_code == 200
        # The homeserver hands both token strings to charlie now: a stale mapping would
        # keep applying alice's list to them.
        homeserver.tokens.update({"alice-token": CHARLIE, "alice-phone": CHARLIE})
        assert "$b1" in timeline(await laptop.get(SYNC))
        assert ("$b1" in timeline(await phone.get(SYNC))) is phone_forgotten


async def test_a_401_on_any_endpoint_forgets_the_token(homeserver: FakeHomeserver) -> None:
    app = build_app(homeserver)
    async with client_for(app, "alice-token") as alice:
        await alice.get(SYNC)
        homeserver.tokens["alice-token"] = CHARLIE  # revoked, and the string reused
        homeserver.answers[("GET", "/pushrules/")] = lambda _: httpx.Response(
            401, json={"errcode": "M_UNKNOWN_TOKEN", "error": "gone"}
        )
        assert (await alice.get("/_matrix/client/v3/pushrules/")).status_code == 401
        assert "$b1" in timeline(await alice.get(SYNC))


async def test_event_lookups_that_fail_refuse_rather_than_answer_unchecked(
    homeserver: FakeHomeserver,
) -> None:
    broken = lambda _: httpx.Response(500, json={"errcode": "M_UNKNOWN", "error": "db"})  # noqa: E731
    homeserver.answers[("GET", f"/rooms/{ROOM}/event/$b1")] = broken
    homeserver.answers[("GET", f"/rooms/{ROOM}/relations/$b1")] = {"chunk": []}
    homeserver.answers[("GET", f"/rooms/{ROOM}/timestamp_to_event")] = {
        "event_id": "$b1", "origin_server_ts": 5
    }  # fmt: skip
    app = build_app(homeserver)
    async with client_for(app, "alice-token") as alice:
        relations = await alice.get(f"/_matrix/client/v1/rooms/{ROOM}/relations/$b1")
        nearest = await alice.get(
            f"/_matrix/client/v1/rooms/{ROOM}/timestamp_to_event", params={"ts": 1, "dir": "f"}
        )
    for response in (relations, nearest):
        assert response.status_code == 502
        assert response.json()["errcode"] == "M_UNKNOWN"
        assert "$b1" not in response.text


async def test_a_path_whose_encoded_slash_changes_the_endpoint_is_refused(
    homeserver: FakeHomeserver,
) -> None:
    """Read with `%2F` as data it is the global initialSync; as a separator, a room's."""
    homeserver.fallback = lambda _: httpx.Response(
        200, json={"messages": {"chunk": [message("$b1", BOB)]}, "state": []}
    )
    app = build_app(homeserver)
    raw = b"/_matrix/client/r0%2Frooms%2F!room:hs/initialSync"
    async with client_for(app, "alice-token") as alice:
        response = await alice.get(httpx.URL("http://proxy.test").copy_with(raw_path=raw))
    assert response.status_code == 400
    assert response.json()["errcode"] == "M_UNRECOGNIZED"
    assert not [r for r in homeserver.requests if b"initialSync" in r.url.raw_path]
