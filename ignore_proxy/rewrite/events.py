"""Events: their heads, the state test, the ignore test, invites, bundled aggregations,
redactions by ignored users (``unsigned.redacted_because``) and ephemeral events.

All functions take and return ``msgspec.Raw``; ``None`` means "unchanged, keep the
input bytes". Only what a decision needs is ever decoded.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Callable
from itertools import accumulate, chain
from typing import Any, Final

import msgspec

from .raw import (
    EMPTY,
    Raw,
    as_bytes,
    decode_value,
    encode_array,
    encode_object,
    render,
    split_array,
    split_object,
)
from .scan import found_in
from .types import IgnoreContext, Rewritten, StaleThread

__all__ = [
    "DROP",
    "Head",
    "RewriteState",
    "drop_ignored_keys",
    "edit_items",
    "edit_items_at",
    "edit_members",
    "event_filter",
    "filter_events",
    "filter_receipt_content",
    "fix_event",
    "head_of",
    "is_invite_for",
    "is_membership_of",
    "redaction_stub",
]

DROP: Final = Raw(b"null")
"""Returned (by identity) by functions whose input must be removed altogether."""


class Head(msgspec.Struct, gc=False):
    """The few members of an event the rewriters look at.

    Not tracked by the garbage collector (``gc=False``): it holds only strings and raw
    bytes, so it can never be part of a reference cycle.
    """

    sender: str | None = None
    type: str | None = None
    event_id: str | None = None
    room_id: str | None = None
    state_key: Raw = EMPTY
    """Raw bytes of ``state_key``; empty when the event has none (not a state event)."""
    unsigned: Raw = EMPTY
    content: Raw = EMPTY

    @property
    def is_state(self) -> bool:
        return len(self.state_key) > 0


class _Member(msgspec.Struct):
    membership: Any = None


_head_decoder = msgspec.json.Decoder(Head)
_member_decoder = msgspec.json.Decoder(_Member)
_str_decoder = msgspec.json.Decoder(str)


def _string(raw: Raw) -> str | None:
    try:
        return _str_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        value = decode_value(raw)
        return value if isinstance(value, str) else None


def head_of(raw: Raw | bytes) -> Head | None:
    """The head of an event; None if ``raw`` is not a JSON object.

    Events msgspec rejects (lone surrogates anywhere, or a member of an unexpected type)
    are split with the stdlib fallback and their members decoded one by one.
    """
    try:
        return _head_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        pass
    parts = split_object(raw)
    if parts is None:
        return None
    sender = parts.get("sender")
    type_ = parts.get("type")
    event_id = parts.get("event_id")
    room_id = parts.get("room_id")
    return Head(
        sender=None if sender is None else _string(sender),
        type=None if type_ is None else _string(type_),
        event_id=None if event_id is None else _string(event_id),
        room_id=None if room_id is None else _string(room_id),
        state_key=parts.get("state_key", EMPTY),
        unsigned=parts.get("unsigned", EMPTY),
        content=parts.get("content", EMPTY),
    )


def _membership(content: Raw) -> Any:
    if not len(content):
        return None
    try:
        return _member_decoder.decode(content).membership
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        value = decode_value(content)
        return value.get("membership") if isinstance(value, dict) else None


def is_membership_of(head: Head, user_id: str) -> bool:
    """Is this an ``m.room.member`` event of ``user_id``?"""
    return head.type == "m.room.member" and head.is_state and _string(head.state_key) == user_id


def is_invite_for(head: Head, user_id: str) -> bool:
    """Is this the ``m.room.member`` event inviting ``user_id``?"""
    return is_membership_of(head, user_id) and _membership(head.content) == "invite"


class RewriteState:
    """Per-call state: the context, what may be present in the body, what was removed."""

    __slots__ = (
        "_found",
        "anything",
        "ctx",
        "hidden_invites",
        "ignored",
        "removed",
        "room_id",
        "shrunk",
        "stale_threads",
    )

    def __init__(self, ctx: IgnoreContext, body: bytes) -> None:
        self.ctx = ctx
        self.ignored = ctx.ignored
        self.removed = 0
        self.room_id: str | None = None
        """The room being walked, for events that do not name theirs (sync)."""
        self.stale_threads: list[StaleThread] = []
        self.hidden_invites: list[str] = []
        self.shrunk = 0
        """Bytes the edits of a body split down to its events in one decode took out of
        its compact text (for the check that the body was that text)."""
        found = found_in(body, ctx.ignored)
        self.anything = found.always or bool(found.ids)
        """False if the body certainly holds no ignored user's ID (nothing to do)."""
        self._found = found

    def result(self, body: bytes) -> Rewritten:
        return Rewritten(body, self.removed, tuple(self.stale_threads), tuple(self.hidden_invites))

    def relevant(self, raw: Raw | bytes) -> bool:
        """False if this part of the body certainly holds no ignored user's ID."""
        return self._found.relevant(raw)

    def relevant_indexes(self, raws: list[Raw]) -> list[int]:
        """Indexes of the parts of ``raws`` that may hold an ignored user's ID (ascending)."""
        return self._found.relevant_indexes(raws)

    def relevant_items(self, lists: list[list[Raw]]) -> dict[int, list[int]]:
        """For lists of raw items: the indexes of the items that may hold an ignored
        user's ID, by list (lists with none are left out). All items are searched at
        once, as by ``relevant_indexes``."""
        hits = self.relevant_indexes(list(chain.from_iterable(lists)))
        if not hits:
            return {}
        ends = list(accumulate(map(len, lists)))
        found: dict[int, list[int]] = {}
        for hit in hits:
            owner = bisect_right(ends, hit)
            found.setdefault(owner, []).append(hit - (ends[owner - 1] if owner else 0))
        return found

    def hides(self, head: Head) -> bool:
        """Is this an ignored sender's non-state event?"""
        return head.sender is not None and head.sender in self.ignored and not head.is_state

    def hides_invite(self, head: Head) -> bool:
        """Is this an invite of the requesting user by an ignored user?"""
        return head.sender in self.ignored and is_invite_for(head, self.ctx.user_id)


# --- walking arrays and objects -------------------------------------------------------


def edit_items(raw: Raw, run: RewriteState, fn: Callable[[Raw], Raw | None]) -> Raw | None:
    """Array ``raw`` with each item that may mention an ignored user replaced by
    ``fn(item)``: None keeps the item, DROP removes it (``fn`` counts what it removes).
    None if nothing changed or ``raw`` is not an array."""
    if not run.relevant(raw):
        return None
    items = split_array(raw)
    if items is None:
        return None
    if edit_items_at(items, run.relevant_indexes(items), fn) is None:
        return None
    return encode_array(items)


def edit_items_at(
    items: list[Raw], indexes: list[int], fn: Callable[[Raw], Raw | None]
) -> int | None:
    """``edit_items`` on the items at ``indexes`` (ascending) only, ``items`` edited in
    place; None if nothing changed. Else how much shorter the array's compact text got
    (an item ``fn`` changed is rendered for that)."""
    dropped: list[int] = []
    changed = False
    shrunk = 0
    for index in indexes:
        old = items[index]
        new = fn(old)
        if new is None:
            continue
        changed = True
        if new is DROP:
            dropped.append(index)
            shrunk += len(old)
        else:
            if not isinstance(new, Raw):  # a changed tree (see raw.encode_object)
                new = Raw(render(new))
            items[index] = new
            shrunk += len(old) - len(new)
    if not changed:
        return None
    if dropped:  # and the commas after (or, for the last item, before) them
        shrunk += len(dropped) if len(dropped) < len(items) else len(dropped) - 1
        for index in reversed(dropped):
            del items[index]
    return shrunk


def edit_members(
    raw: Raw, run: RewriteState, fn: Callable[[str, Raw], Raw | None], *, drop_empty: bool = False
) -> Raw | None:
    """Object ``raw`` with each member that may mention an ignored user replaced by
    ``fn(key, value)``: None keeps it, DROP removes it. None if nothing changed or
    ``raw`` is not an object; with ``drop_empty``, DROP if no member is left."""
    if not run.relevant(raw):
        return None
    members = split_object(raw)
    if members is None:
        return None
    changed = False
    for key, value in list(members.items()):
        if not run.relevant(value):
            continue
        new = fn(key, value)
        if new is None:
            continue
        changed = True
        if new is DROP:
            del members[key]
        else:
            members[key] = new
    if not changed:
        return None
    return DROP if drop_empty and not members else encode_object(members)


def drop_ignored_keys(members: dict[str, Raw], run: RewriteState) -> bool:
    """Remove (and count) the members keyed by an ignored user ID; True if any was."""
    hidden = [key for key in members if key in run.ignored]
    for key in hidden:
        del members[key]
    run.removed += len(hidden)
    return bool(hidden)


# --- bundled aggregations -------------------------------------------------------------


def _thread_is_hidden(thread: Raw, run: RewriteState) -> bool:
    parts = split_object(thread)
    if parts is None:
        return False
    latest = parts.get("latest_event")
    if latest is None:
        return False
    head = head_of(latest)
    return head is not None and run.hides(head)


def fix_unsigned(unsigned: Raw, run: RewriteState, head: Head | None = None) -> Raw | None:
    """``unsigned`` without an ignored user's words: ``redacted_because`` by an ignored
    user cut down to a stub (see ``redaction_stub``), and ``m.relations.m.thread`` fixed
    (see ``_fix_thread``). None if unchanged."""
    if not len(unsigned) or not run.relevant(unsigned):
        return None
    members = split_object(unsigned)
    if members is None:
        return None
    changed = _fix_redacted_because(members, run)
    changed |= _fix_thread(members, run, head)
    return encode_object(members) if changed else None


_STUB_TOP: Final = frozenset(
    {"type", "event_id", "origin_server_ts", "redacts", "sender", "room_id"}
)
_STUB_KEYS: Final = _STUB_TOP | {"content"}


def redaction_stub(raw: Raw) -> Raw | None:
    """A redaction event cut down to the fact that it happened: ``type``, ``event_id``,
    ``origin_server_ts``, ``redacts`` (top level and in ``content``), ``sender`` and
    ``room_id``; its ``reason`` and everything else dropped. None if it is that already
    (or not an object).

    ``sender`` stays: ``redacted_because`` is a whole client event for clients, and
    ``sender`` is one of its required members (as ``content`` is, so it stays, empty if
    need be). It tells the user no more than their own ignore list does: that someone
    they ignore redacted the event. ``room_id`` is the room of the event it sits in."""
    members = split_object(raw)
    if members is None:
        return None
    content = split_object(members["content"]) if "content" in members else None
    kept = {} if content is None else {k: v for k, v in content.items() if k == "redacts"}
    if content is not None and len(kept) == len(content) and set(members) <= _STUB_KEYS:
        return None
    out: dict[str, Raw] = {k: v for k, v in members.items() if k in _STUB_TOP}
    out["content"] = encode_object(kept)
    return encode_object(out)


def _fix_redacted_because(unsigned: dict[str, Raw], run: RewriteState) -> bool:
    """A redaction by an ignored user stays visible as a fact (the event is redacted:
    clients show it deleted) but keeps none of their words."""
    because = unsigned.get("redacted_because")
    if because is None or not run.relevant(because):
        return False
    head = head_of(because)
    if head is None or head.sender is None or head.sender not in run.ignored:
        return False
    stub = redaction_stub(because)
    if stub is None:
        return False
    unsigned["redacted_because"] = stub
    run.removed += 1
    return True


def _fix_thread(unsigned: dict[str, Raw], run: RewriteState, head: Head | None) -> bool:
    """Fix ``m.relations.m.thread``: if its ``latest_event`` is hidden, the previous
    un-ignored reply is not in the body: the summary is replaced by the one in
    ``run.ctx.thread_summaries`` for this root, or else removed and reported in
    ``run.stale_threads`` so that the proxy can look it up and rewrite again. A kept
    ``latest_event`` (or the replacement's) is fixed like any event."""
    if "m.relations" not in unsigned:
        return False
    relations = split_object(unsigned["m.relations"])
    if relations is None or "m.thread" not in relations:
        return False
    thread = relations["m.thread"]
    if not _thread_is_hidden(thread, run):
        fixed = _fix_latest(thread, run)
        if fixed is None:
            return False
        relations["m.thread"] = fixed
    else:
        root_id = head.event_id if head is not None else None
        known = run.ctx.thread_summaries or {}
        replacement = known.get(root_id) if root_id is not None else None
        run.removed += 1
        if replacement is not None:
            # not part of the body: what it mentions is searched for afresh
            inner = RewriteState(run.ctx, replacement)
            fixed = _fix_latest(Raw(replacement), inner) if inner.anything else None
            run.removed += inner.removed
            relations["m.thread"] = Raw(replacement) if fixed is None else fixed
        else:
            del relations["m.thread"]
            room_id = (head.room_id if head is not None else None) or run.room_id
            if root_id is not None and room_id is not None and root_id not in known:
                run.stale_threads.append(StaleThread(room_id, root_id, as_bytes(thread)))
    if relations:
        unsigned["m.relations"] = encode_object(relations)
    else:
        del unsigned["m.relations"]
    return True


def _fix_latest(thread: Raw, run: RewriteState) -> Raw | None:
    """A thread summary whose (kept) ``latest_event`` was fixed; None if unchanged."""
    if not run.relevant(thread):
        return None
    parts = split_object(thread)
    latest = None if parts is None else parts.get("latest_event")
    if parts is None or latest is None:
        return None
    head = head_of(latest)
    new = None if head is None else fix_event(latest, head, run)
    if new is None:
        return None
    parts["latest_event"] = new
    return encode_object(parts)


_REDACTED_BECAUSE: Final = re.compile(rb'"redacted_because"')


def fix_event(raw: Raw, head: Head, run: RewriteState) -> Raw | None:
    """A kept event with its bundled aggregations and ``unsigned`` fixed; None if
    unchanged. Synapse also copies ``redacted_because`` to the event's top level, where
    it is cut down as in ``unsigned`` (an escaped spelling of that key is left to the
    guard, which refuses the answer)."""
    unsigned = fix_unsigned(head.unsigned, run, head)
    top_level = _REDACTED_BECAUSE.search(memoryview(raw)) is not None
    if unsigned is None and not top_level:
        return None
    members = split_object(raw)
    if members is None:  # pragma: no cover - head_of succeeded, so it is an object
        return None
    changed = unsigned is not None
    if unsigned is not None:
        members["unsigned"] = unsigned
    if top_level:
        changed |= _fix_redacted_because(members, run)
    return encode_object(members) if changed else None


# --- ephemeral events -----------------------------------------------------------------


def filter_typing(raw: Raw, run: RewriteState) -> Raw | None:
    """An ``m.typing`` event without ignored users in ``content.user_ids``."""
    members = split_object(raw)
    if members is None or "content" not in members:
        return None
    content = split_object(members["content"])
    if content is None or "user_ids" not in content:
        return None
    user_ids = split_array(content["user_ids"])
    if user_ids is None:
        return None
    kept = [uid for uid in user_ids if _string(uid) not in run.ignored]
    if len(kept) == len(user_ids):
        return None
    run.removed += len(user_ids) - len(kept)
    content["user_ids"] = encode_array(kept)
    members["content"] = encode_object(content)
    return encode_object(members)


def filter_receipt_content(raw: Raw, run: RewriteState) -> Raw | None:
    """``{eventId: {receiptType: {userId: ...}}}`` without ignored users.

    Containers that become empty are dropped; DROP if nothing is left at all.
    """

    def users(_: str, users_raw: Raw) -> Raw | None:
        by_user = split_object(users_raw)
        if by_user is None or not drop_ignored_keys(by_user, run):
            return None
        return encode_object(by_user) if by_user else DROP

    def by_type(_: str, types_raw: Raw) -> Raw | None:
        return edit_members(types_raw, run, users, drop_empty=True)

    return edit_members(raw, run, by_type, drop_empty=True)


def filter_receipt(raw: Raw, run: RewriteState) -> Raw | None:
    """An ``m.receipt`` event without ignored users; DROP if its content becomes empty."""
    members = split_object(raw)
    if members is None or "content" not in members:
        return None
    content = filter_receipt_content(members["content"], run)
    if content is None or content is DROP:
        return content
    members["content"] = content
    return encode_object(members)


def filter_ephemeral(raw: Raw, head: Head, run: RewriteState) -> Raw | None:
    if head.type == "m.typing":
        return filter_typing(raw, run)
    if head.type == "m.receipt":
        return filter_receipt(raw, run)
    return None


# --- lists of events ------------------------------------------------------------------


def event_filter(
    run: RewriteState, *, invites: bool = False, ephemeral: bool = False, keep_all: bool = False
) -> Callable[[Raw], Raw | None]:
    """What ``filter_events`` does to each event that may mention an ignored user."""
    ephemeral = ephemeral and run.ctx.filter_ephemeral

    def judge_event(item: Raw) -> Raw | None:
        head = head_of(item)
        if head is None:
            return None
        if not keep_all and (run.hides(head) or (invites and run.hides_invite(head))):
            run.removed += 1
            return DROP
        if ephemeral and head.sender is None:
            return filter_ephemeral(item, head, run)
        return fix_event(item, head, run)

    return judge_event


def filter_events(
    raw: Raw,
    run: RewriteState,
    *,
    invites: bool = False,
    ephemeral: bool = False,
    keep_all: bool = False,
) -> Raw | None:
    """A JSON array of events without ignored senders' non-state events.

    ``invites``: also drop ``m.room.member`` invites of the requesting user sent by an
    ignored user. ``ephemeral``: filter sender-less ``m.typing`` / ``m.receipt`` events
    (when the context asks for it). ``keep_all``: remove nothing (state lists), only fix
    bundled aggregations. Anything that is not an array, or items that are not objects,
    are left untouched. None if nothing changed.
    """
    judge_event = event_filter(run, invites=invites, ephemeral=ephemeral, keep_all=keep_all)
    return edit_items(raw, run, judge_event)


def count_hidden_tail(raw: Raw, run: RewriteState, tail: int) -> int:
    """How many of the last ``tail`` events of an array ``filter_events`` would remove."""
    items = split_array(raw)
    if items is None or tail <= 0:
        return 0
    count = 0
    for item in items[-tail:]:
        head = head_of(item) if run.relevant(item) else None
        if head is not None and run.hides(head):
            count += 1
    return count
