"""Sliding sync (MSC4186, ``POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync``)."""

from __future__ import annotations

from .events import (
    DROP,
    RewriteState,
    count_hidden_tail,
    edit_members,
    filter_events,
    filter_receipt,
    filter_typing,
)
from .nogc import without_gc
from .raw import Raw, decode_value, encode_object, split_object
from .sync import membership_is_hidden_invite
from .types import IgnoreContext, Rewritten
from .walk import edit, edit_in, finish, start

__all__ = ["rewrite_sliding_sync"]

_INVITE_KEYS = ("invite_state", "stripped_state")


def _room(raw: Raw, run: RewriteState) -> Raw | None:
    room = split_object(raw)
    if room is None:
        return None
    changed = False
    timeline = room.get("timeline")
    if timeline is not None:
        num_live = room.get("num_live")
        live = decode_value(num_live) if num_live is not None else None
        hidden_live = (
            count_hidden_tail(timeline, run, live)
            if isinstance(live, int) and not isinstance(live, bool) and live > 0
            else 0
        )
        new = filter_events(timeline, run)
        if new is not None:
            room["timeline"] = new
            changed = True
            if hidden_live and isinstance(live, int):
                room["num_live"] = Raw(str(live - hidden_live).encode())
    changed |= edit(room, "required_state", lambda s: filter_events(s, run, keep_all=True))
    return encode_object(room) if changed else None


def _invite_hidden(raw: Raw, run: RewriteState) -> bool:
    room = split_object(raw)
    if room is None:
        return False
    return any(key in room and membership_is_hidden_invite(room[key], run) for key in _INVITE_KEYS)


def _rooms(raw: Raw, run: RewriteState) -> Raw | None:
    def room(room_id: str, room_raw: Raw) -> Raw | None:
        if _invite_hidden(room_raw, run):
            run.hidden_invites.append(room_id)
            run.removed += 1
            return DROP
        run.room_id = room_id
        return _room(room_raw, run)

    return edit_members(raw, run, room)


def _ephemeral_rooms(raw: Raw, run: RewriteState, typing: bool) -> Raw | None:
    """``{roomId: event}`` of typing or receipt events; a receipt event left empty is
    removed with its room key."""
    one = filter_typing if typing else filter_receipt
    return edit_members(raw, run, lambda _, event: one(event, run))


def _sticky_rooms(raw: Raw, run: RewriteState) -> Raw | None:
    """``{roomId: {"events": [...]}}`` of sticky events, filtered as timelines."""

    def room(room_id: str, room_raw: Raw) -> Raw | None:
        run.room_id = room_id
        return edit_in(room_raw, "events", lambda events: filter_events(events, run))

    return edit_members(raw, run, room)


_STICKY_EXTENSIONS = ("org.matrix.msc4354.sticky_events", "sticky_events")
"""MSC4354's sliding sync extension: its unstable name, and the stable one to come."""


def _extensions(raw: Raw, run: RewriteState) -> Raw | None:
    if not run.relevant(raw):
        return None
    extensions = split_object(raw)
    if extensions is None:
        return None
    changed = False
    if run.ctx.filter_ephemeral:
        changed |= edit(
            extensions,
            "typing",
            lambda t: edit_in(t, "rooms", lambda r: _ephemeral_rooms(r, run, typing=True)),
        )
        changed |= edit(
            extensions,
            "receipts",
            lambda t: edit_in(t, "rooms", lambda r: _ephemeral_rooms(r, run, typing=False)),
        )
    for key in _STICKY_EXTENSIONS:
        changed |= edit(
            extensions, key, lambda ext: edit_in(ext, "rooms", lambda r: _sticky_rooms(r, run))
        )
    return encode_object(extensions) if changed else None


@without_gc
def rewrite_sliding_sync(body: bytes, ctx: IgnoreContext) -> Rewritten | None:
    """Filter a simplified sliding sync response.

    ``rooms.*.timeline``: drop ignored senders' non-state events, lowering ``num_live``
    by those removed among the last ``num_live``; ``required_state`` kept; rooms whose
    ``stripped_state`` (formerly ``invite_state``) shows the user invited by an ignored
    user are dropped, not knocks or rejections (see ``sync.membership_is_hidden_invite``;
    ``lists`` counts are left alone). MSC4354 sticky events,
    ``extensions."org.matrix.msc4354.sticky_events".rooms.*.events``, filtered as
    timelines. If ``ctx.filter_ephemeral``: ``extensions.typing.rooms.*`` and
    ``extensions.receipts.rooms.*`` without ignored users. ``extensions.account_data``
    and everything else untouched.
    """
    started = start(body, ctx)
    if started is None:
        return None
    top, run = started
    changed = edit(top, "rooms", lambda raw: _rooms(raw, run))
    changed |= edit(top, "extensions", lambda raw: _extensions(raw, run))
    return finish(top, run, changed)
