"""identity.py: who a request's credentials belong to."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest
import respx

from ignore_proxy.identity import (
    WHOAMI_PATH,
    Credentials,
    CredentialsRefused,
    IdentityResolver,
    IdentityUnavailable,
    credentials_from_request,
)
from ignore_proxy.ids import is_user_id

from .conftest import Clock, gated

ALICE = "@alice:hs.test"
BOB = "@bob:hs.test"


def make_resolver(client: httpx.AsyncClient, clock: Clock, **kw: int | float) -> IdentityResolver:
    args: dict[str, int | float] = {"max_size": 100, "ttl": 60.0, "negative_ttl": 10.0}
    args.update(kw)
    return IdentityResolver(client, timer=clock, **args)  # type: ignore[arg-type]


def whoami_by_token(tokens: dict[str, str]) -> Callable[[httpx.Request], httpx.Response]:
    """A whoami that knows some tokens; an appservice token honours ?user_id=."""

    def answer(request: httpx.Request) -> httpx.Response:
        auth = request.headers.get("authorization", "")
        user = tokens.get(auth.removeprefix("Bearer "))
        if user is None:
            return httpx.Response(401, json={"errcode": "M_UNKNOWN_TOKEN", "error": "no"})
        user = request.url.params.get("user_id", user)
        return httpx.Response(200, json={"user_id": user, "device_id": "D"})

    return answer


# --- credentials_from_request ------------------------------------------------------------


def test_bearer_header() -> None:
    raw = [(b"Authorization", b"Bearer tok1")]
    assert credentials_from_request(raw, b"") == Credentials("tok1", None, None)


def test_bearer_scheme_is_case_insensitive() -> None:
    # Synapse refuses any spelling but `Bearer`, the others take this token: never another.
    assert credentials_from_request([(b"authorization", b"bEaReR tok1")], b"") == Credentials(
        "tok1"
    )


def test_query_token() -> None:
    assert credentials_from_request([], b"access_token=tok2&limit=3") == Credentials("tok2")
    assert credentials_from_request([], b"access%5Ftoken=tok2") == Credentials("tok2")


def test_no_credentials_at_all_is_none() -> None:
    assert credentials_from_request([], b"limit=3") is None
    assert credentials_from_request([(b"x-access-token", b"t")], b"") is None


def refused(headers: list[tuple[bytes, bytes]], query: bytes) -> tuple[int, str]:
    with pytest.raises(CredentialsRefused) as caught:
        credentials_from_request(headers, query)
    return caught.value.status, caught.value.errcode


MISSING = (401, "M_MISSING_TOKEN")
INVALID = (400, "M_INVALID_PARAM")


@pytest.mark.parametrize(
    ("headers", "query", "why"),
    [
        # Conduit falls back to the query when the header is not Bearer; Synapse refuses
        # both together; the others take the header: three readings, three users.
        ([(b"authorization", b"Bearer head")], b"access_token=qry", MISSING),
        ([(b"authorization", b"Basic eDp5")], b"access_token=qry", MISSING),
        ([(b"authorization", b"Bearer head")], b"access_token=", MISSING),
        ([(b"authorization", b"Bearer head")], b"access_token", MISSING),
        # continuwuity takes the first of two headers, Synapse refuses them
        ([(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")], b"", MISSING),
        ([(b"authorization", b"Basic eDp5")], b"", MISSING),
        ([(b"authorization", b"Bearer")], b"", MISSING),
        ([(b"authorization", b"Bearer  two-spaces")], b"", MISSING),
        ([(b"authorization", b"Bearer a b")], b"", MISSING),
        ([(b"authorization", "Bearer t\u00e9".encode("latin-1"))], b"access_token=q", MISSING),
        ([(b"authorization", "Bearer t\u00e9".encode())], b"", MISSING),
        ([], b"access_token=a%20b", MISSING),
        ([], b"access_token=a+b", MISSING),
        ([], b"access_token=a%0Ab", MISSING),
        ([], b"access_token=", MISSING),
        ([], b"access_token=%C3%A9", MISSING),
        ([], b"access_token=%FF", INVALID),
        ([], b"access_token=one&access_token=two", INVALID),
        # Twisted splits at `;`, Rust servers do not, Go drops the item
        ([], b"limit=1;access_token=tok", INVALID),
        ([], b"access_token=tok;x=1", INVALID),
        ([(b"authorization", b"Bearer t")], b"a=1;user_id=%40b%3Ahs", INVALID),
        ([(b"authorization", b"Bearer t")], b"user_id=%FF", INVALID),
        ([(b"authorization", b"Bearer t")], b"user_id=%40a%3Ahs;x", INVALID),
        ([(b"authorization", b"Bearer t")], b"device_id=%FF", INVALID),
        ([(b"authorization", b"Bearer t")], b"org.matrix.msc3202.device_id=%FE%FF", INVALID),
        ([(b"authorization", b"Bearer t")], b"user_id=%40a%3Ahs&user_id=%40b%3Ahs", INVALID),
        ([(b"authorization", b"Bearer t")], b"user_id=%40a%3Ahs&user%5Fid=%40b%3Ahs", INVALID),
        ([(b"authorization", b"Bearer t")], b"device_id=A&org.matrix.msc3202.device_id=B", INVALID),
    ],
)
def test_credentials_a_homeserver_could_read_otherwise_are_refused(
    headers: list[tuple[bytes, bytes]], query: bytes, why: tuple[int, str]
) -> None:
    assert refused(headers, query) == why


def test_appservice_parameters() -> None:
    creds = credentials_from_request(
        [(b"authorization", b"Bearer as_tok")], b"user_id=%40alice%3Ahs.test&device_id=DEV"
    )
    assert creds == Credentials("as_tok", ALICE, "DEV")
    unstable = credentials_from_request(
        [(b"authorization", b"Bearer as_tok")], b"org.matrix.msc3202.device_id=DEV2"
    )
    assert unstable == Credentials("as_tok", None, "DEV2")


def test_semicolons_elsewhere_in_the_query_are_harmless() -> None:
    creds = credentials_from_request([], b"access_token=tok&filter=a;b")
    assert creds == Credentials("tok")


def test_raw_non_ascii_in_unrelated_parameters_is_harmless() -> None:
    creds = credentials_from_request([(b"authorization", b"Bearer tok")], "q=caf\u00e9".encode())
    assert creds == Credentials("tok")


def test_repr_never_shows_the_token() -> None:
    assert "sekrit" not in repr(Credentials("sekrit", ALICE, "DEV"))


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (ALICE, True),
        ("@a:hs.test:8448", True),
        ("alice:hs.test", False),
        ("@:hs.test", False),
        ("@alice", False),
        ("@alice:", False),
        # Odd characters a harasser may choose, which homeservers deliver: ignorable.
        ("@al ice:hs.test", True),
        ("@alice:hs.test\n", True),
        ("@b\u00adob:evil.example", True),
        ("@" + "a" * 250 + ":hs.t", False),
    ],
)
def test_is_user_id(value: str, ok: bool) -> None:
    assert is_user_id(value) is ok


# --- IdentityResolver --------------------------------------------------------------------


async def test_resolve_sends_credentials_and_caches(
    upstream: respx.MockRouter, client: httpx.AsyncClient, clock: Clock
) -> None:
    route = upstream.get(WHOAMI_PATH).mock(side_effect=whoami_by_token({"tok": ALICE}))
    resolver = make_resolver(client, clock)
    assert await resolver.resolve(Credentials("tok")) == ALICE
    assert await resolver.resolve(Credentials("tok")) == ALICE
    assert route.call_count == 1
    request = route.calls.last.request
    assert request.headers["authorization"] == "Bearer tok"
    assert "access_token" not in request.url.params
    assert (resolver.lookups, resolver.hits, resolver.misses) == (1, 1, 1)


async def test_ttl_expiry_looks_up_again(
    upstream: respx.MockRouter, client: httpx.AsyncClient, clock: Clock
) -> None:
    route = upstream.get(WHOAMI_PATH).mock(side_effect=whoami_by_token({"tok": ALICE}))
    resolver = make_resolver(client, clock, ttl=60.0)
    await resolver.resolve(Credentials("tok"))
    clock.now += 59
    await resolver.resolve(Credentials("tok"))
    assert route.call_count == 1
    clock.now += 2
    assert await resolver.resolve(Credentials("tok")) == ALICE
    assert route.call_count == 2


async def test_appservice_acting_for_two_users(
    upstream: respx.MockRouter, client: httpx.AsyncClient, clock: Clock
) -> None:
    route = upstream.get(WHOAMI_PATH).mock(side_effect=whoami_by_token({"as": "@bridge:hs.test"}))
    resolver = make_resolver(client, clock)
    as_alice = Credentials("as", ALICE, "DEV")
    as_bob = Credentials("as", BOB, None)
    assert await resolver.resolve(as_alice) == ALICE
    assert await resolver.resolve(as_bob) == BOB
    assert await resolver.resolve(Credentials("as")) == "@bridge:hs.test"
    assert len(resolver) == 3
    assert route.call_count == 3
    params = route.calls[0].request.url.params
    assert (params["user_id"], params["device_id"]) == (ALICE, "DEV")
    assert "device_id" not in route.calls[1].request.url.params


async def test_concurrent_first_requests_make_one_whoami(
    upstream: respx.MockRouter, client: httpx.AsyncClient, clock: Clock
) -> None:
    gate, slow = gated(whoami_by_token({"tok": ALICE}))
    route = upstream.get(WHOAMI_PATH).mock(side_effect=slow)
    resolver = make_resolver(client, clock)
    pending = asyncio.gather(*(resolver.resolve(Credentials("tok")) for _ in range(100)))
    for _ in range(5):
        await asyncio.sleep(0)
    gate.set()
    assert await pending == [ALICE] * 100
    assert route.call_count == 1
    assert resolver.lookups == 1


async def test_cancelled_waiter_does_not_cancel_the_lookup(
    upstream: respx.MockRouter, client: httpx.AsyncClient, clock: Clock
) -> None:
    gate, slow = gated(whoami_by_token({"tok": ALICE}))
    route = upstream.get(WHOAMI_PATH).mock(side_effect=slow)
    resolver = make_resolver(client, clock)
    first = asyncio.create_task(resolver.resolve(Credentials("tok")))
    others = [asyncio.create_task(resolver.resolve(Credentials("tok"))) for _ in range(3)]
    await asyncio.sleep(0.01)
    first.cancel()
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*others) == [ALICE] * 3
    assert first.cancelled()
    assert route.call_count == 1


async def test_lookup_completes_and_caches_when_every_waiter_is_cancelled(
    upstream: respx.MockRouter, client: httpx.AsyncClient, clock: Clock
) -> None:
    gate, slow = gated(whoami_by_token({"tok": ALICE}))
    route = upstream.get(WHOAMI_PATH).mock(side_effect=slow)
    resolver = make_resolver(client, clock)
    waiter = asyncio.create_task(resolver.resolve(Credentials("tok")))
    await asyncio.sleep(0.01)
    waiter.cancel()
    gate.set()
    await asyncio.sleep(0.01)
    assert await resolver.resolve(Credentials("tok")) == ALICE
    assert route.call_count == 1


async def test_invalid_token_is_negatively_cached_then_expires(
    upstream: respx.MockRouter, client: httpx.AsyncClient, clock: Clock
) -> None:
    route = upstream.get(WHOAMI_PATH).mock(side_effect=whoami_by_token({}))
    resolver = make_resolver(client, clock, negative_ttl=10.0)
    assert await resolver.resolve(Credentials("bad")) is None
    assert await resolver.resolve(Credentials("bad")) is None
    assert route.call_count == 1
    clock.now += 11
    assert await resolver.resolve(Credentials("bad")) is None
    assert route.call_count == 2


@pytest.mark.parametrize("status", [400, 403])
async def test_refused_appservice_user_is_none(
    upstream: respx.MockRouter, client: httpx.AsyncClient, clock: Clock, status: int
) -> None:
    upstream.get(WHOAMI_PATH).respond(status, json={"errcode": "M_FORBIDDEN"})
    resolver = make_resolver(client, clock)
    assert await resolver.resolve(Credentials("as", "@outside:hs.test")) is None


async def test_negative_cache_is_bounded_under_many_invalid_tokens(
    upstream: respx.MockRouter, client: httpx.AsyncClient, clock: Clock
) -> None:
    route = upstream.get(WHOAMI_PATH).respond(401, json={"errcode": "M_UNKNOWN_TOKEN"})
    resolver = make_resolver(client, clock, negative_max_size=100)
    tokens = [f"bad{i}" for i in range(10_000)]
    for token in tokens:
        assert await resolver.resolve(Credentials(token)) is None
    assert resolver.negative_entries <= 100
    assert len(resolver) == 0
    assert route.call_count == 10_000  # one per distinct token, never more
    for token in tokens[-100:]:  # the most recent ones are still known to be bad
        assert await resolver.resolve(Credentials(token)) is None
    assert route.call_count == 10_000


@pytest.mark.parametrize(
    "effect",
    [
        httpx.Response(500),
        httpx.Response(429, json={"errcode": "M_LIMIT_EXCEEDED"}),
        httpx.Response(200, text="not json"),
        httpx.Response(200, json={"user_id": "nobody"}),
        httpx.ConnectError("down"),
        httpx.ReadTimeout("slow"),
    ],
)
async def test_upstream_failure_raises_and_is_not_cached(
    upstream: respx.MockRouter,
    client: httpx.AsyncClient,
    clock: Clock,
    effect: httpx.Response | Exception,
) -> None:
    route = upstream.get(WHOAMI_PATH)
    route.side_effect = [effect, httpx.Response(200, json={"user_id": ALICE})]
    resolver = make_resolver(client, clock)
    with pytest.raises(IdentityUnavailable) as info:
        await resolver.resolve(Credentials("tok-secret"))
    assert "tok-secret" not in str(info.value)
    assert resolver.failures == 1
    assert await resolver.resolve(Credentials("tok-secret")) == ALICE
    assert route.call_count == 2


async def test_forget_token_drops_every_user_of_that_token(
    upstream: respx.MockRouter, client: httpx.AsyncClient, clock: Clock
) -> None:
    route = upstream.get(WHOAMI_PATH).mock(
        side_effect=whoami_by_token({"as": "@bridge:hs.test", "tok": ALICE})
    )
    resolver = make_resolver(client, clock)
    for creds in (Credentials("as", ALICE), Credentials("as", BOB), Credentials("tok")):
        await resolver.resolve(creds)
    resolver.forget_token("as")
    assert len(resolver) == 1
    await resolver.resolve(Credentials("tok"))
    assert route.call_count == 3
    await resolver.resolve(Credentials("as", BOB))
    assert route.call_count == 4


async def test_forget_user_drops_every_token_of_that_user(
    upstream: respx.MockRouter, client: httpx.AsyncClient, clock: Clock
) -> None:
    route = upstream.get(WHOAMI_PATH).mock(
        side_effect=whoami_by_token({"a1": ALICE, "a2": ALICE, "b1": BOB})
    )
    resolver = make_resolver(client, clock)
    for token in ("a1", "a2", "b1"):
        await resolver.resolve(Credentials(token))
    resolver.forget_user(ALICE)
    assert len(resolver) == 1
    await resolver.resolve(Credentials("b1"))
    assert route.call_count == 3
    await resolver.resolve(Credentials("a2"))
    assert route.call_count == 4


async def test_401_drops_other_cached_identities_of_the_token(
    upstream: respx.MockRouter, client: httpx.AsyncClient, clock: Clock
) -> None:
    route = upstream.get(WHOAMI_PATH)
    route.side_effect = [httpx.Response(200, json={"user_id": ALICE}), httpx.Response(401)]
    resolver = make_resolver(client, clock)
    assert await resolver.resolve(Credentials("as", ALICE)) == ALICE
    assert await resolver.resolve(Credentials("as", BOB)) is None
    assert len(resolver) == 0


async def test_forget_during_lookup_does_not_cache_the_answer(
    upstream: respx.MockRouter, client: httpx.AsyncClient, clock: Clock
) -> None:
    gate, slow = gated(httpx.Response(200, json={"user_id": ALICE}))
    route = upstream.get(WHOAMI_PATH).mock(side_effect=slow)
    resolver = make_resolver(client, clock)
    forgets: list[Callable[[], None]] = [
        lambda: resolver.forget_token("tok"),
        lambda: resolver.forget_user(ALICE),
    ]
    for forget in forgets:
        gate.clear()
        waiter = asyncio.create_task(resolver.resolve(Credentials("tok")))
        await asyncio.sleep(0.01)
        forget()  # e.g. POST /logout passing while the lookup is in flight
        gate.set()
        assert await waiter == ALICE
        assert len(resolver) == 0
    assert route.call_count == 2


async def test_reverse_indexes_stay_bounded_with_the_cache(
    upstream: respx.MockRouter, client: httpx.AsyncClient, clock: Clock
) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        token = request.headers["authorization"].removeprefix("Bearer ")
        return httpx.Response(200, json={"user_id": f"@{token}:hs.test"})

    upstream.get(WHOAMI_PATH).mock(side_effect=answer)
    resolver = make_resolver(client, clock, max_size=10, ttl=60.0)
    for i in range(100):
        await resolver.resolve(Credentials(f"u{i}"))
    assert len(resolver) == 10
    assert len(resolver._by_user) == 10
    assert len(resolver._by_token) == 10
    clock.now += 61
    await resolver.resolve(Credentials("fresh"))
    assert len(resolver._by_user) == len(resolver._by_token) == len(resolver) == 1


async def test_lookups_in_flight_are_bounded() -> None:
    in_flight = peak = 0

    async def whoami(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return httpx.Response(401, json={"errcode": "M_UNKNOWN_TOKEN", "error": "no"})

    client = httpx.AsyncClient(base_url="http://hs.test", transport=httpx.MockTransport(whoami))
    resolver = IdentityResolver(client, max_size=10, ttl=60, negative_ttl=60, max_concurrent=4)
    results = await asyncio.gather(*(resolver.resolve(Credentials(f"t{i}")) for i in range(40)))
    assert results == [None] * 40
    assert peak == 4
    assert resolver.lookups == 40
    await client.aclose()
