"""Generated requests against real Synapse (ignore support off) through the proxy.

Identity corpus: `/sync` with credentials spelled every way a client or an attacker might
(header, query, both, repeated, `;`-separated, undecodable, non-ASCII, named in
`Connection`, appservice `user_id` masquerade, MSC3202 device IDs). Each user carries
account data naming them, so the answer says whom Synapse acted as; the room's timeline
says whose ignore list the proxy applied. They must agree on every answer with events.

Path corpus: every filtered endpoint spelled with dot segments (raw and encoded), empty
segments, `%2F`, encoded and case-changed literals, suffixes after Synapse's open-ended
patterns, several version prefixes. Whatever Synapse serves, no message of an ignored
sender may come back.

`E2E_CORPUS_SIZE` sets the number of requests of each corpus (default 2,000 and 1,000),
`E2E_CORPUS_SEED` the seed (printed, to replay a run).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from .conftest import Stack
from .harness.matrix import CS, IGNORE_LIST, q, unique
from .harness.raw import raw_request
from .harness.synapse import (
    APPSERVICE_SENDER,
    APPSERVICE_TOKEN,
    SERVER_NAME,
    register_appservice_user,
    register_user,
)

pytestmark = pytest.mark.e2e

IDENTITY = "org.ignore_proxy.e2e.identity"
SIZE = int(os.environ.get("E2E_CORPUS_SIZE", "2000"))
SEED = int(os.environ.get("E2E_CORPUS_SEED", str(random.randrange(1 << 30))))
MARKER = "corpus message of "


@dataclass
class Population:
    """Five users in one room, each with one message, an ignore list and their name in
    account data; plus the appservice's own user (in no room)."""

    url: str
    room_id: str
    tokens: dict[str, str]  # name -> token ("as" for the appservice)
    user_ids: dict[str, str]  # name -> user ID (appservice users have no token)
    ignores: dict[str, set[str]]  # user ID -> user IDs they ignore
    events: dict[str, str]  # user ID -> their message's event ID


async def _as_user(http: httpx.AsyncClient, hs: str, method: str, path: str, user_id: str,
                   body: Any) -> httpx.Response:  # fmt: skip
    response = await http.request(
        method,
        f"{hs}{path}",
        params={"user_id": user_id},
        json=body,
        headers={"Authorization": f"Bearer {APPSERVICE_TOKEN}"},
    )
    assert response.status_code == 200, response.text
    return response


async def populate(stack: Stack, http: httpx.AsyncClient) -> Population:
    synapse = stack.synapse("no-ignore")
    hs = synapse.url
    tokens: dict[str, str] = {"as": APPSERVICE_TOKEN}
    user_ids: dict[str, str] = {}
    for name in ("u0", "u1", "u2"):
        user = await register_user(http, synapse, unique(name))
        tokens[name], user_ids[name] = user.access_token, user.user_id
    for name in ("as_a", "as_b"):
        user_ids[name] = await register_appservice_user(http, synapse, unique(name))
    user_ids["bridge"] = f"@{APPSERVICE_SENDER}:{SERVER_NAME}"

    async def act(name: str, method: str, path: str, body: Any) -> httpx.Response:
        if name in tokens:
            response = await http.request(
                method, f"{hs}{path}", json=body,
                headers={"Authorization": f"Bearer {tokens[name]}"},
            )  # fmt: skip
            assert response.status_code == 200, response.text
            return response
        return await _as_user(http, hs, method, path, user_ids[name], body)

    created = await act("u0", "POST", f"{CS}/createRoom", {"preset": "public_chat"})
    room_id: str = created.json()["room_id"]
    members = ["u0", "u1", "u2", "as_a", "as_b"]
    for name in members[1:]:
        await act(name, "POST", f"{CS}/join/{q(room_id)}", {})
    events: dict[str, str] = {}
    for name in members:
        sent = await act(
            name, "PUT", f"{CS}/rooms/{q(room_id)}/send/m.room.message/{unique('t')}",
            {"msgtype": "m.text", "body": MARKER + user_ids[name]},
        )  # fmt: skip
        events[user_ids[name]] = sent.json()["event_id"]
    ignores_by_name = {
        "u0": {"u1"},
        "u1": {"u2", "as_a"},
        "u2": {"u0"},
        "as_a": {"as_b", "u0"},
        "as_b": {"u1", "u2"},
        "bridge": {"u0"},
    }
    ignores: dict[str, set[str]] = {}
    for name, ignored in ignores_by_name.items():
        ids = {user_ids[other] for other in ignored}
        ignores[user_ids[name]] = ids
        me = q(user_ids[name])
        await act(name, "PUT", f"{CS}/user/{me}/account_data/{IGNORE_LIST}",
                  {"ignored_users": {u: {} for u in ids}})  # fmt: skip
        await act(name, "PUT", f"{CS}/user/{me}/account_data/{IDENTITY}",
                  {"user_id": user_ids[name]})  # fmt: skip
    return Population(stack.proxy("no-ignore").url, room_id, tokens, user_ids, ignores, events)


@pytest.fixture(scope="module")
def population(stack: Stack) -> Population:
    async def made() -> Population:
        async with httpx.AsyncClient(trust_env=False, timeout=60.0) as http:
            return await populate(stack, http)

    return asyncio.run(made())


# --- the identity corpus --------------------------------------------------------------------


def _sync_filter(room_id: str) -> str:
    nothing = {"not_types": ["*"]}
    spec = {
        "room": {
            "rooms": [room_id],
            "timeline": {"limit": 50, "types": ["m.room.message"]},
            "state": nothing,
            "ephemeral": nothing,
            "account_data": nothing,
        },
        "presence": nothing,
        "account_data": {"types": [IDENTITY]},
    }
    return quote(json.dumps(spec, separators=(",", ":")), safe="")


HEADER_FORMS = ["Bearer {}", "Bearer {}", "Bearer {}", "bearer {}", "BEARER {}", "Bearer  {}",
                "Basic {}", "Bearer {} x", "Bearer {}\xe9", "{}"]  # fmt: skip
HOP_BY_HOP = [b"close, authorization", b"Authorization", b"keep-alive, authorization"]
QUERY_TOKEN_FORMS = ["access_token={}", "access_token={}", "access%5Ftoken={}",
                     "access_token={};x=1", "x=1;access_token={}",
                     "access_token={}&access_token={other}", "access_token=%FF",
                     "access_token=", "access_token"]  # fmt: skip
USER_ID_FORMS = ["user_id={enc}", "user_id={enc}", "user_id={raw}", "user_id=%FF",
                 "user_id={enc}&user_id={other}", "a=1;user_id={enc}", "user%5Fid={enc}",
                 "user_id={enc};b=2"]  # fmt: skip
EXTRAS = [None, None, "device_id=DEV", "device_id=%FF", "org.matrix.msc3202.device_id=%FE%FF",
          "limit=1", "x=%FF", "y=a;b"]  # fmt: skip


def credential_variant(
    rng: random.Random, pop: Population
) -> tuple[list[tuple[bytes, bytes]], list[str]]:
    """Headers and query items of one request: any mix of the ways to say who asks."""
    names = [*pop.tokens, "bad"]
    token = {**pop.tokens, "bad": "syt_not_a_token"}
    headers: list[tuple[bytes, bytes]] = []
    items: list[str] = []
    if rng.random() < 0.5:  # as clients send them: one token, maybe a masquerade
        holder = rng.choice(list(pop.tokens))
        if rng.random() < 0.5:
            headers.append((b"authorization", f"Bearer {token[holder]}".encode()))
        else:
            items.append(f"access_token={quote(token[holder], safe='')}")
        if holder == "as" and rng.random() < 0.8:
            masked = rng.choice([n for n in pop.user_ids if n.startswith("as_")])
            items.append(f"user_id={quote(pop.user_ids[masked], safe='')}")
        return headers, items
    if (who := rng.choice([None, None, *names])) is not None:
        form = rng.choice(HEADER_FORMS)
        headers.append((b"authorization", form.format(token[who]).encode("latin-1")))
        if rng.random() < 0.1:
            headers.append((b"authorization", f"Bearer {token[rng.choice(names)]}".encode()))
        if rng.random() < 0.15:
            headers.append((b"connection", rng.choice(HOP_BY_HOP)))
    if (who := rng.choice([None, None, *names])) is not None:
        other = quote(token[rng.choice(names)], safe="")
        items.append(rng.choice(QUERY_TOKEN_FORMS).format(quote(token[who], safe=""), other=other))
    if (who := rng.choice([None, None, *pop.user_ids])) is not None:
        user = pop.user_ids[who]
        other = pop.user_ids[rng.choice(list(pop.user_ids))]
        form = rng.choice(USER_ID_FORMS)
        items.append(form.format(enc=quote(user, safe=""), raw=user, other=quote(other)))
    if (extra := rng.choice(EXTRAS)) is not None:
        items.append(extra)
    return headers, items


async def test_identity_corpus_proxy_and_synapse_agree_on_who_asks(
    population: Population,
) -> None:
    pop = population
    rng = random.Random(SEED)
    sync_filter = _sync_filter(pop.room_id)
    members = set(pop.events)
    tally: Counter[str] = Counter()
    problems: list[str] = []
    slots = asyncio.Semaphore(8)

    async def one(http: httpx.AsyncClient, n: int) -> None:
        headers, items = credential_variant(rng, pop)
        items.insert(rng.randrange(len(items) + 1), f"filter={sync_filter}")
        target = f"{CS}/sync?" + "&".join(items)
        url = httpx.URL(pop.url).copy_with(raw_path=target.encode())
        async with slots:
            response = await http.request("GET", url, headers=headers)
        case = f"#{n} seed={SEED} headers={headers!r} query={'&'.join(items)[:300]!r}"
        if response.status_code != 200:
            tally[f"refused {response.status_code}"] += 1
            if MARKER in response.text:
                problems.append(f"events in a {response.status_code}: {case}")
            return
        body = response.json()
        acted = [
            e["content"].get("user_id")
            for e in body.get("account_data", {}).get("events", [])
            if e.get("type") == IDENTITY
        ]
        timeline = (
            body.get("rooms", {}).get("join", {}).get(pop.room_id, {})
            .get("timeline", {}).get("events", [])
        )  # fmt: skip
        shown = {e["sender"] for e in timeline if MARKER in e.get("content", {}).get("body", "")}
        if len(acted) != 1:
            problems.append(f"no identity in a 200 ({acted}): {case}")
            return
        user = acted[0]
        if user not in members:
            tally["served, no events (not in the room)"] += 1
            if shown:
                problems.append(f"{user} is in no room but saw {shown}: {case}")
            return
        tally["served with events"] += 1
        if leaked := shown & pop.ignores[user]:
            problems.append(f"LEAK to {user} of {leaked}: {case}")
        if missing := (members - pop.ignores[user]) - shown:
            problems.append(f"{user} got another user's list ({missing} hidden): {case}")

    async with httpx.AsyncClient(trust_env=False, timeout=60.0) as http:
        await asyncio.gather(*(one(http, n) for n in range(SIZE)))
    print(f"identity corpus (seed {SEED}): {SIZE} requests, {dict(tally)}")
    assert not problems, f"{len(problems)} disagreements, e.g.\n" + "\n".join(problems[:10])
    # A corpus that only ever got refused would prove nothing.
    assert tally["served with events"] >= SIZE // 10, tally


# --- the path corpus ------------------------------------------------------------------------


SEPARATORS = ["/"] * 6 + ["//", "/./", "/%2e/", "/%2E/", "/zz/../", "/zz/%2e%2e/", "%2F"]
ENDINGS = [""] * 6 + ["/", "//", "/.", "/..", "/%2e%2e", "/../..", "/zz", "x", "/m.reaction"]
VERSIONS = [["v3"], ["r0"], ["v1"], ["api", "v1"], ["unstable"], ["V3"], ["v4"]]


def spell(rng: random.Random, segment: str, fixed: bool) -> str:
    out = []
    for ch in segment:
        roll = rng.random()
        if roll < 0.04 and fixed:
            out.append(ch.swapcase())
        elif roll < 0.08 or (ch in "!$:@" and roll < 0.5):
            out.append(f"%{ord(ch):02X}")
        else:
            out.append(ch)
    return "".join(out)


def path_variant(rng: random.Random, pop: Population) -> tuple[str, str, bytes | None]:
    bob_event = pop.events[pop.user_ids["u1"]]
    mine = pop.events[pop.user_ids["u0"]]
    event = rng.choice([bob_event, bob_event, mine])
    room = pop.room_id
    endpoints: list[tuple[str, list[tuple[str, bool]], bytes | None]] = [
        ("GET", [("sync", True)], None),
        ("GET", [("rooms", True), (room, False), ("messages", True)], None),
        ("GET", [("rooms", True), (room, False), ("context", True), (event, False)], None),
        ("GET", [("rooms", True), (room, False), ("event", True), (event, False)], None),
        ("GET", [("events", True), (event, False)], None),
        ("GET", [("rooms", True), (room, False), ("relations", True), (event, False)], None),
        ("GET", [("rooms", True), (room, False), ("threads", True)], None),
        ("GET", [("rooms", True), (room, False), ("initialSync", True)], None),
        ("GET", [("initialSync", True)], None),
        ("POST", [("search", True)],
         json.dumps({"search_categories": {"room_events": {"search_term": "corpus"}}}).encode()),
    ]  # fmt: skip
    method, segments, body = rng.choice(endpoints)
    if rng.random() < 0.4:  # as clients spell them: these must be served, and filtered
        names = {segment for segment, fixed in segments if fixed}
        version = "v1" if names & {"threads", "relations"} else "v3"
        path = "/".join(quote(s, safe="") if not fixed else s for s, fixed in segments)
        return method, f"/_matrix/client/{version}/{path}", body
    raw = "/_matrix/client"
    for segment, fixed in [*((v, True) for v in rng.choice(VERSIONS)), *segments]:
        raw += rng.choice(SEPARATORS) + spell(rng, segment, fixed)
    raw += rng.choice(ENDINGS)
    return method, raw, body


def known_bypasses(pop: Population) -> list[tuple[str, str, bytes | None]]:
    """Spellings that once went around the filter, in every run."""
    room, bob_event = q(pop.room_id), q(pop.events[pop.user_ids["u1"]])
    relations = f"/rooms/{room}/relations/{bob_event}"
    tails = ["/..", "/%2e%2e", "/../..", "/../m.reaction", "/.", ""]
    return [
        *(("GET", f"/_matrix/client/{version}{relations}{tail}", None)
          for version in ("unstable", "v1") for tail in tails),
        ("GET", f"/_matrix/client/v1/rooms/{room}/threads/..", None),
        ("GET", f"/_matrix/client/v3/rooms/{room}/event/{bob_event}/..", None),
        ("GET", f"/_matrix/client/v3/rooms/{room}/messages/.", None),
    ]  # fmt: skip


async def test_path_corpus_never_delivers_an_ignored_senders_message(
    population: Population,
) -> None:
    pop = population
    rng = random.Random(SEED + 1)
    alice = pop.tokens["u0"]  # ignores u1
    bob_text = MARKER + pop.user_ids["u1"]
    others = [MARKER + pop.user_ids[name] for name in ("u2", "as_a", "as_b")]
    tally: Counter[str] = Counter()
    leaks: list[str] = []
    slots = asyncio.Semaphore(8)
    size = max(SIZE // 2, 1)

    headers = [(b"authorization", f"Bearer {alice}".encode()),
               (b"content-type", b"application/json")]  # fmt: skip

    async def one(method: str, raw: str, body: bytes | None) -> None:
        async with slots:
            response = await raw_request(pop.url, method, raw, headers, body)
        text = response.text
        if bob_text in text:
            leaks.append(f"{method} {raw} -> {response.status_code} seed={SEED}")
        errcode = response.json().get("errcode") if text.startswith("{") else None
        if response.status_code == 400 and errcode == "M_UNRECOGNIZED":
            tally["refused as ambiguous"] += 1
        elif errcode is not None:
            tally[f"{response.status_code} {errcode}"] += 1
        elif any(other in text for other in others):
            tally["served with events"] += 1
        else:
            tally[f"served {response.status_code}, no events"] += 1

    cases = [path_variant(rng, pop) for _ in range(size)] + known_bypasses(pop)
    await asyncio.gather(*(one(*case) for case in cases))
    print(f"path corpus (seed {SEED + 1}): {size} requests, {dict(tally)}")
    assert not leaks, f"{len(leaks)} leaks, e.g.\n" + "\n".join(leaks[:10])
    assert tally["served with events"] >= size // 20, tally
