"""The proxy's own push rules (`ignore.suppress_push`): what they are, which of them a
user's list calls for, and taking them out of what clients read.

For each ignored user the homeserver holds one override rule
`org.ignore_proxy.ignored.<hash>` whose only condition is the sender and whose actions
are empty (notify nobody, count nothing). Rule IDs starting with `org.ignore_proxy.` are
the proxy's: clients never see them and cannot write them through the proxy.

No I/O here: `ignore_proxy/push_rules.py` asks the homeserver.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from .raw import (
    Raw,
    decode_value,
    encode_array,
    encode_object,
    render,
    split_array,
    split_object,
    top_object,
)
from .types import InvalidBody

__all__ = [
    "ACTIONS",
    "MAX_RULES",
    "NAMESPACE",
    "PUSH_RULES_TYPE",
    "OwnedRuleLeft",
    "RulePlan",
    "SeenRules",
    "conditions_for",
    "hide_in_initial_sync",
    "hide_in_sliding_sync",
    "hide_in_sync",
    "hide_owned",
    "is_owned",
    "names_owned",
    "owned_overrides",
    "plan_rules",
    "rule_id_for",
]

# Every rule ID the proxy owns starts with this; compared case-insensitively.
NAMESPACE = "org.ignore_proxy."
_RULE_PREFIX = NAMESPACE + "ignored."
PUSH_RULES_TYPE = "m.push_rules"
# No action: the homeserver neither notifies nor counts (spec v1.7; `dont_notify` is the
# older spelling of the same, which newer homeservers ignore).
ACTIONS: list[Any] = []
# What a homeserver may store the actions as (the older spelling).
_NOT_NOTIFYING = (ACTIONS, ["dont_notify"])
# Rules kept per user. Each one is evaluated by the homeserver for every event in every
# room of the user until one matches (override rules come first), so a rule costs every
# event the user could see; on Conduit and continuwuity all rules also live in one
# account-data event, rewritten whole on every change. Past the cap, the rules already
# held stay and the others wait (README, "Push notifications and unread counts").
MAX_RULES = 500
# Characters `event_match` reads as glob syntax (Synapse reads `[...]` as a class).
_GLOB = frozenset("*?[]")


def is_owned(rule_id: object) -> bool:
    return isinstance(rule_id, str) and rule_id.casefold().startswith(NAMESPACE)


def names_owned(text: str) -> bool:
    """Whether a (decoded) path or query may name one of the proxy's rules."""
    return NAMESPACE in text.casefold()


def rule_id_for(user_id: str) -> str:
    """One rule ID per ignored user; a hash, since a user ID may hold `/` or `\\`, which
    rule IDs may not."""
    digest = hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()
    return _RULE_PREFIX + digest[:32]


def conditions_for(user_id: str) -> list[dict[str, str]]:
    """The rule's one condition: the sender is `user_id`.

    `event_match` (every homeserver has it) compares globs case-insensitively, so an ID
    with glob characters or capitals would silence other users too: such an ID gets the
    exact `event_property_is` (spec v1.7), which a homeserver without it never matches
    (the user's events then notify, nobody else is silenced)."""
    if _GLOB.isdisjoint(user_id) and user_id == user_id.lower():
        return [{"kind": "event_match", "key": "sender", "pattern": user_id}]
    return [{"kind": "event_property_is", "key": "sender", "value": user_id}]


def _intact(rule: object, user_id: str) -> bool:
    return (
        isinstance(rule, dict)
        and rule.get("conditions") == conditions_for(user_id)
        and rule.get("actions") in _NOT_NOTIFYING
    )


def _enabled(rule: object) -> bool:
    return not isinstance(rule, dict) or rule.get("enabled", True) is not False


@dataclass(frozen=True, slots=True)
class RulePlan:
    """What brings a user's rules in line with their list."""

    put: tuple[tuple[str, str], ...] = ()  # (rule ID, ignored user): missing or altered
    enable: tuple[str, ...] = ()  # held as they should be, but disabled
    delete: tuple[str, ...] = ()  # the proxy's rules for nobody ignored (or over the cap)
    over_cap: int = 0  # ignored users left without a rule

    def __bool__(self) -> bool:
        return bool(self.put or self.enable or self.delete)


def plan_rules(
    ignored: Iterable[str], owned: Mapping[str, object], cap: int = MAX_RULES
) -> RulePlan:
    """The changes to `owned` (the proxy's override rules at the homeserver, by ID) that
    give each ignored user a rule, at most `cap` of them. Over the cap, users whose rule
    is held keep it (rules do not move from one ignored user to another as the list
    grows); the free places go to the others in the order of their user IDs."""
    by_rule = {rule_id_for(user): user for user in ignored}
    held = sorted((by_rule[rule_id], rule_id) for rule_id in owned if rule_id in by_rule)
    new = sorted((user, rule_id) for rule_id, user in by_rule.items() if rule_id not in owned)
    chosen = (held + new)[: max(cap, 0)]
    wanted = {rule_id for _, rule_id in chosen}
    put = tuple(
        (rule_id, user) for user, rule_id in chosen if not _intact(owned.get(rule_id), user)
    )
    enable = tuple(
        rule_id
        for user, rule_id in chosen
        if rule_id in owned and _intact(owned[rule_id], user) and not _enabled(owned[rule_id])
    )
    delete = tuple(sorted(rule_id for rule_id in owned if rule_id not in wanted))
    return RulePlan(put, enable, delete, len(by_rule) - len(chosen))


class OwnedRuleLeft(Exception):
    """A rule of the proxy's where it cannot be taken out (not an item of a list)."""


def hide_owned(value: Any) -> tuple[Any, int]:
    """`value` (decoded JSON) without the proxy's rules, and how many were taken out.
    A rule is an object with a `rule_id`; wherever one of the proxy's is a list's item it
    is dropped, whatever the shape around it (a whole ruleset, one scope, one kind's
    list). One anywhere else raises `OwnedRuleLeft`: nothing of it is relayed."""
    if isinstance(value, list):
        kept: list[Any] = []
        removed = 0
        for item in value:
            if isinstance(item, dict) and is_owned(item.get("rule_id")):
                removed += 1
                continue
            new, count = hide_owned(item)
            kept.append(new)
            removed += count
        return (kept, removed) if removed else (value, 0)
    if isinstance(value, dict):
        if is_owned(value.get("rule_id")):
            raise OwnedRuleLeft("a rule of the proxy's outside a list")
        changed: dict[str, Any] = {}
        removed = 0
        for key, item in value.items():
            new, count = hide_owned(item)
            if count:
                changed[key] = new
                removed += count
        return ({**value, **changed}, removed) if removed else (value, 0)
    return value, 0


def owned_overrides(ruleset: object) -> dict[str, object]:
    """The proxy's override rules in a ruleset (`{"global": {"override": [...]}}`, the
    answer of `GET /pushrules/` and the content of `m.push_rules`), by rule ID."""
    scope = ruleset.get("global") if isinstance(ruleset, dict) else None
    rules = scope.get("override") if isinstance(scope, dict) else None
    if not isinstance(rules, list):
        return {}
    return {
        rule["rule_id"]: rule
        for rule in rules
        if isinstance(rule, dict) and is_owned(rule.get("rule_id"))
    }


@dataclass(frozen=True, slots=True)
class SeenRules:
    """An `m.push_rules` event found in an answer: the proxy's override rules it held,
    and the answer without any of the proxy's rules (None: nothing to take out)."""

    owned: dict[str, object] = field(default_factory=dict)
    body: bytes | None = None


def _hide_in_events(events: Raw) -> tuple[Raw | None, dict[str, object] | None]:
    """An account-data event list without the proxy's rules in `m.push_rules` (None: no
    change), and the proxy's override rules it held (None: no `m.push_rules`)."""
    items = split_array(events)
    if items is None:
        return None, None
    owned: dict[str, object] | None = None
    changed = False
    for index, item in enumerate(items):
        event = split_object(item)
        if event is None or "type" not in event or "content" not in event:
            continue
        if decode_value(event["type"]) != PUSH_RULES_TYPE:
            continue
        content = decode_value(event["content"])
        owned = owned_overrides(content)
        try:
            new, removed = hide_owned(content)
        except OwnedRuleLeft:
            raise InvalidBody("a rule of the proxy's outside a list in m.push_rules") from None
        if removed:
            event["content"] = cast(Raw, new)  # serialised with the rest by `render`
            items[index] = encode_object(event)
            changed = True
    return (encode_array(items) if changed else None), owned


def _hide_at(body: bytes, path: tuple[str, ...]) -> SeenRules | None:
    """The account-data event list at `path` of `body` (objects down to it), rewritten.
    Raises `InvalidBody` when `body` is not a JSON object."""
    levels: list[dict[str, Raw] | None] = [top_object(body)]
    for key in path[:-1]:
        level = levels[-1]
        if level is None or key not in level:
            return None
        levels.append(split_object(level[key]))
    last = levels[-1]
    if last is None or path[-1] not in last:
        return None
    events, owned = _hide_in_events(last[path[-1]])
    if owned is None:
        return None
    if events is None:
        return SeenRules(owned)
    node: Raw = events
    for level, key in zip(reversed(levels), reversed(path), strict=True):
        assert level is not None
        level[key] = node
        node = encode_object(level)
    return SeenRules(owned, render(node))


def hide_in_sync(body: bytes) -> SeenRules | None:
    """`/sync`: `account_data.events`. None when it holds no `m.push_rules`."""
    return _hide_at(body, ("account_data", "events"))


def hide_in_sliding_sync(body: bytes) -> SeenRules | None:
    """Sliding sync: the account-data extension's `global` events."""
    return _hide_at(body, ("extensions", "account_data", "global"))


def hide_in_initial_sync(body: bytes) -> SeenRules | None:
    """Legacy `/initialSync`: its top-level `account_data` events."""
    return _hide_at(body, ("account_data",))
