"""push_rules.py and the `PushRules` handler with `ignore.suppress_push`: the proxy keeps
one rule per ignored user at the homeserver (a fake one here, holding rules as Synapse
answers them), hides them from clients and refuses their writes.
(tests/e2e/test_e2e_push_rules.py: the same against real Synapse, with unread counts.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from ignore_proxy import push_rules
from ignore_proxy.identity import Credentials
from ignore_proxy.push_rules import PushRuleKeeper
from ignore_proxy.rewrite.push_rules import NAMESPACE, conditions_for, rule_id_for

from .fake_homeserver import ALICE, BOB, CHARLIE, ROOM, FakeHomeserver, build_app, client_for

CS = "/_matrix/client/v3"
MASTER = {"rule_id": ".m.rule.master", "default": True, "enabled": False, "conditions": [],
          "actions": []}  # fmt: skip


class RuleStore:
    """Each user's override rules, served as `/pushrules/` (the answers this proxy reads;
    other kinds are empty). `failing`: answer its writes with 500."""

    def __init__(self, hs: FakeHomeserver) -> None:
        self.hs = hs
        self.rules: dict[str, list[dict[str, Any]]] = {}
        self.failing = False
        self.writes: list[str] = []

    def ruleset(self, user: str) -> dict[str, Any]:
        return {"global": {"override": [MASTER, *self.rules.get(user, [])], "underride": [],
                           "sender": [], "room": [], "content": []}}  # fmt: skip

    def owned(self, user: str) -> dict[str, dict[str, Any]]:
        return {r["rule_id"]: r for r in self.rules.get(user, []) if r["rule_id"] != "mine"}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        user = self.hs.user_of(request)
        assert user is not None
        parts = [unquote(p) for p in request.url.raw_path.split(b"?")[0].decode().split("/")]
        rest = parts[parts.index("pushrules") + 1 :]
        if request.method == "GET":
            if rest == [""]:
                return httpx.Response(200, json=self.ruleset(user))
            if rest[:2] == ["global", ""]:
                return httpx.Response(200, json=self.ruleset(user)["global"])
            if rest[:3] == ["global", "override", ""]:
                return httpx.Response(200, json=self.ruleset(user)["global"]["override"])
            return httpx.Response(404, json={"errcode": "M_NOT_FOUND", "error": "no rule"})
        self.writes.append(f"{request.method} {'/'.join(rest)}")
        if self.failing:
            return httpx.Response(500, json={"errcode": "M_UNKNOWN", "error": "down"})
        rules = self.rules.setdefault(user, [])
        rule_id = rest[2]
        found = [r for r in rules if r["rule_id"] == rule_id]
        if request.method == "DELETE":
            if not found:
                return httpx.Response(404, json={"errcode": "M_NOT_FOUND", "error": "no rule"})
            rules.remove(found[0])
        elif len(rest) > 3 and rest[3] == "enabled":
            found[0]["enabled"] = json.loads(request.content)["enabled"]
        else:
            new = {"rule_id": rule_id, "default": False, "enabled": True,
                   **json.loads(request.content)}  # fmt: skip
            if found:
                rules[rules.index(found[0])] = new
            else:
                rules.insert(0, new)
        return httpx.Response(200, json={})


@pytest.fixture
def hs() -> FakeHomeserver:
    return FakeHomeserver()


@pytest.fixture
def store(hs: FakeHomeserver) -> RuleStore:
    store = RuleStore(hs)
    hs.fallback = store
    return store


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(push_rules, "MIN_INTERVAL", 0.0)
    yield


def ignore_path(user: str = ALICE) -> str:
    return f"{CS}/user/{user}/account_data/m.ignored_user_list"


def rule_of(user: str) -> dict[str, Any]:
    return {"rule_id": rule_id_for(user), "default": False, "enabled": True,
            "conditions": conditions_for(user), "actions": []}  # fmt: skip


async def eventually(holds: Callable[[], bool]) -> bool:
    """Whether `holds()` comes true within 5 s of the keeper's background work."""
    for _ in range(500):
        if holds():
            return True
        await asyncio.sleep(0.01)
    return holds()


async def test_an_ignore_puts_a_rule_before_it_answers_and_an_unignore_deletes_it(
    hs: FakeHomeserver, store: RuleStore
) -> None:
    app = build_app(hs, ignore_suppress_push="true")
    async with client_for(app, "alice-token") as alice:
        put = await alice.put(ignore_path(), json={"ignored_users": {BOB: {}, CHARLIE: {}}})
        assert put.status_code == 200
        assert store.owned(ALICE) == {rule_id_for(u): rule_of(u) for u in (BOB, CHARLIE)}
        assert store.owned(ALICE)[rule_id_for(BOB)]["conditions"] == [
            {"kind": "event_match", "key": "sender", "pattern": BOB}
        ]
        put = await alice.put(ignore_path(), json={"ignored_users": {CHARLIE: {}}})
        assert put.status_code == 200
        assert list(store.owned(ALICE)) == [rule_id_for(CHARLIE)]
        assert (await alice.delete(ignore_path())).status_code == 200
        assert store.owned(ALICE) == {}


async def test_without_the_setting_the_proxy_leaves_push_rules_alone(
    hs: FakeHomeserver, store: RuleStore
) -> None:
    store.rules[ALICE] = [rule_of(BOB)]
    app = build_app(hs)
    async with client_for(app, "alice-token") as alice:
        await alice.put(ignore_path(), json={"ignored_users": {CHARLIE: {}}})
        assert store.writes == []
        got = await alice.get(f"{CS}/pushrules/")
        assert rule_id_for(BOB) in got.text
        assert (await alice.delete(f"{CS}/pushrules/global/override/{rule_id_for(BOB)}")).is_success


async def test_a_failed_put_leaves_the_ignore_working_and_is_tried_again(
    hs: FakeHomeserver, store: RuleStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(push_rules, "RETRY_AFTER", 0.0)
    hs.answers[("GET", "/sync")] = {
        "next_batch": "s",
        "rooms": {"join": {ROOM: {"timeline": {"events": [
            {"type": "m.room.message", "event_id": "$b", "sender": BOB, "content": {},
             "origin_server_ts": 1}]}}}},
    }  # fmt: skip
    store.failing = True
    app = build_app(hs, ignore_suppress_push="true")
    async with client_for(app, "alice-token") as alice:
        assert (await alice.put(ignore_path(), json={"ignored_users": {BOB: {}}})).is_success
        assert store.owned(ALICE) == {}
        sync = await alice.get(f"{CS}/sync")
        assert sync.json()["rooms"]["join"][ROOM]["timeline"]["events"] == []
        # The sync learned the same list: tried again (and failed) in the background.
        keeper = app.proxy.services.push_rule_keeper
        assert keeper is not None
        assert await eventually(lambda: keeper.failures == 2)
        store.failing = False
        await alice.get(f"{CS}/sync")
        assert await eventually(lambda: list(store.owned(ALICE)) == [rule_id_for(BOB)]), (
            store.writes,
            [str(r.url) for r in hs.requests],
        )


async def test_clients_never_see_the_proxys_rules(hs: FakeHomeserver, store: RuleStore) -> None:
    hs.ignore(ALICE, BOB)
    mine = {"rule_id": "mine", "default": False, "enabled": True, "conditions": [],
            "actions": ["notify"]}  # fmt: skip
    store.rules[ALICE] = [rule_of(BOB), mine]
    hs.answers[("GET", f"/user/{ALICE}/account_data/m.push_rules")] = lambda _: httpx.Response(
        200, json=store.ruleset(ALICE)
    )
    app = build_app(hs, ignore_suppress_push="true")
    async with client_for(app, "alice-token") as alice:
        for path in ("pushrules/", "pushrules/global/", "pushrules/global/override/",
                     f"user/{ALICE}/account_data/m.push_rules"):  # fmt: skip
            got = await alice.get(f"{CS}/{path}")
            assert got.status_code == 200, path
            assert NAMESPACE not in got.text and BOB not in got.text, path
            assert "mine" in got.text and ".m.rule.master" in got.text, path
        # Asked for by its ID, in any spelling: it does not exist.
        own = rule_id_for(BOB)
        for spelling in (own, own.upper(), own.replace(".", "%2E"), own + "/enabled"):
            got = await alice.get(f"{CS}/pushrules/global/override/{spelling}")
            assert got.status_code == 404, spelling
            assert got.json()["errcode"] == "M_NOT_FOUND"


async def test_clients_cannot_change_disable_or_delete_the_proxys_rules(
    hs: FakeHomeserver, store: RuleStore
) -> None:
    hs.ignore(ALICE, BOB)
    store.rules[ALICE] = [rule_of(BOB)]
    app = build_app(hs, ignore_suppress_push="true")
    rule_path = f"{CS}/pushrules/global/override/{rule_id_for(BOB)}"
    async with client_for(app, "alice-token") as alice:
        refused = [
            await alice.put(rule_path, json={"conditions": [], "actions": ["notify"]}),
            await alice.put(rule_path + "/enabled", json={"enabled": False}),
            await alice.put(rule_path + "/actions", json={"actions": ["notify"]}),
            await alice.delete(rule_path),
            await alice.delete(f"{CS}/pushrules/global/underride/org%2Eignore_proxy%2Ex"),
            await alice.put(
                f"{CS}/pushrules/global/override/mine?after={rule_id_for(BOB)}",
                json={"conditions": [], "actions": []},
            ),
        ]
        for response in refused:
            assert response.status_code == 400
            assert response.json()["errcode"] == "M_INVALID_PARAM"
        assert store.writes == []
        # Their own rules are theirs.
        mine = await alice.put(f"{CS}/pushrules/global/override/mine",
                               json={"conditions": [], "actions": []})  # fmt: skip
        assert mine.status_code == 200
        assert store.writes == ["PUT global/override/mine"]


async def test_a_rule_removed_around_the_proxy_is_put_back_when_a_sync_shows_it(
    hs: FakeHomeserver, store: RuleStore
) -> None:
    app = build_app(hs, ignore_suppress_push="true")

    def sync(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"next_batch": "s", "account_data": {"events": [
            {"type": "m.push_rules", "content": store.ruleset(ALICE)}]}})  # fmt: skip

    hs.answers[("GET", "/sync")] = sync
    async with client_for(app, "alice-token") as alice:
        await alice.put(ignore_path(), json={"ignored_users": {BOB: {}}})
        assert list(store.owned(ALICE)) == [rule_id_for(BOB)]
        got = await alice.get(f"{CS}/sync")
        assert NAMESPACE not in got.text and ".m.rule.master" in got.text
        store.rules[ALICE] = []  # deleted straight at the homeserver
        await alice.get(f"{CS}/sync")
        assert await eventually(lambda: list(store.owned(ALICE)) == [rule_id_for(BOB)]), (
            store.writes,
            [str(r.url) for r in hs.requests],
        )
        store.rules[ALICE][0]["enabled"] = False  # disabled there
        await alice.get(f"{CS}/pushrules/")
        await alice.get(f"{CS}/pushrules/")
        assert await eventually(lambda: store.rules[ALICE][0]["enabled"] is True)


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (httpx.Response(200, content=b"not json"), 502),
        (httpx.Response(200, json={"global": {"override": {"x": rule_of(BOB)}}}), 502),
        (httpx.Response(200, json=rule_of(BOB)), 502),  # one of the proxy's, asked otherwise
        (httpx.Response(301, headers={"location": "/x"}), 502),
        (httpx.Response(404, json={"errcode": "M_NOT_FOUND", "error": "no rule"}), 404),
    ],
)
async def test_an_answer_the_proxy_cannot_judge_is_refused(
    hs: FakeHomeserver, answer: httpx.Response, status: int
) -> None:
    hs.answers[("GET", "/pushrules/global/override/x")] = lambda _: answer
    app = build_app(hs, ignore_suppress_push="true")
    async with client_for(app, "alice-token") as alice:
        got = await alice.get(f"{CS}/pushrules/global/override/x")
        assert got.status_code == status
        assert NAMESPACE not in got.text


@pytest.mark.parametrize("path", ["sync", "initialSync"])
async def test_a_sync_whose_push_rules_cannot_be_judged_is_refused(
    hs: FakeHomeserver, path: str
) -> None:
    hs.ignore(ALICE, BOB)
    content = {"global": {"override": {"x": rule_of(BOB)}}}  # one of the proxy's, no list's item
    events = [{"type": "m.push_rules", "content": content}]
    body = {
        "next_batch": "s",
        "account_data": events if path == "initialSync" else {"events": events},
    }
    hs.answers[("GET", f"/{path}")] = body
    app = build_app(hs, ignore_suppress_push="true")
    async with client_for(app, "alice-token") as alice:
        got = await alice.get(f"{CS}/{path}")
        assert got.status_code == 502
        assert got.json()["errcode"] == "M_UNKNOWN"
        assert NAMESPACE not in got.text


async def test_an_initial_sync_of_a_user_ignoring_nobody_hides_rules_left_over(
    hs: FakeHomeserver, store: RuleStore
) -> None:
    hs.ignore(ALICE)
    store.rules[ALICE] = [rule_of(BOB)]  # left when the unignore could not delete it
    hs.answers[("GET", "/initialSync")] = lambda _: httpx.Response(200, json={
        "end": "s", "rooms": [], "presence": [],
        "account_data": [{"type": "m.push_rules", "content": store.ruleset(ALICE)}]})  # fmt: skip
    app = build_app(hs, ignore_suppress_push="true")
    async with client_for(app, "alice-token") as alice:
        got = await alice.get(f"{CS}/initialSync")
        assert got.status_code == 200
        assert NAMESPACE not in got.text and ".m.rule.master" in got.text


async def test_the_keeper_caps_the_rules_and_keeps_those_held() -> None:
    hs = FakeHomeserver()
    store = RuleStore(hs)
    store.rules[ALICE] = [rule_of("@u9:hs")]
    client = httpx.AsyncClient(transport=httpx.MockTransport(store), base_url="http://hs")
    keeper = PushRuleKeeper(client, max_users=10, cap=3)
    ignored = frozenset(f"@u{i}:hs" for i in range(10))
    task = keeper.learned(ALICE, Credentials("alice-token"), ignored)
    assert task is not None
    await task
    assert set(store.owned(ALICE)) == {rule_id_for(u) for u in ("@u9:hs", "@u0:hs", "@u1:hs")}
    assert (keeper.changes, keeper.failures) == (2, 0)
    # Learned again, nothing due: no request at all.
    assert keeper.learned(ALICE, Credentials("alice-token"), ignored) is None
    await client.aclose()


async def test_a_stale_list_never_takes_back_a_rule_the_homeservers_list_still_wants(
    hs: FakeHomeserver, store: RuleStore
) -> None:
    """A worker that learned alice's list before a sibling's write must not delete the
    rule that write put: deletions follow the list the homeserver holds."""
    hs.ignore(ALICE, BOB)
    store.rules[ALICE] = [rule_of(BOB), rule_of(CHARLIE)]  # charlie un-ignored meanwhile
    client = httpx.AsyncClient(transport=httpx.MockTransport(hs), base_url="http://hs")
    keeper = PushRuleKeeper(client, max_users=10)
    task = keeper.learned(ALICE, Credentials("alice-token"), frozenset())
    assert task is not None
    await task
    assert list(store.owned(ALICE)) == [rule_id_for(BOB)]
    await client.aclose()


@pytest.mark.parametrize("seen_out_of_line", [True, False])
async def test_rules_seen_out_of_line_during_a_run_are_read_again_soon(
    hs: FakeHomeserver, store: RuleStore, seen_out_of_line: bool
) -> None:
    """A run may have read the rules before they changed around it: what an answer shows
    meanwhile makes the next learn read them again (after MIN_INTERVAL, 0 here)."""
    hs.ignore(ALICE, BOB)
    gate = asyncio.Event()
    asked: list[httpx.Request] = []

    async def slow(request: httpx.Request) -> httpx.Response:
        asked.append(request)
        await gate.wait()
        return hs(request)

    client = httpx.AsyncClient(transport=httpx.MockTransport(slow), base_url="http://hs")
    keeper = PushRuleKeeper(client, max_users=10, timer=lambda: 100.0)
    creds, ignored = Credentials("alice-token"), frozenset({BOB})
    task = keeper.learned(ALICE, creds, ignored)
    assert task is not None
    assert await eventually(lambda: len(asked) == 1)  # its GET is on its way
    keeper.seen(ALICE, creds, ignored, {} if seen_out_of_line else {rule_id_for(BOB): rule_of(BOB)})
    gate.set()
    await task
    assert list(store.owned(ALICE)) == [rule_id_for(BOB)]
    again = keeper.learned(ALICE, creds, ignored)
    assert (again is not None) == seen_out_of_line
    if again is not None:
        await again
    await client.aclose()
