"""ignore_lists.py: parsing, PUT validation and the per-user store."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable

import httpx
import msgspec
import pytest
import respx

from ignore_proxy.identity import Credentials
from ignore_proxy.ignore_lists import (
    IgnoreListStore,
    IgnoreListUnavailable,
    PutRejection,
    account_data_path,
    parse_ignored_users,
    parse_ignored_users_json,
    validate_put_body,
)

from .conftest import Clock, gated

ALICE = "@alice:hs.test"
BOB = "@bob:hs.test"
EVE = "@eve:evil.test"
MALLORY = "@mallory:evil.test"
ALICE_PATH = "/_matrix/client/v3/user/%40alice%3Ahs.test/account_data/m.ignored_user_list"
BOB_PATH = "/_matrix/client/v3/user/%40bob%3Ahs.test/account_data/m.ignored_user_list"


def content(*users: str) -> dict[str, object]:
    return {"ignored_users": {u: {} for u in users}}


@pytest.fixture
def store(client: httpx.AsyncClient, clock: Clock) -> IgnoreListStore:
    return IgnoreListStore(client, ttl=60.0, max_users=100, retry_after=5.0, timer=clock)


# --- parse_ignored_users ------------------------------------------------------------------


def test_parse_reads_the_keys() -> None:
    assert parse_ignored_users(content(EVE, MALLORY)) == {EVE, MALLORY}


def test_parse_skips_keys_that_are_not_user_ids() -> None:
    assert parse_ignored_users(content(EVE, "eve", "@:x", "")) == {EVE}


@pytest.mark.parametrize(
    "bad", [{"ignored_users": [EVE]}, {"ignored_users": EVE}, {}, [EVE], None, "x"]
)
def test_parse_non_object_means_nobody_and_logs_no_contents(
    bad: object, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert parse_ignored_users(bad) == frozenset()
    assert caplog.records
    assert "eve" not in caplog.text


@pytest.mark.parametrize(
    "text",
    [
        b'{"ignored_users": {"@eve:evil.test": {}, "eve": 1, "@m:x": null}, "other": 1}',
        b'{"ignored_users": {"@eve:evil.test": {}}, "ignored_users": {}}',
        b'{"ignored_users": ["@eve:evil.test"]}',
        b'{"ignored_users": "@eve:evil.test"}',
        b"{}",
        b'["@eve:evil.test"]',
        b"null",
    ],
)
def test_parse_json_reads_as_the_decoded_content_does(text: bytes) -> None:
    assert parse_ignored_users_json(text) == parse_ignored_users(json.loads(text))


def test_parse_json_refuses_what_is_not_json() -> None:
    with pytest.raises(msgspec.DecodeError):
        parse_ignored_users_json(b'{"ignored_users": {')


# --- validate_put_body --------------------------------------------------------------------


def test_put_valid() -> None:
    result = validate_put_body(b'{"ignored_users": {"@eve:evil.test": {}}}', ALICE)
    assert result == frozenset({EVE})


def test_put_empty_object_is_msc3391_delete() -> None:
    assert validate_put_body(b"{}", ALICE) == frozenset()


def test_put_empty_list_and_extra_keys_are_fine() -> None:
    assert validate_put_body(b'{"ignored_users": {}, "x": 1}', ALICE) == frozenset()


@pytest.mark.parametrize(
    ("body", "errcode"),
    [
        (b"", "M_BAD_JSON"),
        (b"{not json", "M_BAD_JSON"),
        (b'{"ignored_users": NaN}', "M_BAD_JSON"),
        (b"\xff\xfe", "M_BAD_JSON"),
        (b"[]", "M_BAD_JSON"),
        (b'"ignored_users"', "M_BAD_JSON"),
        (b'{"other": {}}', "M_BAD_JSON"),
        (b'{"ignored_users": null}', "M_BAD_JSON"),
        (b'{"ignored_users": ["@eve:evil.test"]}', "M_BAD_JSON"),
        (b'{"ignored_users": {"eve": {}}}', "M_INVALID_PARAM"),
        (b'{"ignored_users": {"@eve": {}}}', "M_INVALID_PARAM"),
        (b'{"ignored_users": {"@eve:evil.test": {}, "@alice:hs.test": {}}}', "M_INVALID_PARAM"),
    ],
)
def test_put_rejections(body: bytes, errcode: str) -> None:
    result = validate_put_body(body, ALICE)
    assert isinstance(result, PutRejection)
    assert result.errcode == errcode
    assert result.error


def test_ignoring_yourself_says_so() -> None:
    result = validate_put_body(b'{"ignored_users": {"@alice:hs.test": {}}}', ALICE)
    assert result == PutRejection("M_INVALID_PARAM", "You cannot ignore yourself.")


# --- IgnoreListStore ----------------------------------------------------------------------


def test_path_is_percent_encoded() -> None:
    assert account_data_path(ALICE) == ALICE_PATH
    # historical user IDs may hold "/" or "?": they must stay inside one path segment
    assert account_data_path("@a/b?c:hs.test").startswith(
        "/_matrix/client/v3/user/%40a%2Fb%3Fc%3Ahs.test/"
    )


async def test_first_need_loads_with_the_callers_credentials(
    upstream: respx.MockRouter, store: IgnoreListStore
) -> None:
    route = upstream.get(ALICE_PATH).respond(200, json=content(EVE))
    assert store.current(ALICE) == frozenset()
    await store.ensure_fresh(ALICE, Credentials("tok"))
    assert store.current(ALICE) == {EVE}
    request = route.calls.last.request
    assert request.url.raw_path == ALICE_PATH.encode()
    assert request.headers["authorization"] == "Bearer tok"
    assert not request.url.params
    await store.ensure_fresh(ALICE, Credentials("tok"))
    assert route.call_count == 1


async def test_404_means_nobody_ignored(upstream: respx.MockRouter, store: IgnoreListStore) -> None:
    upstream.get(ALICE_PATH).respond(404, json={"errcode": "M_NOT_FOUND"})
    await store.ensure_fresh(ALICE, Credentials("tok"))
    assert store.current(ALICE) == frozenset()
    assert store.failures == 0


async def test_non_object_ignored_users_means_nobody(
    upstream: respx.MockRouter, store: IgnoreListStore
) -> None:
    upstream.get(ALICE_PATH).respond(200, json={"ignored_users": [EVE]})
    await store.ensure_fresh(ALICE, Credentials("tok"))
    assert store.current(ALICE) == frozenset()


async def test_two_devices_of_one_user_share_the_list(
    upstream: respx.MockRouter, store: IgnoreListStore
) -> None:
    route = upstream.get(ALICE_PATH).respond(200, json=content(EVE))
    await store.ensure_fresh(ALICE, Credentials("phone"))
    await store.ensure_fresh(ALICE, Credentials("laptop"))
    assert route.call_count == 1
    store.set(ALICE, frozenset({MALLORY}))  # the phone PUTs a new list
    assert store.current(ALICE) == {MALLORY}  # the laptop sees it at once


async def test_appservice_acting_for_two_users_gets_two_lists(
    upstream: respx.MockRouter, store: IgnoreListStore
) -> None:
    alice_route = upstream.get(ALICE_PATH).respond(200, json=content(EVE))
    bob_route = upstream.get(BOB_PATH).respond(200, json=content(MALLORY))
    await store.ensure_fresh(ALICE, Credentials("as", ALICE, "DEV"))
    await store.ensure_fresh(BOB, Credentials("as", BOB))
    assert store.current(ALICE) == {EVE}
    assert store.current(BOB) == {MALLORY}
    assert alice_route.calls.last.request.url.params["user_id"] == ALICE
    assert bob_route.calls.last.request.url.params["user_id"] == BOB


async def test_concurrent_first_requests_make_one_read(
    upstream: respx.MockRouter, store: IgnoreListStore
) -> None:
    gate, answer = gated(httpx.Response(200, json=content(EVE)))
    route = upstream.get(ALICE_PATH).mock(side_effect=answer)
    pending = asyncio.gather(
        *(store.ensure_fresh(ALICE, Credentials(f"tok{i % 3}")) for i in range(100))
    )
    for _ in range(5):
        await asyncio.sleep(0)
    gate.set()
    await pending
    assert route.call_count == 1
    assert store.loads == 1
    assert store.current(ALICE) == {EVE}


async def test_ttl_re_read(
    upstream: respx.MockRouter, store: IgnoreListStore, clock: Clock
) -> None:
    route = upstream.get(ALICE_PATH)
    route.side_effect = [
        httpx.Response(200, json=content(EVE)),
        httpx.Response(200, json=content(MALLORY)),
    ]
    await store.ensure_fresh(ALICE, Credentials("tok"))
    clock.now += 59
    await store.ensure_fresh(ALICE, Credentials("tok"))
    assert route.call_count == 1
    clock.now += 2
    await store.ensure_fresh(ALICE, Credentials("tok"))
    assert route.call_count == 2
    assert store.current(ALICE) == {MALLORY}


async def test_set_resets_the_ttl_clock(
    upstream: respx.MockRouter, store: IgnoreListStore, clock: Clock
) -> None:
    route = upstream.get(ALICE_PATH).respond(200, json=content(EVE))
    await store.ensure_fresh(ALICE, Credentials("tok"))
    clock.now += 50
    store.set(ALICE, frozenset({MALLORY}))
    clock.now += 50  # 100 s after the read, 50 s after the set
    await store.ensure_fresh(ALICE, Credentials("tok"))
    assert route.call_count == 1
    assert store.current(ALICE) == {MALLORY}


FAILURES = [
    httpx.Response(500),
    httpx.Response(502, text="<html>bad gateway</html>"),
    httpx.Response(200, text="not json"),
    httpx.ConnectError("down"),
    httpx.ReadTimeout("slow"),
]


@pytest.mark.parametrize("failure", FAILURES)
async def test_failure_keeps_the_last_known_list_even_stale(
    upstream: respx.MockRouter,
    store: IgnoreListStore,
    clock: Clock,
    failure: httpx.Response | Exception,
) -> None:
    route = upstream.get(ALICE_PATH)
    route.side_effect = [httpx.Response(200, json=content(EVE)), failure]
    await store.ensure_fresh(ALICE, Credentials("tok"))
    clock.now += 61
    await store.ensure_fresh(ALICE, Credentials("tok"))  # does not raise
    assert store.current(ALICE) == {EVE}
    assert store.failures == 1
    assert route.call_count == 2


@pytest.mark.parametrize("failure", FAILURES)
async def test_failure_without_a_last_known_list_raises(
    upstream: respx.MockRouter, store: IgnoreListStore, failure: httpx.Response | Exception
) -> None:
    route = upstream.get(ALICE_PATH)
    route.side_effect = [failure, httpx.Response(200, json=content(EVE))]
    with pytest.raises(IgnoreListUnavailable):
        await store.ensure_fresh(ALICE, Credentials("tok"))
    assert store.failures == 1
    assert store.current(ALICE) == frozenset()
    await store.ensure_fresh(ALICE, Credentials("tok"))  # the failure was not cached
    assert store.current(ALICE) == {EVE}


@pytest.mark.parametrize("status", [401, 403])
async def test_rejected_token_is_unavailable_and_not_cached(
    upstream: respx.MockRouter, store: IgnoreListStore, status: int
) -> None:
    route = upstream.get(ALICE_PATH)
    route.side_effect = [
        httpx.Response(status, json={"errcode": "M_UNKNOWN_TOKEN"}),
        httpx.Response(200, json=content(EVE)),
    ]
    with pytest.raises(IgnoreListUnavailable) as info:
        await store.ensure_fresh(ALICE, Credentials("dead"))
    assert info.value.status == status
    assert "dead" not in str(info.value)
    await store.ensure_fresh(ALICE, Credentials("alive"))
    assert store.current(ALICE) == {EVE}
    assert route.call_count == 2


async def test_a_caller_joining_a_read_with_a_revoked_token_reads_with_its_own(
    upstream: respx.MockRouter, store: IgnoreListStore
) -> None:
    """Two devices of one user: the first one's token was revoked elsewhere; the second,
    which joined its read, is not refused for it."""
    gate, refused = gated(httpx.Response(401, json={"errcode": "M_UNKNOWN_TOKEN"}))

    def answer(request: httpx.Request) -> httpx.Response | Awaitable[httpx.Response]:
        if request.headers["authorization"] == "Bearer revoked":
            return refused(request)
        return httpx.Response(200, json=content(EVE))

    route = upstream.get(ALICE_PATH).mock(side_effect=answer)
    first = asyncio.ensure_future(store.ensure_fresh(ALICE, Credentials("revoked")))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(store.ensure_fresh(ALICE, Credentials("phone")))
    await asyncio.sleep(0)
    gate.set()
    with pytest.raises(IgnoreListUnavailable):
        await first
    await second
    assert store.current(ALICE) == {EVE}
    assert route.call_count == 2


async def test_after_a_failure_the_stale_list_is_retried_later_not_at_once(
    upstream: respx.MockRouter, store: IgnoreListStore, clock: Clock
) -> None:
    route = upstream.get(ALICE_PATH)
    route.side_effect = [
        httpx.Response(200, json=content(EVE)),
        httpx.Response(503),
        httpx.Response(200, json=content(MALLORY)),
    ]
    await store.ensure_fresh(ALICE, Credentials("tok"))
    clock.now += 61
    await store.ensure_fresh(ALICE, Credentials("tok"))
    clock.now += 4
    await store.ensure_fresh(ALICE, Credentials("tok"))
    assert route.call_count == 2
    clock.now += 2
    await store.ensure_fresh(ALICE, Credentials("tok"))
    assert route.call_count == 3
    assert store.current(ALICE) == {MALLORY}


async def test_a_load_older_than_set_does_not_overwrite_it(
    upstream: respx.MockRouter, store: IgnoreListStore
) -> None:
    gate, answer = gated(httpx.Response(200, json=content(EVE)))
    upstream.get(ALICE_PATH).mock(side_effect=answer)
    loading = asyncio.create_task(store.ensure_fresh(ALICE, Credentials("tok")))
    await asyncio.sleep(0.01)
    store.set(ALICE, frozenset({MALLORY}))  # a PUT through the proxy finished meanwhile
    gate.set()
    await loading
    assert store.current(ALICE) == {MALLORY}


async def test_a_failed_load_older_than_set_neither_raises_nor_throttles(
    upstream: respx.MockRouter, store: IgnoreListStore, clock: Clock
) -> None:
    gate, answer = gated(httpx.Response(500))
    route = upstream.get(ALICE_PATH).mock(side_effect=answer)
    loading = asyncio.create_task(store.ensure_fresh(ALICE, Credentials("tok")))
    await asyncio.sleep(0.01)
    store.set(ALICE, frozenset({MALLORY}))
    gate.set()
    await loading
    assert store.current(ALICE) == {MALLORY}
    clock.now += 30  # the set() keeps it fresh for the full ttl
    await store.ensure_fresh(ALICE, Credentials("tok"))
    assert route.call_count == 1


async def test_a_request_after_forget_does_not_join_the_older_load(
    upstream: respx.MockRouter, store: IgnoreListStore
) -> None:
    gate, answer = gated(httpx.Response(200, json=content(EVE)))
    route = upstream.get(ALICE_PATH).mock(side_effect=answer)
    loading = asyncio.create_task(store.ensure_fresh(ALICE, Credentials("tok")))
    await asyncio.sleep(0.01)
    store.forget(ALICE)
    later = asyncio.create_task(store.ensure_fresh(ALICE, Credentials("tok")))
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(loading, later)
    assert route.call_count == 2
    assert store.current(ALICE) == {EVE}


async def test_cancelled_waiter_does_not_break_the_others(
    upstream: respx.MockRouter, store: IgnoreListStore
) -> None:
    gate, answer = gated(httpx.Response(200, json=content(EVE)))
    route = upstream.get(ALICE_PATH).mock(side_effect=answer)
    first = asyncio.create_task(store.ensure_fresh(ALICE, Credentials("tok")))
    others = [asyncio.create_task(store.ensure_fresh(ALICE, Credentials("tok"))) for _ in range(3)]
    await asyncio.sleep(0.01)
    first.cancel()
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*others)
    assert first.cancelled()
    assert route.call_count == 1
    assert store.current(ALICE) == {EVE}


async def test_bounded_by_max_users(upstream: respx.MockRouter, client: httpx.AsyncClient) -> None:
    upstream.get(url__regex=r"/account_data/m\.ignored_user_list$").respond(200, json=content(EVE))
    store = IgnoreListStore(client, ttl=60.0, max_users=10)
    for i in range(50):
        await store.ensure_fresh(f"@u{i}:hs.test", Credentials(f"t{i}"))
    assert len(store) == 10
    assert store.current("@u49:hs.test") == {EVE}
    assert store.current("@u0:hs.test") == frozenset()


async def test_own_user_id_is_never_in_the_list(
    upstream: respx.MockRouter, store: IgnoreListStore
) -> None:
    # continuwuity and Dendrite accept self-ignores; filtering them would hide one's own events
    upstream.get(ALICE_PATH).respond(200, json=content(EVE, ALICE))
    await store.ensure_fresh(ALICE, Credentials("tok"))
    assert store.current(ALICE) == {EVE}
    store.set(ALICE, frozenset({ALICE, MALLORY}))
    assert store.current(ALICE) == {MALLORY}


async def test_hits_and_misses_are_counted() -> None:
    client = httpx.AsyncClient(
        base_url="http://hs.test",
        transport=httpx.MockTransport(
            lambda _: httpx.Response(404, json={"errcode": "M_NOT_FOUND"})
        ),
    )
    store = IgnoreListStore(client, ttl=60, max_users=10)
    creds = Credentials("t")
    await store.ensure_fresh("@a:hs", creds)
    await store.ensure_fresh("@a:hs", creds)
    await store.ensure_fresh("@a:hs", creds)
    assert (store.misses, store.hits, store.loads) == (1, 2, 1)
    await client.aclose()


def test_an_answer_asked_for_before_the_last_write_does_not_undo_it(
    store: IgnoreListStore, clock: Clock
) -> None:
    asked_before = store.now()
    clock.now += 1
    store.set(ALICE, frozenset({BOB}))  # a PUT through the proxy
    store.set(ALICE, frozenset(), asked_at=asked_before)  # a slow sync's old list
    assert store.current(ALICE) == frozenset({BOB})
    clock.now += 1
    store.set(ALICE, frozenset({EVE}), asked_at=store.now())  # asked for after it: taken
    assert store.current(ALICE) == frozenset({EVE})


def test_a_siblings_change_counts_as_a_write(store: IgnoreListStore, clock: Clock) -> None:
    asked_before = store.now()
    clock.now += 1
    store.forget(ALICE)
    store.set(ALICE, frozenset(), asked_at=asked_before)
    assert not store.known(ALICE)  # read again, never the old list taken for current


async def test_a_read_superseded_by_forget_is_read_again_not_taken_for_empty(
    upstream: respx.MockRouter, store: IgnoreListStore
) -> None:
    # Another instance (or worker) says alice's list changed while it is being read: the
    # waiting request reads it again rather than find nothing and filter nobody.
    gate, answer = gated(httpx.Response(200, json=content(EVE)))
    route = upstream.get(ALICE_PATH).mock(side_effect=answer)
    loading = asyncio.create_task(store.ensure_fresh(ALICE, Credentials("tok")))
    await asyncio.sleep(0.01)
    store.forget(ALICE)
    gate.set()
    await loading
    assert route.call_count == 2
    assert store.current(ALICE) == {EVE}


async def test_a_read_superseded_again_and_again_is_unavailable(
    upstream: respx.MockRouter, store: IgnoreListStore
) -> None:
    reads = 0

    async def answer(request: httpx.Request) -> httpx.Response:
        nonlocal reads
        reads += 1
        store.forget(ALICE)  # a change heard during every read
        return httpx.Response(200, json=content(EVE))

    upstream.get(ALICE_PATH).mock(side_effect=answer)
    with pytest.raises(IgnoreListUnavailable):
        await store.ensure_fresh(ALICE, Credentials("tok"))
    assert reads == 3


async def test_forget_all_drops_every_list_and_the_reads_in_flight(
    upstream: respx.MockRouter, store: IgnoreListStore, clock: Clock
) -> None:
    store.set(BOB, frozenset({EVE}))
    gate, answer = gated(httpx.Response(200, json=content(EVE)))
    route = upstream.get(ALICE_PATH).mock(side_effect=answer)
    loading = asyncio.create_task(store.ensure_fresh(ALICE, Credentials("tok")))
    await asyncio.sleep(0.01)
    clock.now += 1  # asked for after bob's own write: only forget_all makes it too old
    asked_before = store.now()
    clock.now += 1
    store.forget_all()
    assert not store.known(BOB)
    gate.set()
    await loading
    assert route.call_count == 2  # the read begun before was not taken
    store.set(BOB, frozenset(), asked_at=asked_before)  # nor an answer asked for before
    assert not store.known(BOB)


async def test_limited_freshness_shortens_the_lists_held_and_new_ones(
    upstream: respx.MockRouter, store: IgnoreListStore, clock: Clock
) -> None:
    route = upstream.get(ALICE_PATH).respond(200, json=content(EVE))
    await store.ensure_fresh(ALICE, Credentials("tok"))  # fresh for 60 s
    store.limit_freshness(5.0)
    clock.now += 6
    await store.ensure_fresh(ALICE, Credentials("tok"))
    assert route.call_count == 2
    clock.now += 6  # read under the limit: 5 s too
    await store.ensure_fresh(ALICE, Credentials("tok"))
    assert route.call_count == 3
    store.limit_freshness(None)
    clock.now += 6  # the one read under the limit keeps its 5 s
    await store.ensure_fresh(ALICE, Credentials("tok"))
    assert route.call_count == 4
    clock.now += 30  # read after it: the full 60 s again
    await store.ensure_fresh(ALICE, Credentials("tok"))
    assert route.call_count == 4


def test_every_write_is_told_a_sync_only_when_the_list_differs(store: IgnoreListStore) -> None:
    told: list[str] = []
    store.on_change.append(told.append)
    store.set(ALICE, frozenset({EVE}))
    store.set(ALICE, frozenset({EVE}))  # the same list again: another instance may differ
    store.set(ALICE, frozenset({EVE}), asked_at=store.now() + 1)
    assert told == [ALICE, ALICE]
