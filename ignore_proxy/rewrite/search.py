"""``POST /search``."""

from __future__ import annotations

from .events import (
    DROP,
    RewriteState,
    drop_ignored_keys,
    edit_items,
    edit_members,
    filter_events,
    fix_event,
    head_of,
)
from .raw import Raw, encode_object, split_object
from .types import IgnoreContext, Rewritten
from .walk import edit, edit_in, finish, start

__all__ = ["rewrite_search"]


def _result(raw: Raw, run: RewriteState) -> Raw | None:
    """A kept search result with its context filtered; None if unchanged."""
    members = split_object(raw)
    if members is None:
        return None
    changed = False
    event = members.get("result")
    if event is not None and run.relevant(event):
        head = head_of(event)
        if head is not None:
            changed |= edit(members, "result", lambda e: fix_event(e, head, run))
    changed |= edit(
        members,
        "context",
        lambda context: _context(context, run),
    )
    return encode_object(members) if changed else None


def _context(raw: Raw, run: RewriteState) -> Raw | None:
    members = split_object(raw)
    if members is None:
        return None
    changed = False
    for key in ("events_before", "events_after"):
        changed |= edit(members, key, lambda events: filter_events(events, run))
    return encode_object(members) if changed else None


def _hidden_result(raw: Raw, run: RewriteState) -> bool:
    members = split_object(raw)
    if members is None or "result" not in members:
        return False
    head = head_of(members["result"])
    return head is not None and run.hides(head)


def _search_result(item: Raw, run: RewriteState) -> Raw | None:
    if _hidden_result(item, run):
        run.removed += 1
        return DROP
    return _result(item, run)


def _group_entries(raw: Raw, run: RewriteState) -> Raw | None:
    """A ``groups.{groupKey}`` member, ``{value: {...}}``, without entries keyed by an
    ignored user ID."""
    entries = split_object(raw)
    if entries is None or not drop_ignored_keys(entries, run):
        return None
    return encode_object(entries)


def _room_events(raw: Raw, run: RewriteState) -> Raw | None:
    members = split_object(raw)
    if members is None:
        return None
    changed = edit(
        members, "results", lambda r: edit_items(r, run, lambda i: _search_result(i, run))
    )
    changed |= edit(
        members, "groups", lambda g: edit_members(g, run, lambda _, e: _group_entries(e, run))
    )
    # {roomId: [state events]}: nothing removed, thread summaries fixed
    changed |= edit(
        members,
        "state",
        lambda s: edit_members(s, run, lambda _, e: filter_events(e, run, keep_all=True)),
    )
    return encode_object(members) if changed else None


def rewrite_search(body: bytes, ctx: IgnoreContext) -> Rewritten | None:
    """``POST /search`` (``search_categories.room_events``): drop results whose ``result``
    is an ignored sender's non-state event, filter the kept results' ``context``, drop
    ``groups.*`` entries keyed by an ignored user. ``count``, ``highlights``,
    ``next_batch``, ``state`` kept; order kept."""
    started = start(body, ctx)
    if started is None:
        return None
    top, run = started
    changed = edit(
        top,
        "search_categories",
        lambda cats: edit_in(cats, "room_events", lambda r: _room_events(r, run)),
    )
    return finish(top, run, changed)
