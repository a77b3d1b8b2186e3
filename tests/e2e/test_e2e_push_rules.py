"""`ignore.suppress_push`: the homeserver stops notifying and counting ignored users'
messages through the proxy's own push rules, which clients of the proxy never see.

Against no-ignore Synapse (which counts ignored senders, as Conduit and Dendrite do) and
stock Synapse (which does not: the setting must change nothing it did right). Bob and
charlie talk to the homeserver directly; alice to a proxy with the setting on
(`Stack.suppressing_proxy`), or to the plain proxy for the count without it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from .conftest import Stack, World, WorldFactory
from .harness.matrix import CS, JSON, Actor, q

pytestmark = pytest.mark.e2e

NAMESPACE = "org.ignore_proxy."
DIRECT = pytest.mark.parametrize(
    "target",
    [("no-ignore", "direct"), ("stock", "direct")],
    indirect=True,
    ids=["no-ignore", "stock"],
)


def _rules_about(ruleset: JSON, user_id: str) -> list[JSON]:
    return [
        rule
        for rules in ruleset["global"].values()
        for rule in rules
        if user_id in str(rule) or rule["rule_id"].startswith(NAMESPACE)
    ]


def _owned_overrides(ruleset: JSON) -> list[JSON]:
    return [r for r in ruleset["global"]["override"] if r["rule_id"].startswith(NAMESPACE)]


async def _counts(alice: Actor, room_id: str, expected: int) -> JSON:
    """The room's unread counts in alice's /sync, once they settle on `expected` (or the
    last ones seen after a few seconds)."""
    counts: JSON = {}
    for _ in range(30):
        sync = await alice.sync()
        counts = sync["rooms"]["join"][room_id].get("unread_notifications", {})
        if counts.get("notification_count") == expected:
            break
        await asyncio.sleep(0.2)
    return counts


async def _talk(w: World) -> tuple[list[str], list[str]]:
    """A read receipt on the latest event (nothing unread), then bob's 3 messages (one
    mentioning alice) and charlie's 2; their event IDs."""
    baseline = await w.charlie.send_text(w.room_id, "baseline")
    resp = await w.alice.request(
        "POST", f"{CS}/rooms/{q(w.room_id)}/receipt/m.read/{q(baseline)}", json={}
    )
    assert resp.status_code == 200, resp.text
    assert (await _counts(w.alice, w.room_id, 0)).get("notification_count") == 0
    # Bob's first message mentions alice: it would highlight too.
    mention = {"m.mentions": {"user_ids": [w.alice.user_id]}}
    bob = [await w.bob.send_text(w.room_id, f"{w.alice.user_id}: hi", **mention)]
    bob += [await w.bob.send_text(w.room_id, f"bob {i}") for i in range(2)]
    charlie = [await w.charlie.send_text(w.room_id, f"charlie {i}") for i in range(2)]
    return bob, charlie


async def _notified(actor: Actor, among: list[str]) -> set[str]:
    body = await actor.get_json(f"{CS}/notifications", params={"limit": "50"})
    return {n["event"]["event_id"] for n in body["notifications"]} & set(among)


@DIRECT
async def test_suppress_push_counts_and_notifies_without_ignored_users(
    make_world: WorldFactory, stack: Stack
) -> None:
    w = await make_world(alice_ignores_bob=False)
    mode = w.target.mode
    proxy = stack.suppressing_proxy(mode)
    alice = w.actor(w.alice.user, base_url=proxy.url)
    direct = w.alice  # the same device, straight to the homeserver
    await alice.set_ignored([w.bob.user_id])

    # The write answered once the rule was in place: the homeserver holds it...
    held = _owned_overrides(await direct.get_json(f"{CS}/pushrules/"))
    assert len(held) == 1, held
    assert held[0]["conditions"] == [
        {"kind": "event_match", "key": "sender", "pattern": w.bob.user_id}
    ]
    assert held[0]["actions"] == [] and held[0]["enabled"] is True
    rule_id = held[0]["rule_id"]
    # After .m.rule.master (which, switched on, silences everything anyway), before every
    # other server-default override rule (a mention by bob must not highlight).
    order = [
        r["rule_id"] for r in (await direct.get_json(f"{CS}/pushrules/"))["global"]["override"]
    ]
    assert order[0] == ".m.rule.master" and order[1] == rule_id, order
    assert all(r.startswith(".m.rule.") for r in order[2:]), order
    # ... and alice's clients do not see it, in any of the answers that show rules.
    assert _rules_about(await alice.get_json(f"{CS}/pushrules/"), w.bob.user_id) == []
    for path in ("pushrules/global/", "pushrules/global/override/"):
        resp = await alice.request("GET", f"{CS}/{path}")
        assert resp.status_code == 200, resp.text
        assert NAMESPACE not in resp.text and w.bob.user_id not in resp.text, (path, resp.text)
    sync = await alice.sync()
    push_rules = [e for e in sync["account_data"]["events"] if e["type"] == "m.push_rules"]
    assert push_rules, "no m.push_rules in the initial sync"
    assert w.bob.user_id not in str(push_rules) and NAMESPACE not in str(push_rules)
    account_data = await alice.get_json(f"{CS}/user/{q(alice.user_id)}/account_data/m.push_rules")
    assert NAMESPACE not in str(account_data)
    sliding = await alice.request(
        "POST",
        "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
        json={"lists": {}, "extensions": {"account_data": {"enabled": True}}},
    )
    assert sliding.status_code == 200, sliding.text
    events = sliding.json()["extensions"]["account_data"]["global"]
    push_rules = [e for e in events if e["type"] == "m.push_rules"]
    assert push_rules, events
    assert NAMESPACE not in sliding.text and w.bob.user_id not in str(push_rules)

    # Nor can they change, disable or delete it by its ID.
    rule_path = f"{CS}/pushrules/global/override/{rule_id}"
    assert (await alice.request("GET", rule_path)).status_code == 404
    refused = [
        await alice.request("PUT", rule_path, json={"conditions": [], "actions": ["notify"]}),
        await alice.request("PUT", f"{rule_path}/enabled", json={"enabled": False}),
        await alice.request("PUT", f"{rule_path}/actions", json={"actions": ["notify"]}),
        await alice.request("DELETE", rule_path),
        await alice.request("DELETE", f"{CS}/pushrules/global/override/{rule_id.upper()}"),
        await alice.request(
            "PUT",
            f"{CS}/pushrules/global/override/mine",
            json={"conditions": [], "actions": []},
            params={"before": rule_id},
        ),
    ]
    for resp in refused:
        assert resp.status_code == 400, resp.text
        assert resp.json()["errcode"] == "M_INVALID_PARAM"
    assert len(_owned_overrides(await direct.get_json(f"{CS}/pushrules/"))) == 1

    bob, charlie = await _talk(w)
    counts = await _counts(alice, w.room_id, 2)
    assert counts.get("notification_count") == 2, counts
    assert counts.get("highlight_count") == 0, counts
    # The homeserver's own notifications agree, read straight from it.
    assert await _notified(direct, bob + charlie) == set(charlie)
    assert await _notified(alice, bob + charlie) == set(charlie)

    # A rule deleted around the proxy is put back once it learns of it (m.push_rules in
    # alice's next syncs; no sooner than a few seconds after it last set them right).
    assert (await direct.request("DELETE", rule_path)).status_code == 200
    for _ in range(60):
        await alice.sync()
        if _owned_overrides(await direct.get_json(f"{CS}/pushrules/")):
            break
        await asyncio.sleep(0.25)
    assert [r["rule_id"] for r in _owned_overrides(await direct.get_json(f"{CS}/pushrules/"))] == [
        rule_id
    ]

    # Un-ignoring removes it.
    await alice.set_ignored([])
    assert _owned_overrides(await direct.get_json(f"{CS}/pushrules/")) == []


@DIRECT
async def test_without_the_setting_the_homeserver_counts_what_it_counted(
    make_world: WorldFactory, stack: Stack
) -> None:
    """The same through the plain proxy: no rule; no-ignore Synapse counts bob's 3
    messages too (and notifies for them), stock Synapse does not."""
    w = await make_world(alice_ignores_bob=False)
    alice = w.actor(w.alice.user, base_url=stack.proxy(w.target.mode).url)
    await alice.set_ignored([w.bob.user_id])
    assert _owned_overrides(await w.alice.get_json(f"{CS}/pushrules/")) == []
    bob, charlie = await _talk(w)
    expected = 5 if w.target.mode == "no-ignore" else 2
    counts = await _counts(alice, w.room_id, expected)
    assert counts.get("notification_count") == expected, counts
    assert counts.get("highlight_count") == (1 if w.target.mode == "no-ignore" else 0), counts
    notified = set(bob + charlie) if w.target.mode == "no-ignore" else set(charlie)
    assert await _notified(w.alice, bob + charlie) == notified
    # Through the proxy, /notifications never showed bob's.
    assert await _notified(alice, bob + charlie) == set(charlie)


@pytest.mark.parametrize("target", [("no-ignore", "direct")], indirect=True, ids=["no-ignore"])
async def test_push_rules_command_removes_every_rule_of_the_proxy(
    world: World, stack: Stack
) -> None:
    """`ignore-proxy push-rules --remove --user`, with the user's token on standard input."""
    w = world
    alice = w.actor(w.alice.user, base_url=stack.suppressing_proxy("no-ignore").url)
    await alice.set_ignored([w.bob.user_id, w.charlie.user_id])
    assert len(_owned_overrides(await w.alice.get_json(f"{CS}/pushrules/"))) == 2

    env = {k: v for k, v in os.environ.items() if not k.startswith("IGNORE_PROXY_")}
    argv = [sys.executable, "-m", "ignore_proxy", "push-rules", "--upstream", w.target.url]

    def run(*extra: str, token: str = w.alice.access_token) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*argv, *extra], input=token + "\n", capture_output=True, text=True, env=env,
            timeout=60,
        )  # fmt: skip

    listed = await asyncio.to_thread(run, "--user", w.alice.user_id)
    assert listed.returncode == 0, listed.stderr
    assert "2 push rules" in listed.stdout
    # Someone else's token does not act as alice.
    wrong = await asyncio.to_thread(run, "--user", w.alice.user_id, token=w.bob.access_token)
    assert wrong.returncode == 2 and "does not act as" in wrong.stderr
    assert len(_owned_overrides(await w.alice.get_json(f"{CS}/pushrules/"))) == 2

    removed = await asyncio.to_thread(run, "--remove", "--user", w.alice.user_id)
    assert removed.returncode == 0, removed.stderr
    assert "2 push rules" in removed.stdout
    assert _owned_overrides(await w.alice.get_json(f"{CS}/pushrules/")) == []
    # The token never reaches the command line or the output.
    assert w.alice.access_token not in removed.stdout + removed.stderr
