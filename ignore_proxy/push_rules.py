"""Keeping each user's push rules in line with their ignore list (`ignore.suppress_push`),
as the user, and removing them all (`ignore-proxy push-rules --remove`).

Whenever the proxy learns a user's list (a write through it, `/sync` account data, a
read), `PushRuleKeeper.learned` reads the user's rules (`GET /pushrules/`) and puts,
re-enables or deletes the proxy's override rules (`rewrite.push_rules`) until there is
one per ignored user, up to the cap. Each user's rules are brought in line by one task
at a time; a list learned meanwhile is applied when it ends. A failure leaves the
ignore itself working (the proxy filters as before) and is retried when the list is next
learned, at the earliest `RETRY_AFTER` seconds later; rules found in line are read again
for an unchanged list after `RECHECK_AFTER`. When an `m.push_rules` event shows the
proxy's rules out of line (one deleted or disabled around the proxy), `seen` makes the
next learn bring them back.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

import httpx
import msgspec
from cachetools import LRUCache

from .identity import WHOAMI_PATH, Credentials
from .ignore_lists import account_data_path, parse_ignored_users_json
from .rewrite.push_rules import (
    ACTIONS,
    MAX_RULES,
    conditions_for,
    is_owned,
    owned_overrides,
    plan_rules,
)
from .startup import EXIT_CONFIG, EXIT_FAILED, EXIT_OK

__all__ = [
    "PushRuleKeeper",
    "PushRulesFailed",
    "push_rules_command",
    "read_rules",
    "remove_owned_rules",
]

log = logging.getLogger(__name__)

PUSH_RULES_PATH = "/_matrix/client/v3/pushrules/"
# Seconds before a failed or undone reconciliation is tried again for the same list.
RETRY_AFTER = 30.0
# The homeserver reports the proxy's own changes back (`m.push_rules` in /sync): an
# answer asked for before them shows the rules as they were. Rules seen out of line are
# set right no sooner than this after the last time they were.
MIN_INTERVAL = 5.0
# Seconds before rules found in line are read again for an unchanged list. A change around
# the proxy shows up sooner, in the `m.push_rules` of the user's next /sync; this covers
# users who do not sync through it, at one `GET /pushrules/` an hour per active user.
RECHECK_AFTER = 3600.0
# Users whose rules are read or written at once; the others wait (a restart meets every
# active user's first request at once).
MAX_CONCURRENT = 8


class PushRulesFailed(Exception):
    """The homeserver did not read or change the rules (down, 4xx/5xx, garbage)."""


def _rule_path(kind: str, rule_id: str, attribute: str = "") -> str:
    path = f"{PUSH_RULES_PATH}global/{quote(kind, safe='')}/{quote(rule_id, safe='')}"
    return f"{path}/{attribute}" if attribute else path


async def _request(
    client: httpx.AsyncClient, creds: Credentials, method: str, path: str, body: object = None
) -> httpx.Response:
    try:
        response = await client.request(
            method,
            path,
            headers=creds.auth_headers(),
            params=creds.query_params(),
            content=None if body is None else msgspec.json.encode(body),
        )
    except httpx.HTTPError as exc:
        raise PushRulesFailed(f"{method} push rules: {type(exc).__name__}") from None
    if method == "DELETE" and response.status_code == 404:
        return response  # gone already (a sibling worker, the user)
    if response.status_code != 200:
        raise PushRulesFailed(f"{method} push rules: status {response.status_code}")
    return response


async def read_rules(client: httpx.AsyncClient, creds: Credentials) -> dict[str, object]:
    """The user's whole ruleset (`GET /pushrules/`), as decoded JSON."""
    response = await _request(client, creds, "GET", PUSH_RULES_PATH)
    try:
        ruleset = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        raise PushRulesFailed("GET push rules: not JSON") from None
    if not isinstance(ruleset, dict) or not isinstance(ruleset.get("global"), dict):
        raise PushRulesFailed("GET push rules: no global ruleset")
    return ruleset


def _owned_by_kind(ruleset: Mapping[str, object]) -> list[tuple[str, str]]:
    """(kind, rule ID) of every rule of the proxy's namespace, of any kind."""
    scope = ruleset.get("global")
    found: list[tuple[str, str]] = []
    if isinstance(scope, dict):
        for kind, rules in scope.items():
            if isinstance(rules, list):
                found.extend(
                    (kind, rule["rule_id"])
                    for rule in rules
                    if isinstance(rule, dict) and is_owned(rule.get("rule_id"))
                )
    return found


async def reconcile(
    client: httpx.AsyncClient,
    creds: Credentials,
    user_id: str,
    ignored: frozenset[str],
    cap: int = MAX_RULES,
) -> int:
    """Bring the rules of `user_id` (whom `creds` act as) in line with `ignored`; the
    number of changes made."""
    ruleset = await read_rules(client, creds)
    owned = owned_overrides(ruleset)
    # The namespace's rules of other kinds are not the proxy's to keep (`--remove` deletes them).
    plan = plan_rules(ignored, owned, cap)
    if plan.delete:
        # A rule is deleted only for a user the homeserver's list no longer holds: a list
        # learned before a change that a sibling worker (or another client) just made
        # must not take back the rule that change put.
        plan = plan_rules(await _stored_list(client, creds, user_id), owned, cap)
    for rule_id, user_id in plan.put:
        # No `before`/`after`: a new rule is the user's most important override rule.
        body = {"conditions": conditions_for(user_id), "actions": ACTIONS}
        await _request(client, creds, "PUT", _rule_path("override", rule_id), body)
    for rule_id in plan.enable:
        await _request(client, creds, "PUT", _rule_path("override", rule_id, "enabled"),
                       {"enabled": True})  # fmt: skip
    for rule_id in plan.delete:
        await _request(client, creds, "DELETE", _rule_path("override", rule_id))
    if plan.over_cap:
        log.warning("push rules: %d ignored users over the cap of %d have none",
                    plan.over_cap, cap)  # fmt: skip
    return len(plan.put) + len(plan.enable) + len(plan.delete)


async def _stored_list(
    client: httpx.AsyncClient, creds: Credentials, user_id: str
) -> frozenset[str]:
    """The ignore list as the homeserver holds it now."""
    try:
        response = await client.get(
            account_data_path(user_id), headers=creds.auth_headers(), params=creds.query_params()
        )
    except httpx.HTTPError as exc:
        raise PushRulesFailed(f"GET ignore list: {type(exc).__name__}") from None
    if response.status_code == 404:
        return frozenset()
    if response.status_code != 200:
        raise PushRulesFailed(f"GET ignore list: status {response.status_code}")
    try:
        return parse_ignored_users_json(response.content) - {user_id}
    except msgspec.DecodeError:
        raise PushRulesFailed("GET ignore list: not JSON") from None


async def remove_owned_rules(
    client: httpx.AsyncClient, creds: Credentials, *, dry_run: bool = False
) -> list[tuple[str, str]]:
    """Delete every rule of the proxy's namespace, of any kind; (kind, rule ID) of each."""
    found = _owned_by_kind(await read_rules(client, creds))
    if not dry_run:
        for kind, rule_id in found:
            await _request(client, creds, "DELETE", _rule_path(kind, rule_id))
    return found


@dataclass(frozen=True, slots=True)
class _Kept:
    ignored: frozenset[str]  # the list the rules were last brought in line with
    due: float  # when to look again for the same list
    checked_at: float


class _Run:
    __slots__ = ("again", "creds", "ignored", "task")
    task: asyncio.Task[None]

    def __init__(self, creds: Credentials, ignored: frozenset[str]) -> None:
        self.creds = creds
        self.ignored = ignored
        self.again = False  # rules seen out of line meanwhile: read again soon


class PushRuleKeeper:
    """Each user's proxy-owned push rules, kept in line with their ignore list."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        max_users: int,
        recheck_after: float = RECHECK_AFTER,
        cap: int = MAX_RULES,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._recheck_after = recheck_after
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)
        self._cap = cap
        self._timer = timer
        self._kept: LRUCache[str, _Kept] = LRUCache(max_users)
        self._runs: dict[str, _Run] = {}
        self.changes = 0  # rules put, enabled or deleted
        self.failures = 0

    def learned(
        self, user_id: str, creds: Credentials, ignored: frozenset[str]
    ) -> asyncio.Task[None] | None:
        """The user's list as the proxy now knows it: the task bringing the rules in line
        (None when they are, as far as the proxy knows). Cheap when nothing is due: it is
        called for every filtered request."""
        run = self._runs.get(user_id)
        if run is not None:
            run.creds, run.ignored = creds, ignored  # applied when the run ends
            return run.task
        kept = self._kept.get(user_id)
        if kept is not None and kept.ignored == ignored and self._timer() < kept.due:
            return None
        run = _Run(creds, ignored)
        run.task = asyncio.get_running_loop().create_task(self._run(user_id, run))
        run.task.add_done_callback(_retrieve)
        self._runs[user_id] = run
        return run.task

    def seen(
        self, user_id: str, creds: Credentials, ignored: frozenset[str], owned: dict[str, object]
    ) -> None:
        """The proxy's override rules as an `m.push_rules` event showed them."""
        in_line = not plan_rules(ignored, owned, self._cap)
        run = self._runs.get(user_id)
        if run is not None:
            run.again = run.again or not in_line  # it may have read them before
            return
        now = self._timer()
        kept = self._kept.get(user_id)
        if in_line:
            if kept is None or kept.ignored != ignored:
                self._kept[user_id] = _Kept(ignored, now + self._recheck_after, now)
            return
        checked_at = float("-inf") if kept is None else kept.checked_at
        self._kept[user_id] = _Kept(ignored, checked_at + MIN_INTERVAL, checked_at)
        self.learned(user_id, creds, ignored)

    async def _run(self, user_id: str, run: _Run) -> None:
        try:
            while True:
                async with self._slots:
                    # The latest list and credentials learned, also while this waited.
                    creds, ignored = run.creds, run.ignored
                    run.again = False
                    started = self._timer()
                    try:
                        changed = await reconcile(self._client, creds, user_id, ignored, self._cap)
                    except PushRulesFailed as exc:
                        self.failures += 1
                        log.warning("push rules not brought in line: %s", exc)
                        self._kept[user_id] = _Kept(ignored, started + RETRY_AFTER, started)
                        return
                self.changes += changed
                # Seen out of line meanwhile (it may have read them before): the next
                # learn after MIN_INTERVAL reads them again.
                wait = MIN_INTERVAL if run.again else self._recheck_after
                self._kept[user_id] = _Kept(ignored, started + wait, started)
                if run.ignored == ignored:
                    return
        finally:
            if self._runs.get(user_id) is run:
                del self._runs[user_id]


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


# `ignore-proxy push-rules`: the token is read from this variable, or from standard input;
# never from the command line, where other users of the machine can read it.


async def _as_user(client: httpx.AsyncClient, token: str, user_id: str) -> Credentials | None:
    """Credentials acting as `user_id`: the user's own token, or an appservice token
    masquerading as a user of its namespace (`?user_id=`). None if neither is."""
    for creds in (Credentials(token), Credentials(token, as_user_id=user_id)):
        try:
            response = await client.get(
                WHOAMI_PATH, headers=creds.auth_headers(), params=creds.query_params()
            )
        except httpx.HTTPError as exc:
            raise PushRulesFailed(f"whoami: {type(exc).__name__}") from None
        if response.status_code == 200:
            try:
                if msgspec.json.decode(response.content).get("user_id") == user_id:
                    return creds
            except (msgspec.DecodeError, AttributeError):
                pass
    return None


async def push_rules_command(upstream: str, user_id: str, token: str, *, remove: bool) -> int:
    """List (or with `remove`, delete) the proxy's rules of `user_id`; an exit status."""
    async with httpx.AsyncClient(base_url=upstream, timeout=30.0, trust_env=False) as client:
        try:
            creds = await _as_user(client, token, user_id)
            if creds is None:
                print(f"ignore-proxy: the token does not act as {user_id}", file=sys.stderr)
                return EXIT_CONFIG
            found = await remove_owned_rules(client, creds, dry_run=not remove)
        except PushRulesFailed as exc:
            print(f"ignore-proxy: {exc}", file=sys.stderr)
            return EXIT_FAILED
    for kind, rule_id in found:
        print(f"{'removed' if remove else 'held'}: {kind}/{rule_id}")
    print(f"ignore-proxy: {len(found)} push rules of the proxy's {'removed' if remove else 'held'}"
          f" for {user_id}")  # fmt: skip
    return EXIT_OK
