"""``POST /search``."""

from __future__ import annotations

from .events import Run, filter_events, fix_event, head_of
from .raw import Raw, encode_array, encode_object, split_array, split_object
from .types import IgnoreContext, Rewritten
from .walk import edit, edit_in, finish, start

__all__ = ["rewrite_search"]


def _result(raw: Raw, run: Run) -> Raw | None:
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


def _context(raw: Raw, run: Run) -> Raw | None:
    members = split_object(raw)
    if members is None:
        return None
    changed = False
    for key in ("events_before", "events_after"):
        changed |= edit(members, key, lambda events: filter_events(events, run))
    return encode_object(members) if changed else None


def _hidden_result(raw: Raw, run: Run) -> bool:
    members = split_object(raw)
    if members is None or "result" not in members:
        return False
    head = head_of(members["result"])
    return head is not None and run.hides(head)


def _results(raw: Raw, run: Run) -> Raw | None:
    if not run.relevant(raw):
        return None
    items = split_array(raw)
    if items is None:
        return None
    out: list[Raw] = []
    changed = False
    for item in items:
        if not run.relevant(item):
            out.append(item)
            continue
        if _hidden_result(item, run):
            run.removed += 1
            changed = True
            continue
        new = _result(item, run)
        if new is None:
            out.append(item)
        else:
            out.append(new)
            changed = True
    return encode_array(out) if changed else None


def _groups(raw: Raw, run: Run) -> Raw | None:
    """``{groupKey: {value: {...}}}`` without entries keyed by an ignored user ID."""
    if not run.relevant(raw):
        return None
    groups = split_object(raw)
    if groups is None:
        return None
    changed = False
    for group_key, entries_raw in groups.items():
        entries = split_object(entries_raw) if run.relevant(entries_raw) else None
        if entries is None:
            continue
        hidden = [key for key in entries if key in run.ignored]
        if not hidden:
            continue
        for key in hidden:
            del entries[key]
        run.removed += len(hidden)
        groups[group_key] = encode_object(entries)
        changed = True
    return encode_object(groups) if changed else None


def _room_events(raw: Raw, run: Run) -> Raw | None:
    members = split_object(raw)
    if members is None:
        return None
    changed = edit(members, "results", lambda r: _results(r, run))
    changed |= edit(members, "groups", lambda g: _groups(g, run))
    changed |= edit(members, "state", lambda s: _state(s, run))
    return encode_object(members) if changed else None


def _state(raw: Raw, run: Run) -> Raw | None:
    """``{roomId: [state events]}``: nothing removed, thread summaries fixed."""
    if not run.relevant(raw):
        return None
    rooms = split_object(raw)
    if rooms is None:
        return None
    changed = False
    for room_id in rooms:
        changed |= edit(rooms, room_id, lambda s: filter_events(s, run, keep_all=True))
    return encode_object(rooms) if changed else None


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
