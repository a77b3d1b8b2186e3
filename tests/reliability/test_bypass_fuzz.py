"""Bypass fuzzing: generated spellings of every filtered path (letter case,
percent-encoding, repeated and trailing slashes, dot segments, `%2F`-joined segments,
every version prefix) and of who is asking (header, `?access_token=`, appservice
`user_id`). The upstream here is lenient: it serves the endpoint's events for any
spelling some homeserver could read as that endpoint. Invariant: for the user the
upstream served, the answer holds no non-state event of someone they ignore, and no
event of someone they do not ignore was removed."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, unquote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ignore_proxy.app import IgnoreProxyApp
from ignore_proxy.handlers import FilteredRead, TimestampToEvent
from ignore_proxy.routes import ROUTES

from ..fake_homeserver import build_app
from ..servers import stop_served_handlers
from .universe import ANCHOR, ROOM, Universe, check, events_in, token, uid

FILTERED = [r for r in ROUTES if isinstance(r.handler, FilteredRead)]
EVENT_IDS = [f"$m-{uid(i)}" for i in range(4)] + [f"$s-{uid(1)}", f"$m-{ANCHOR}"]
PARAMS = {
    "room_id": [ROOM],
    "event_id": EVENT_IDS,
    "rel_type": ["m.thread"],
    "event_type": ["m.room.message"],
}
VERSIONS = [
    ["r0"],
    ["v1"],
    ["v3"],
    ["unstable"],
    ["api", "v1"],
    ["V3"],
    ["R0"],
    ["unstable", "org.matrix.simplified_msc3575"],
    ["v3", "org.matrix.msc3391"],
    ["v2_alpha"],
]
SEPARATORS = [
    "/",
    "/",
    "/",
    "//",
    "///",
    "/./",
    "/%2e/",
    "/%2E/",
    "/zz/../",
    "/zz/%2e%2E/",
    "/zz/%2E./",
    "%2F",
    "%2f",
]
ENDINGS = ["", "", "/", "//", "/.", "/%2e", "/..", "/%2e%2e", "/zz"]
VERSIONISH = re.compile(r"^(r0|v\d+|unstable|v\d+_alpha)$", re.IGNORECASE)
ALL_IGNORES = {uid(0): {uid(1)}, uid(1): set(), uid(2): {uid(3), uid(0)}, uid(3): {uid(1), ANCHOR}}


# --- what a lenient homeserver could read a raw path as ----------------------------------


def _normalise(parts: list[str]) -> list[str]:
    out: list[str] = []
    for part in parts:
        if part in ("", "."):
            continue
        if part == "..":
            if out:
                out.pop()
            continue
        out.append(part)
    return out


def lenient_match(method: str, raw_path: str) -> tuple[Any, dict[str, str]] | None:
    readings = [[unquote(p) for p in raw_path.split("/")], unquote(raw_path).split("/")]
    for parts in readings:
        segs = _normalise(parts)
        if [s.lower() for s in segs[:2]] != ["_matrix", "client"]:
            continue
        rests: list[list[str]] = [segs[2:]] if len(segs) == 3 else []
        i = 2
        if len(segs) > 3 and segs[2].lower() == "api" and segs[3].lower() == "v1":
            i = 4
        elif len(segs) > 2 and VERSIONISH.match(segs[2]):
            i = 3
        if i > 2:
            rests.append(segs[i:])
            if len(segs) > i and "." in segs[i]:
                rests.append(segs[i + 1 :])
        for rest in rests:
            for route in FILTERED:
                if route.method != method or len(rest) < len(route.segments):
                    continue
                if len(rest) > len(route.segments) and not route.open_ended:
                    continue  # Synapse serves what follows an open-ended pattern too
                params: dict[str, str] = {}
                for want, got in zip(route.segments, rest, strict=False):
                    if want.startswith("{"):
                        params[want[1:-1]] = got
                    elif want.lower() != got.lower():
                        break
                else:
                    return route, params
    return None


def canonical(route: Any, params: dict[str, str]) -> str:
    path = "/".join(params.get(s[1:-1], s) if s.startswith("{") else s for s in route.segments)
    return "/_matrix/client/v3/" + path


# --- spellings -----------------------------------------------------------------------------


@st.composite
def spelled(draw: st.DrawFn, text: str, literal: bool, plain: bool = False) -> str:
    out = []
    for ch in text:
        how = draw(st.sampled_from("kkkkcuL")) if (ch.isalnum() or literal) and not plain else "k"
        if ch in "$!:@" and draw(st.booleans()):
            how = draw(st.sampled_from("uL"))
        if how == "c" and literal:
            out.append(ch.swapcase())
        elif how == "u":
            out.append(f"%{ord(ch):02X}")
        elif how == "L":
            out.append(f"%{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


@st.composite
def fuzzed_request(draw: st.DrawFn) -> tuple[str, str, dict[str, str], str]:
    route = draw(st.sampled_from(FILTERED))
    version = draw(st.sampled_from(VERSIONS))
    segments = [("_matrix", True), ("client", True), *((v, True) for v in version)]
    for seg in route.segments:
        if seg.startswith("{"):
            segments.append((draw(st.sampled_from(PARAMS[seg[1:-1]])), False))
        else:
            segments.append((seg, True))
    # Half the paths are spelled as clients spell them (variables may be encoded): those
    # must be served and filtered; the others mostly get refused as ambiguous.
    plain = draw(st.booleans())
    raw = "/" if plain else draw(st.sampled_from(["/", "/", "//", "/./", "/zz/../"]))
    for n, (seg, literal) in enumerate(segments):
        if n:
            raw += "/" if plain else draw(st.sampled_from(SEPARATORS))
        raw += draw(spelled(seg, literal, plain and literal))
    raw += "" if plain else draw(st.sampled_from(ENDINGS))
    # who asks, and how
    user = draw(st.integers(0, 3))
    how = draw(st.sampled_from(["header", "query", "as-header", "as-query", "both"]))
    headers: dict[str, str] = {}
    query: list[str] = []
    user_param = draw(st.sampled_from([uid(user), f"%40u{user}%3Ahs", f"%40u{user}:hs"]))
    if how == "header":
        headers["authorization"] = f"Bearer {token(user)}"
    elif how == "query":
        query.append(f"access_token={token(user)}")
    elif how == "both":  # a header for one user, a query token of another: refused
        headers["authorization"] = f"Bearer {token(user)}"
        query.append(f"access_token={token((user + 1) % 4)}")
    else:
        if how == "as-header":
            headers["authorization"] = "Bearer as-token"
        else:
            query.append("access_token=as-token")
        query.append(f"user_id={user_param}")
        if draw(st.booleans()):
            query.append(f"user_id={uid((user + 1) % 4)}")  # a second one: refused
    if isinstance(route.handler, TimestampToEvent):
        query += [f"ts={draw(st.integers(0, 5))}", f"dir={draw(st.sampled_from('fb'))}"]
    query = draw(st.permutations(query))
    return route.method, raw, headers, "&".join(query)


# --- the run ------------------------------------------------------------------------------


class World(tuple):  # type: ignore[type-arg]
    def __repr__(self) -> str:  # hypothesis prints the fixture with a failing example
        return "world"


@pytest.fixture(scope="module")
def world() -> Iterator[
    tuple[asyncio.AbstractEventLoop, Universe, httpx.AsyncClient, dict[str, int]]
]:
    universe = Universe(users=4)
    hs = universe.homeserver
    hs.account_data.clear()
    universe.ignores = {u: frozenset(ignored) for u, ignored in ALL_IGNORES.items()}
    for user, ignored in ALL_IGNORES.items():
        hs.ignore(user, *ignored)

    def lenient(request: httpx.Request) -> httpx.Response:
        raw_path = request.url.raw_path.split(b"?")[0].decode()
        found = lenient_match(request.method, raw_path)
        if found is None:
            return httpx.Response(404, json={"errcode": "M_UNRECOGNIZED", "error": "?"})
        url = "http://hs.test" + canonical(*found) + "?" + request.url.query.decode()
        return universe.answer(httpx.Request(request.method, url))

    hs.fallback = lenient

    async def assemble() -> IgnoreProxyApp:
        return build_app(hs)  # its homeserver is served in this loop

    loop = asyncio.new_event_loop()
    app = loop.run_until_complete(assemble())
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy.test")
    figures = {"cases": 0, "refused": 0, "filtered_upstream": 0, "leaks": 0, "wrong_user": 0}
    yield World((loop, universe, client, figures))
    loop.run_until_complete(client.aclose())
    loop.run_until_complete(stop_served_handlers())
    loop.close()
    print("bypass fuzzing:", figures)
    # Refusing everything would pass the invariant: most spellings must still be served.
    assert figures["filtered_upstream"] > figures["cases"] // 10, figures


def served_user(universe: Universe, request: httpx.Request) -> str | None:
    return universe.homeserver.user_of(request)


@settings(
    max_examples=1500,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@pytest.mark.slow
@given(case=fuzzed_request())
def test_no_spelling_bypasses_the_filter(
    world: tuple[asyncio.AbstractEventLoop, Universe, httpx.AsyncClient, dict[str, int]],
    case: tuple[str, str, dict[str, str], str],
) -> None:
    loop, universe, client, figures = world
    method, raw_path, headers, query = case
    hs = universe.homeserver
    figures["cases"] += 1
    request = client.build_request(
        method,
        "http://proxy.test/",
        headers={**headers, "x-fuzz-case": str(figures["cases"])},
        json={} if method == "POST" else None,
    )
    target = raw_path + ("?" + query if query else "")
    request.url = request.url.copy_with(raw_path=target.encode())
    before = len(hs.requests)
    response = loop.run_until_complete(client.send(request))
    case_id = str(figures["cases"])
    upstream = [r for r in hs.requests[before:] if r.headers.get("x-fuzz-case") == case_id]
    if not upstream:
        # The proxy answered by itself (an ambiguous path or ambiguous credentials):
        # nothing of anyone's left it, and the client learns why.
        figures["refused"] += 1
        assert response.status_code in (400, 401), response.text
        errcode = response.json()["errcode"]
        assert errcode in ("M_UNRECOGNIZED", "M_MISSING_TOKEN", "M_INVALID_PARAM")
        return
    # What the upstream got (httpx resolves literal dot segments on the way).
    seen_path = upstream[0].url.raw_path.split(b"?")[0].decode()
    found = lenient_match(method, seen_path)
    user = served_user(universe, upstream[0])
    if found is None or user not in universe.ignores:
        return  # the upstream served no events (404/401)
    figures["filtered_upstream"] += 1
    route, params = found
    ignored = universe.ignores[user]
    context = f"{method} {target} {headers} -> upstream user {user} -> {response.status_code}"
    if response.status_code == 404 and response.json().get("errcode") == "M_SENDER_IGNORED":
        if response.json().get("sender") not in ignored:
            figures["wrong_user"] += 1
            pytest.fail(f"wrong user's list: {context} {response.text}")
        return
    if isinstance(route.handler, TimestampToEvent):
        got = response.json().get("event_id") if response.status_code == 200 else None
        if got is not None and universe.by_id[got]["sender"] in ignored:
            figures["leaks"] += 1
            pytest.fail(f"leak: {context} {response.text}")
        q = parse_qs(query)
        ts, forward = int(q["ts"][0]), q["dir"][0] == "f"
        seen = [e for e in universe.messages if e["sender"] not in ignored]
        found_events = [
            e
            for e in seen
            if (e["origin_server_ts"] >= ts if forward else e["origin_server_ts"] <= ts)
        ]
        want = (found_events[0] if forward else found_events[-1]) if found_events else None
        if got != (want and want["event_id"]):
            figures["wrong_user"] += 1
            pytest.fail(f"wrong answer: {context} {response.text}, want {want}")
        return
    assert response.status_code == 200, f"{context} {response.text}"
    body = response.json()
    url = "http://hs.test" + canonical(route, params) + "?" + query
    sent = events_in(json.loads(universe.answer(httpx.Request(method, url)).content))
    verdict = check(universe, user, route.name, sent, body)
    figures["leaks"] += len(verdict.leaked)
    figures["wrong_user"] += len(verdict.wrongly_removed)
    assert not verdict.leaked, f"leak: {context} {verdict.leaked}"
    assert not verdict.wrongly_removed, f"wrong removal: {context} {verdict.wrongly_removed}"


def test_the_lenient_upstream_reads_what_it_should() -> None:
    """The fuzzer's oracle itself: a few spellings it must and must not understand."""
    assert lenient_match("GET", "/_matrix/client/v3/sync") is not None
    assert lenient_match("GET", "//_MATRIX/client/R0//zz/../SYNC/") is not None
    assert lenient_match("GET", "/_matrix/client/v3%2Frooms%2F!r:hs%2Fmessages") is not None
    assert lenient_match("GET", "/_matrix/client/api/v1/events") is not None
    assert lenient_match("GET", "/_matrix/client/v3/rooms/!r/state") is None
    assert lenient_match("GET", "/_matrix/client/v1/rooms/!r/threads/zz") is not None
    assert lenient_match("GET", "/_matrix/client/v1/rooms/!r/messages/zz") is None
    assert lenient_match("POST", "/_matrix/client/v3/messages") is None
