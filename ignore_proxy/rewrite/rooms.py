"""Room history endpoints: ``/messages``, ``/context``, single events, ``/relations``,
``/threads``, the legacy ``/events`` stream, both ``/initialSync`` and MSC2836
``/event_relationships``.

``/threads`` roots sent by an ignored user are dropped from ``chunk``, as Synapse does,
rather than served redacted as the spec's threading module says. A faithful redaction can
keep their text: the algorithm keeps content keys by event type, and nothing stops a
non-state ``m.room.join_rules`` root with ``{"join_rule": "<any text>"}``. A stub with no
content at all would be an event no redaction leaves, and would still list a thread
started by someone the user ignores, which is what ignoring is for. The cost, shared with
Synapse: replies of others under such a root are listed by no ``/threads`` page (and
``/relations`` on that root answers ``M_SENDER_IGNORED``)."""

from __future__ import annotations

from typing import cast

from .events import (
    DROP,
    RewriteState,
    edit_items,
    edit_items_at,
    event_filter,
    filter_events,
    fix_event,
    head_of,
)
from .nogc import without_gc
from .raw import (
    Raw,
    SplitValue,
    decode_value,
    encode_object,
    render,
    render_edited,
    split_array,
    split_members,
    split_object,
    top_object,
)
from .types import IgnoreContext, Rewritten, SenderIgnored
from .walk import edit, edit_in, finish, start

__all__ = [
    "rewrite_context",
    "rewrite_event_relationships",
    "rewrite_events_stream",
    "rewrite_initial_sync",
    "rewrite_messages",
    "rewrite_relations",
    "rewrite_room_initial_sync",
    "rewrite_single_event",
    "rewrite_threads",
]


def _rewrite_lists(
    body: bytes,
    ctx: IgnoreContext,
    filtered: tuple[str, ...],
    state: tuple[str, ...] = (),
    single: tuple[str, ...] = (),
) -> Rewritten | None:
    """Filter the event lists ``filtered``, fix those in ``state`` (nothing removed), and
    check the events ``single``: SenderIgnored if one is an ignored sender's non-state
    event (they stand for the whole answer), else fixed in place."""
    members = split_members(body)
    if members is not None:
        run = RewriteState(ctx, body)
        if not run.anything:
            return None
        changed = _edit_singles(members, run, single)
        if not _edit_lists(members, run, filtered, state) and not changed:
            return None
        rendered = render_edited(members, body, run.shrunk)
        if rendered is not None:
            return run.result(rendered)
    started = start(body, ctx)
    if started is None:
        return None
    top, run = started
    changed = False
    for key in single:
        changed |= edit(top, key, lambda raw: single_event(raw, run))
    for key in filtered:
        changed |= edit(top, key, lambda raw: filter_events(raw, run))
    for key in state:
        changed |= edit(top, key, lambda raw: filter_events(raw, run, keep_all=True))
    return finish(top, run, changed)


def single_event(raw: Raw, run: RewriteState) -> Raw | None:
    """An event that stands for the whole answer: SenderIgnored if it is an ignored
    sender's non-state event, else the event fixed (None if unchanged)."""
    if not run.relevant(raw):
        return None
    head = head_of(raw)
    if head is None:
        return None
    if run.hides(head):
        assert head.sender is not None
        raise SenderIgnored(head.sender)
    return fix_event(raw, head, run)


def _edit_singles(
    members: dict[str, SplitValue], run: RewriteState, single: tuple[str, ...]
) -> bool:
    """``single_event`` on the events of a body split in one decode (as objects of raw
    members), in place; True if changed."""
    changed = False
    for key in single:
        value = members.get(key)
        if not isinstance(value, dict):
            continue
        raw = Raw(render(value))
        new = single_event(raw, run)
        if new is not None:
            if not isinstance(new, Raw):  # a changed tree (see raw.encode_object)
                new = Raw(render(new))
            members[key] = cast(SplitValue, new)  # a raw value renders as its bytes
            run.shrunk += len(raw) - len(new)
            changed = True
    return changed


def _edit_lists(
    members: dict[str, SplitValue],
    run: RewriteState,
    filtered: tuple[str, ...],
    state: tuple[str, ...],
) -> bool:
    """The lists of a body split in one decode, edited in place; True if changed."""
    changed = False
    for keys, keep_all in ((filtered, False), (state, True)):
        judge_event = event_filter(run, keep_all=keep_all)
        for key in keys:
            items = members.get(key)
            if isinstance(items, list):
                shrunk = edit_items_at(items, run.relevant_indexes(items), judge_event)
                if shrunk is not None:
                    run.shrunk += shrunk
                    changed = True
    return changed


def rewrite_messages(body: bytes, ctx: IgnoreContext) -> Rewritten | None:
    """``GET /rooms/{roomId}/messages``: filter ``chunk``; ``state``, ``start``, ``end`` kept."""
    return _rewrite_lists(body, ctx, ("chunk",), ("state",))


def rewrite_relations(body: bytes, ctx: IgnoreContext) -> Rewritten | None:
    """``GET /rooms/{roomId}/relations/{eventId}...``: filter ``chunk``; tokens and
    ``recursion_depth`` kept. SenderIgnored if ``original_event`` (the parent, which
    Synapse's unstable variant adds) is an ignored sender's non-state event. When the
    answer carries no parent, whether it is hidden needs I/O: not done here."""
    return _rewrite_lists(body, ctx, ("chunk",), single=("original_event",))


def rewrite_event_relationships(body: bytes, ctx: IgnoreContext) -> Rewritten | None:
    """Dendrite's MSC2836 ``POST /_matrix/client/unstable/event_relationships``: filter
    ``events`` (whole events: the one asked about, its ancestors and children);
    ``next_batch`` and ``limited`` kept."""
    return _rewrite_lists(body, ctx, ("events",))


def rewrite_context(body: bytes, ctx: IgnoreContext) -> Rewritten | None:
    """``GET /rooms/{roomId}/context/{eventId}``.

    SenderIgnored if ``event`` is an ignored sender's non-state event; else filter
    ``events_before`` and ``events_after``; ``state``, ``start``, ``end`` kept.
    """
    started = start(body, ctx)
    if started is None:
        return None
    top, run = started
    changed = False
    event = top.get("event")
    if event is not None and run.relevant(event):
        head = head_of(event)
        if head is not None:
            if run.hides(head):
                assert head.sender is not None
                raise SenderIgnored(head.sender)
            changed |= edit(top, "event", lambda raw: fix_event(raw, head, run))
    for key in ("events_before", "events_after"):
        changed |= edit(top, key, lambda raw: filter_events(raw, run))
    changed |= edit(top, "state", lambda raw: filter_events(raw, run, keep_all=True))
    return finish(top, run, changed)


def rewrite_single_event(body: bytes, ctx: IgnoreContext) -> Rewritten | None:
    """``GET /rooms/{roomId}/event/{eventId}``, ``GET /events/{eventId}``: the body is the
    event. SenderIgnored if it is an ignored sender's non-state event."""
    top = top_object(body)
    run = RewriteState(ctx, body)
    if not run.anything:
        return None
    head = head_of(body)
    if head is None:  # pragma: no cover - top_object accepted an object
        return None
    if run.hides(head):
        assert head.sender is not None
        raise SenderIgnored(head.sender)
    new = fix_event(Raw(body), head, run)
    if new is None:
        return None
    del top
    return run.result(render(new))


def rewrite_threads(body: bytes, ctx: IgnoreContext) -> Rewritten | None:
    """``GET /rooms/{roomId}/threads``: roots by ignored senders dropped (see the module
    docstring), the thread summaries of the others fixed; ``next_batch`` kept."""
    started = start(body, ctx)
    if started is None:
        return None
    top, run = started
    changed = edit(top, "chunk", lambda raw: filter_events(raw, run))
    return finish(top, run, changed)


def rewrite_events_stream(body: bytes, ctx: IgnoreContext) -> Rewritten | None:
    """Legacy ``GET /events``: filter ``chunk``, including invites by ignored users and
    (if ``ctx.filter_ephemeral``) ignored users' typing and receipts."""
    started = start(body, ctx)
    if started is None:
        return None
    top, run = started
    changed = edit(top, "chunk", lambda raw: filter_events(raw, run, invites=True, ephemeral=True))
    return finish(top, run, changed)


def _messages_and_state(room: dict[str, Raw], run: RewriteState) -> bool:
    changed = edit(
        room, "messages", lambda raw: edit_in(raw, "chunk", lambda c: filter_events(c, run))
    )
    changed |= edit(room, "state", lambda raw: filter_events(raw, run, keep_all=True))
    return changed


def rewrite_room_initial_sync(body: bytes, ctx: IgnoreContext) -> Rewritten | None:
    """``GET /rooms/{roomId}/initialSync``: filter ``messages.chunk``; ``state`` kept."""
    started = start(body, ctx)
    if started is None:
        return None
    top, run = started
    return finish(top, run, _messages_and_state(top, run))


def _invited_by_ignored(room: dict[str, Raw], run: RewriteState) -> bool:
    membership = room.get("membership")
    if membership is None or decode_value(membership) != "invite":
        return False
    inviter = room.get("inviter")
    if inviter is not None:
        value = decode_value(inviter)
        if isinstance(value, str) and value in run.ignored:
            return True
    candidates: list[Raw] = []
    if "invite" in room:
        candidates.append(room["invite"])
    if "state" in room:
        candidates.extend(split_array(room["state"]) or ())
    for item in candidates:
        head = head_of(item) if run.relevant(item) else None
        if head is not None and run.hides_invite(head):
            return True
    return False


def _initial_sync_room(item: Raw, run: RewriteState) -> Raw | None:
    room = split_object(item)
    if room is None:
        return None
    if _invited_by_ignored(room, run):
        run.removed += 1
        return DROP
    return encode_object(room) if _messages_and_state(room, run) else None


@without_gc
def rewrite_initial_sync(body: bytes, ctx: IgnoreContext) -> Rewritten | None:
    """Legacy ``GET /initialSync``: in ``rooms[]`` filter ``messages.chunk`` (``state``
    kept) and drop rooms the user was invited to by an ignored user (``inviter``, the
    ``invite`` event or the invite in ``state``); ignored users' ``presence`` events
    dropped with ``filter_ephemeral``. ``account_data`` untouched."""
    started = start(body, ctx)
    if started is None:
        return None
    top, run = started
    changed = edit(
        top, "rooms", lambda raw: edit_items(raw, run, lambda i: _initial_sync_room(i, run))
    )
    if ctx.filter_ephemeral:
        changed |= edit(top, "presence", lambda raw: filter_events(raw, run))
    return finish(top, run, changed)
