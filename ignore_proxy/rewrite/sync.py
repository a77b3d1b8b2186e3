"""``GET /sync``."""

from __future__ import annotations

from itertools import repeat
from operator import itemgetter
from typing import Any, cast

import msgspec

from .events import (
    RewriteState,
    edit_items_at,
    event_filter,
    filter_events,
    head_of,
    is_membership_of,
)
from .nogc import without_gc
from .raw import (
    EMPTY,
    Raw,
    RoomsTree,
    SplitValue,
    encode_object,
    key_len,
    render,
    render_edited,
    split_array,
    split_object,
)
from .types import IgnoreContext, Rewritten
from .walk import edit, edit_in, finish, start

__all__ = ["invite_is_hidden", "membership_is_hidden_invite", "rewrite_sync"]


def _section_events(
    room: dict[str, Raw],
    key: str,
    run: RewriteState,
    *,
    keep_all: bool = False,
    ephemeral: bool = False,
) -> bool:
    """Filter ``room[key].events``."""
    section = room.get(key)
    if section is None or not run.relevant(section):
        return False
    new = edit_in(
        section,
        "events",
        lambda events: filter_events(events, run, keep_all=keep_all, ephemeral=ephemeral),
    )
    if new is None:
        return False
    room[key] = new
    return True


_SECTIONS = (
    ("timeline", False),
    ("state", True),
    ("state_after", True),
    ("ephemeral", True),
    # MSC4354 sticky events (unstable name, then the stable one): filtered as the timeline
    ("msc4354_sticky", False),
    ("sticky", False),
)
"""The event lists of a room, and whether all their events are kept (only fixed)."""


def _room(raw: Raw, run: RewriteState, *, joined: bool) -> Raw | None:
    if not run.relevant(raw):
        return None
    room = split_object(raw)
    if room is None:
        return None
    ephemeral = joined and run.ctx.filter_ephemeral
    changed = False
    for key, keep_all in _SECTIONS:
        if key != "ephemeral" or ephemeral:
            changed |= _section_events(
                room, key, run, keep_all=keep_all, ephemeral=key == "ephemeral"
            )
    return encode_object(room) if changed else None


def _rooms(raw: Raw, run: RewriteState, *, joined: bool) -> Raw | None:
    if not run.relevant(raw):
        return None
    rooms = split_object(raw)
    if rooms is None:
        return None
    changed = False
    for room_id in rooms:
        run.room_id = room_id
        changed |= edit(rooms, room_id, lambda room: _room(room, run, joined=joined))
    return encode_object(rooms) if changed else None


Room = dict[str, dict[str, SplitValue]]
"""A room split down to its sections' members (``timeline.events`` as a list of events)."""


def _rooms_deep(rooms: dict[str, Room], run: RewriteState, joined: bool) -> bool:
    """``_rooms`` on rooms already split down to their events (edited in place).

    The events of each kind of list are gathered from all rooms and searched at once:
    events that mention no ignored user (most of them) cost no Python code of their own.
    """
    room_ids = list(rooms)
    room_list = list(rooms.values())
    ephemeral = joined and run.ctx.filter_ephemeral
    found: list[tuple[int, int, list[Raw], list[int]]] = []
    for rank, (key, _) in enumerate(_SECTIONS):
        if key == "ephemeral" and not ephemeral:
            continue
        sections = map(dict.get, room_list, repeat(key), repeat(_NO_SECTION))
        lists = _lists(list(map(dict.get, sections, repeat("events"), repeat(_NO_EVENTS))))
        for index, items in run.relevant_items(lists).items():
            found.append((index, rank, lists[index], items))
    filters = [
        event_filter(run, keep_all=keep_all, ephemeral=key == "ephemeral")
        for key, keep_all in _SECTIONS
    ]
    changed = False
    # room by room, sections in their usual order: stale threads are reported in that order
    for index, rank, events, items in sorted(found, key=itemgetter(0, 1)):
        run.room_id = room_ids[index]
        shrunk = edit_items_at(events, items, filters[rank])
        if shrunk is not None:
            run.shrunk += shrunk
            changed = True
    return changed


_NO_SECTION: dict[str, SplitValue] = {}
_NO_EVENTS: list[Raw] = []  # never edited: it has no events


def _events_list(section: dict[str, SplitValue]) -> list[Raw]:
    events = section.get("events")
    return events if isinstance(events, list) else _NO_EVENTS


def _lists(values: list[SplitValue]) -> list[list[Raw]]:
    """``values`` with what is not a list (a malformed ``events``) as an empty list."""
    if all(map(isinstance, values, repeat(list))):
        return cast(list[list[Raw]], values)
    return [value if isinstance(value, list) else _NO_EVENTS for value in values]


def _invites_deep(rooms: dict[str, Room], run: RewriteState) -> bool:
    """``_invites`` on rooms already split down to their events (edited in place)."""
    hidden = []
    for room_id, room in rooms.items():
        invite_state = room.get("invite_state", _NO_SECTION)
        if _invite_in(_events_list(invite_state), run):
            hidden.append(room_id)
            run.shrunk += key_len(room_id) + 1 + len(render(room))  # "id":{...}
    if hidden:  # and the commas between them
        run.shrunk += max(len(rooms) - 1, 0) - max(len(rooms) - len(hidden) - 1, 0)
    return _drop_invites(rooms, hidden, run)


def _drop_invites(rooms: dict[str, Any], hidden: list[str], run: RewriteState) -> bool:
    """Remove the rooms whose invite is hidden, and record them (for invite rejection)."""
    for room_id in hidden:
        del rooms[room_id]
    run.removed += len(hidden)
    run.hidden_invites.extend(hidden)
    return bool(hidden)


def _sync_deep(deep: RoomsTree, run: RewriteState) -> bool:
    """`rooms.join`, `rooms.leave` and `rooms.invite` of a body split in one decode."""
    changed = False
    if "join" in deep:
        changed |= _rooms_deep(deep["join"], run, True)
    if "leave" in deep:
        changed |= _rooms_deep(deep["leave"], run, False)
    if "invite" in deep:
        changed |= _invites_deep(deep["invite"], run)
    return changed


def invite_is_hidden(events: Raw, run: RewriteState) -> bool:
    """Does this list of stripped state hold an invite of the user by an ignored user?"""
    if not run.relevant(events):
        return False
    items = split_array(events)
    return items is not None and _invite_in(items, run)


def membership_is_hidden_invite(events: Raw, run: RewriteState) -> bool:
    """Is the user's membership in this stripped state an invite by an ignored user?

    Sliding sync sends stripped state for knocks and rejected invites too, and there it
    can still hold the earlier invite (Synapse sends the stripped state that came with
    the invite or knock, then the user's membership event, last). So only the last
    ``m.room.member`` of the user counts: a knock, or a rejection of an ignored user's
    invite, is kept."""
    if not run.relevant(events):
        return False
    items = split_array(events)
    if items is None:
        return False
    for item in reversed(items):
        head = head_of(item)
        if head is not None and is_membership_of(head, run.ctx.user_id):
            return run.hides_invite(head)
    return False


def _invite_in(items: list[Raw], run: RewriteState) -> bool:
    for index in run.relevant_indexes(items):
        head = head_of(items[index])
        if head is not None and run.hides_invite(head):
            return True
    return False


def _invites(raw: Raw, run: RewriteState) -> Raw | None:
    if not run.relevant(raw):
        return None
    rooms = split_object(raw)
    if rooms is None:
        return None
    hidden = []
    for room_id, room_raw in rooms.items():
        room = split_object(room_raw) if run.relevant(room_raw) else None
        if room is None or "invite_state" not in room:
            continue
        invite_state = split_object(room["invite_state"])
        if invite_state is None or "events" not in invite_state:
            continue
        if invite_is_hidden(invite_state["events"], run):
            hidden.append(room_id)
    return encode_object(rooms) if _drop_invites(rooms, hidden, run) else None


class _Top(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """The members of a ``/sync`` answer: ``rooms`` split down to its events, the others
    raw (empty when absent). A body with another member is refused (it would be lost),
    and the caller splits it generically. Not tracked by the garbage collector: nothing
    it holds can refer back to it."""

    rooms: RoomsTree | msgspec.UnsetType = msgspec.UNSET
    next_batch: Raw = EMPTY
    account_data: Raw = EMPTY
    to_device: Raw = EMPTY
    device_lists: Raw = EMPTY
    presence: Raw = EMPTY
    device_one_time_keys_count: Raw = EMPTY
    device_unused_fallback_key_types: Raw = EMPTY
    msc2732_fallback_key_types: Raw = msgspec.field(
        default=EMPTY, name="org.matrix.msc2732.device_unused_fallback_key_types"
    )
    groups: Raw = EMPTY


_top_decoder = msgspec.json.Decoder(_Top)
_TOP_NAMES = tuple(
    (f.name, f.encode_name.encode()) for f in msgspec.structs.fields(_Top) if f.name != "rooms"
)


def _split_top(body: bytes) -> tuple[RoomsTree, dict[str, Raw]] | None:
    """The ``rooms`` of a ``/sync`` body split down to its events, and all the top-level
    members in their order (``rooms`` as that tree); None unless the top level is
    compact with each member known (see ``_Top``) and there once.

    Whether the text of ``rooms`` is compact (what rendering its tree writes) shows only
    once the tree is rendered: ``rewrite_sync`` checks it then, by length. Here it is
    taken to be the bytes all the other members leave."""
    try:
        top = _top_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    if isinstance(top.rooms, msgspec.UnsetType):
        return None
    others: dict[bytes, Raw] = {}
    for name, key in _TOP_NAMES:
        value = getattr(top, name)
        if len(value):
            others[key] = value
    # the body is "{", '"rooms":' and its text, ',"key":value' for each other member, "}"
    rooms_len = len(body) - 10 - sum(len(k) + 4 + len(v) for k, v in others.items())
    if rooms_len < 2:
        return None
    ordered: dict[str, Raw] = {}
    pos = 1  # past "{"
    for left in range(len(others), -1, -1):
        if "rooms" not in ordered and body.startswith(b'"rooms":{', pos):
            pos += 8 + rooms_len
            ordered["rooms"] = cast(Raw, top.rooms)
        else:
            member = next((k for k in others if body.startswith(b'"%s":' % k, pos)), None)
            if member is None:
                return None
            pos += len(member) + 3
            value = others.pop(member)
            if not body.startswith(value, pos):
                return None
            pos += len(value)
            ordered[member.decode()] = value
        if body[pos : pos + 1] != (b"," if left else b"}"):
            return None
        pos += 1
    return (top.rooms, ordered) if pos == len(body) else None


def without_ignored_presence(members: dict[str, Raw], run: RewriteState) -> bool:
    """`presence.events` without the ignored users' (with ``filter_ephemeral``): an
    `m.presence` event is sent by its user, and its `status_msg` is their words. The
    bytes this takes out of the compact text are counted in ``run.shrunk``."""
    raw = members.get("presence")
    if raw is None or not run.ctx.filter_ephemeral or not run.relevant(raw):
        return False
    section = split_object(raw)
    events = None if section is None else section.get("events")
    kept = None if events is None else filter_events(events, run)
    if section is None or kept is None:
        return False
    section["events"] = kept
    encoded = encode_object(section)
    run.shrunk += len(raw) - len(encoded)
    members["presence"] = encoded
    return True


@without_gc
def rewrite_sync(body: bytes, ctx: IgnoreContext) -> Rewritten | None:
    """Filter a ``/sync`` response.

    ``rooms.{join,leave}.*.timeline.events`` and MSC4354 sticky events
    (``msc4354_sticky.events``, stable ``sticky.events``): drop ignored senders'
    non-state events.
    ``rooms.invite.*``: drop rooms the user was invited to by an ignored user.
    ``rooms.join.*.ephemeral.events`` (if ``ctx.filter_ephemeral``): ignored users out of
    ``m.typing`` and ``m.receipt``. Bundled thread summaries everywhere. Everything else,
    including ``limited`` and ``prev_batch``, is left as it was.
    """
    # The fast path: the whole body in one decode, when its text is what rendering the
    # decoded tree writes (``render_edited`` checks that once the tree is edited).
    split = _split_top(body)
    if split is not None:
        deep, members = split
        run = RewriteState(ctx, body)
        if not run.anything:
            return None
        changed = _sync_deep(deep, run)
        changed |= without_ignored_presence(members, run)
        if not changed:
            return None
        rendered = render_edited(members, body, run.shrunk)
        if rendered is not None:
            return run.result(rendered)
    # The generic path: one level at a time, split only where an ignored user is mentioned;
    # what it does not split goes out as the bytes that came in.
    started = start(body, ctx)
    if started is None:
        return None
    top, run = started
    presence_changed = without_ignored_presence(top, run)
    rooms_raw = top.get("rooms")
    if rooms_raw is None or not run.relevant(rooms_raw):
        return finish(top, run, presence_changed)
    rooms = split_object(rooms_raw)
    if rooms is None:
        return finish(top, run, presence_changed)
    changed = presence_changed
    changed |= edit(rooms, "join", lambda raw: _rooms(raw, run, joined=True))
    changed |= edit(rooms, "leave", lambda raw: _rooms(raw, run, joined=False))
    changed |= edit(rooms, "invite", lambda raw: _invites(raw, run))
    if changed:
        top["rooms"] = encode_object(rooms)
    return finish(top, run, changed)
