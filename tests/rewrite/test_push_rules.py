"""rewrite/push_rules.py: the proxy's rules, the plan that keeps them, and taking them out
of what clients read."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ignore_proxy.rewrite import InvalidBody
from ignore_proxy.rewrite.push_rules import (
    ACTIONS,
    NAMESPACE,
    OwnedRuleLeft,
    conditions_for,
    hide_in_initial_sync,
    hide_in_sliding_sync,
    hide_in_sync,
    hide_owned,
    names_owned,
    plan_rules,
    rule_id_for,
)

BOB, CAROL, DAVE = "@bob:hs", "@carol:hs", "@dave:hs"


def rule(user: str, **extra: Any) -> dict[str, Any]:
    return {
        "rule_id": rule_id_for(user),
        "conditions": conditions_for(user),
        "actions": ACTIONS,
        "default": False,
        "enabled": True,
        **extra,
    }


def own(rule_id: str) -> dict[str, Any]:
    return {"rule_id": rule_id, "conditions": [], "actions": ["notify"], "enabled": True}


def test_rule_ids_are_the_proxys_one_per_user_and_hold_no_slash() -> None:
    ids = {rule_id_for(user) for user in (BOB, CAROL, "@a/b\\c:hs", "@é:hs")}
    assert len(ids) == 4
    for rule_id in ids:
        assert rule_id.startswith(NAMESPACE) and "/" not in rule_id and "\\" not in rule_id
    assert rule_id_for(BOB) == rule_id_for(BOB)
    assert names_owned("/pushrules/global/override/ORG.Ignore_Proxy.x")
    assert not names_owned("/pushrules/global/override/org.ignore.proxy")


@pytest.mark.parametrize(
    ("user", "kind"),
    [
        (BOB, "event_match"),
        ("@b*:hs", "event_property_is"),  # a glob would silence every @b...:hs
        ("@b?b:hs", "event_property_is"),
        ("@[b]:hs", "event_property_is"),
        ("@Bob:hs", "event_property_is"),  # event_match ignores case
    ],
)
def test_the_condition_matches_the_sender_exactly(user: str, kind: str) -> None:
    (condition,) = conditions_for(user)
    assert condition["kind"] == kind and condition["key"] == "sender"
    assert user in condition.values()


def test_plan_puts_missing_rules_and_deletes_those_for_nobody_ignored() -> None:
    held = {rule_id_for(BOB): rule(BOB), rule_id_for(DAVE): rule(DAVE)}
    plan = plan_rules({BOB, CAROL}, held)
    assert plan.put == ((rule_id_for(CAROL), CAROL),)
    assert plan.delete == (rule_id_for(DAVE),)
    assert plan.enable == () and plan.over_cap == 0
    assert not plan_rules({BOB}, {rule_id_for(BOB): rule(BOB)})
    # A homeserver that stores the older spelling of "no action" holds it as it should be.
    assert not plan_rules({BOB}, {rule_id_for(BOB): rule(BOB, actions=["dont_notify"])})


def test_plan_sets_right_rules_changed_or_disabled_around_the_proxy() -> None:
    changed = rule(BOB, actions=["notify"])
    disabled = rule(CAROL, enabled=False)
    stray = {**own(NAMESPACE + "ignored.unknown")}
    held = {rule_id_for(BOB): changed, rule_id_for(CAROL): disabled, stray["rule_id"]: stray}
    plan = plan_rules({BOB, CAROL}, held)
    assert plan.put == ((rule_id_for(BOB), BOB),)
    assert plan.enable == (rule_id_for(CAROL),)
    assert plan.delete == (stray["rule_id"],)


def test_over_the_cap_held_rules_stay_and_the_rest_go_by_user_id() -> None:
    users = {f"@u{i}:hs" for i in range(5)}
    held = {rule_id_for("@u4:hs"): rule("@u4:hs")}
    plan = plan_rules(users, held, cap=3)
    assert plan.put == ((rule_id_for("@u0:hs"), "@u0:hs"), (rule_id_for("@u1:hs"), "@u1:hs"))
    assert plan.delete == () and plan.over_cap == 2
    # A cap lowered under what is held: the held ones in user-ID order.
    held = {rule_id_for(u): rule(u) for u in users}
    plan = plan_rules(users, held, cap=2)
    assert set(plan.delete) == {rule_id_for(f"@u{i}:hs") for i in (2, 3, 4)}


RULESET: dict[str, Any] = {
    "global": {
        "override": [own(".m.rule.master"), rule(BOB), own("mine"), rule(CAROL)],
        "content": [own(".m.rule.contains_user_name")],
        "underride": [own(NAMESPACE.upper() + "x")],
    }
}


def test_hide_owned_takes_the_rules_out_of_every_shape_of_answer() -> None:
    hidden, removed = hide_owned(RULESET)
    assert removed == 3
    assert [r["rule_id"] for r in hidden["global"]["override"]] == [".m.rule.master", "mine"]
    assert hidden["global"]["underride"] == []
    assert hidden["global"]["content"] is RULESET["global"]["content"]
    assert RULESET["global"]["override"][1]["rule_id"].startswith(NAMESPACE)  # not mutated
    scope, removed = hide_owned(RULESET["global"])
    assert removed == 3 and NAMESPACE not in json.dumps(scope).casefold()
    kind, removed = hide_owned(RULESET["global"]["override"])
    assert removed == 2 and len(kind) == 2
    same, removed = hide_owned({"enabled": True})
    assert removed == 0 and same == {"enabled": True}


def test_a_rule_of_the_proxys_outside_a_list_is_never_passed() -> None:
    with pytest.raises(OwnedRuleLeft):
        hide_owned(rule(BOB))
    with pytest.raises(OwnedRuleLeft):
        hide_owned({"global": {"override": {"one": rule(BOB)}}})


def _event(content: Any, type_: str = "m.push_rules") -> dict[str, Any]:
    return {"type": type_, "content": content}


def test_sync_account_data_loses_the_rules_and_reports_them() -> None:
    other = _event({"ignored_users": {BOB: {}}}, "m.ignored_user_list")
    body = {
        "next_batch": "s1",
        "account_data": {"events": [other, _event(RULESET)]},
        "rooms": {"join": {}},
    }
    seen = hide_in_sync(json.dumps(body).encode())
    assert seen is not None and seen.body is not None
    assert set(seen.owned) == {rule_id_for(BOB), rule_id_for(CAROL)}
    out = json.loads(seen.body)
    assert out["account_data"]["events"][0] == other
    overrides = out["account_data"]["events"][1]["content"]["global"]["override"]
    assert [r["rule_id"] for r in overrides] == [".m.rule.master", "mine"]
    assert BOB not in json.dumps(out["account_data"]["events"][1])
    assert {k: v for k, v in out.items() if k != "account_data"} == {
        "next_batch": "s1",
        "rooms": {"join": {}},
    }


def test_sync_without_the_proxys_rules_is_left_as_it_is() -> None:
    body = json.dumps({"account_data": {"events": [_event({"global": {"override": []}})]}})
    seen = hide_in_sync(body.encode())
    assert seen is not None and seen.body is None and seen.owned == {}
    assert hide_in_sync(b'{"account_data": {"events": []}}') is None
    assert hide_in_sync(b'{"next_batch": "s"}') is None
    with pytest.raises(InvalidBody):
        hide_in_sync(b"[1]")


def test_an_escaped_type_is_read_as_the_homeserver_wrote_it() -> None:
    event = json.dumps(_event(RULESET)).replace("m.push_rules", "m.push\\u005frules")
    seen = hide_in_sync(('{"account_data": {"events": [' + event + "]}}").encode())
    assert seen is not None and seen.body is not None
    assert NAMESPACE not in seen.body.decode().casefold()


def test_sliding_sync_and_initial_sync_lose_the_rules_too() -> None:
    sliding = {"extensions": {"account_data": {"global": [_event(RULESET)], "rooms": {}}}}
    seen = hide_in_sliding_sync(json.dumps(sliding).encode())
    assert seen is not None and seen.body is not None
    assert NAMESPACE not in seen.body.decode().casefold()
    assert json.loads(seen.body)["extensions"]["account_data"]["rooms"] == {}
    initial = {"account_data": [_event(RULESET)], "rooms": [], "end": "e"}
    seen = hide_in_initial_sync(json.dumps(initial).encode())
    assert seen is not None and seen.body is not None
    assert NAMESPACE not in seen.body.decode().casefold()
    assert json.loads(seen.body)["end"] == "e"


def test_a_malformed_ruleset_in_account_data_is_refused() -> None:
    body = {"account_data": {"events": [_event({"global": {"override": {"x": rule(BOB)}}})]}}
    with pytest.raises(InvalidBody):
        hide_in_sync(json.dumps(body).encode())
