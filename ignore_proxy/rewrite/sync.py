"""``GET /sync``."""

from __future__ import annotations

from itertools import repeat
from typing import Any, cast

import msgspec

from .events import Run, filter_events, head_of
from .raw import (
    EMPTY,
    Raw,
    Tree4,
    as_bytes,
    encode_object,
    render,
    split_array,
    split_object,
    split_object2,
    split_object4,
    tree4_len,
)
from .types import IgnoreContext, Rewritten
from .walk import edit, edit_in, finish, start

__all__ = ["invite_is_hidden", "rewrite_sync"]


def _section_events(
    room: dict[str, Raw], key: str, run: Run, *, keep_all: bool = False, ephemeral: bool = False
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


def _room(raw: Raw, run: Run, *, joined: bool) -> Raw | None:
    if not run.relevant(raw):
        return None
    sections = split_object2(raw)
    if sections is None:
        return _room_by_levels(raw, run, joined=joined)
    return encode_object(sections) if _room_sections(sections, run, joined=joined) else None


def _room_sections(sections: dict[str, dict[str, Raw]], run: Run, *, joined: bool) -> bool:
    """Filter the sections of a room split two levels deep, in place; True if changed."""
    ephemeral = joined and run.ctx.filter_ephemeral
    changed = False
    for key, keep_all in _SECTIONS:
        section = sections.get(key)
        if section is None or (key == "ephemeral" and not ephemeral) or "events" not in section:
            continue
        new = filter_events(section["events"], run, keep_all=keep_all, ephemeral=key == "ephemeral")
        if new is not None:
            section["events"] = new
            changed = True
    return changed


_SECTIONS = (("timeline", False), ("state", True), ("state_after", True), ("ephemeral", True))


def _room_by_levels(raw: Raw, run: Run, *, joined: bool) -> Raw | None:
    room = split_object(raw)
    if room is None:
        return None
    changed = _section_events(room, "timeline", run)
    changed |= _section_events(room, "state", run, keep_all=True)
    changed |= _section_events(room, "state_after", run, keep_all=True)
    if joined and run.ctx.filter_ephemeral:
        changed |= _section_events(room, "ephemeral", run, keep_all=True, ephemeral=True)
    return encode_object(room) if changed else None


def _rooms(raw: Raw, run: Run, *, joined: bool) -> Raw | None:
    if not run.relevant(raw):
        return None
    rooms = split_object(raw)
    if rooms is None:
        return None
    return encode_object(rooms) if _rooms_in(rooms, run, joined=joined) else None


def _rooms_in(rooms: dict[str, Raw], run: Run, *, joined: bool) -> bool:
    changed = False
    for room_id in rooms:
        run.room_id = room_id
        changed |= edit(rooms, room_id, lambda room: _room(room, run, joined=joined))
    return changed


def _rooms_deep(rooms: dict[str, dict[str, dict[str, Raw]]], run: Run, *, joined: bool) -> bool:
    """``_rooms_in`` on rooms already split two levels deep (edited in place).

    Each kind of events list is gathered from all rooms and searched at once: most
    lists mention no ignored user, and they then cost no Python code of their own.
    """
    room_ids = list(rooms)
    room_list = list(rooms.values())
    ephemeral = joined and run.ctx.filter_ephemeral
    found: list[tuple[int, int, dict[str, Raw]]] = []
    for rank, (key, _) in enumerate(_SECTIONS):
        if key == "ephemeral" and not ephemeral:
            continue
        sections = list(map(dict.get, room_list, repeat(key), repeat(_NO_SECTION)))
        events = list(map(dict.get, sections, repeat("events"), repeat(EMPTY)))
        found.extend((index, rank, sections[index]) for index in run.relevant_indexes(events))
    changed = False
    # room by room, sections in their usual order: stale threads are reported as before
    for index, rank, section in sorted(found):
        run.room_id = room_ids[index]
        key, keep_all = _SECTIONS[rank]
        new = filter_events(
            section["events"],
            run,
            keep_all=keep_all,
            ephemeral=key == "ephemeral",
            searched=True,
        )
        if new is not None:
            section["events"] = new
            changed = True
    return changed


_NO_SECTION: dict[str, Raw] = {}


def _invites_deep(rooms: dict[str, dict[str, dict[str, Raw]]], run: Run) -> bool:
    """``_invites_in`` on rooms already split two levels deep (edited in place)."""
    hidden = []
    for room_id, room in rooms.items():
        invite_state = room.get("invite_state")
        if invite_state is None or "events" not in invite_state:
            continue
        if invite_is_hidden(invite_state["events"], run):
            hidden.append(room_id)
    return _drop_invites(rooms, hidden, run)


def _drop_invites(rooms: dict[str, Any], hidden: list[str], run: Run) -> bool:
    """Remove the rooms whose invite is hidden, and record them (for invite rejection)."""
    for room_id in hidden:
        del rooms[room_id]
    run.removed += len(hidden)
    run.hidden_invites.extend(hidden)
    return bool(hidden)


def _sync_deep(deep: Tree4, run: Run) -> bool:
    changed = False
    if "join" in deep:
        changed |= _rooms_deep(deep["join"], run, joined=True)
    if "leave" in deep:
        changed |= _rooms_deep(deep["leave"], run, joined=False)
    if "invite" in deep:
        changed |= _invites_deep(deep["invite"], run)
    return changed


def invite_is_hidden(events: Raw, run: Run) -> bool:
    """Does this list of stripped state hold an invite of the user by an ignored user?"""
    if not run.relevant(events):
        return False
    items = split_array(events)
    if items is None:
        return False
    for item in items:
        head = head_of(item) if run.relevant(item) else None
        if head is not None and run.hides_invite(head):
            return True
    return False


def _invites(raw: Raw, run: Run) -> Raw | None:
    if not run.relevant(raw):
        return None
    rooms = split_object(raw)
    if rooms is None:
        return None
    return encode_object(rooms) if _invites_in(rooms, run) else None


def _invites_in(rooms: dict[str, Raw], run: Run) -> bool:
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
    return _drop_invites(rooms, hidden, run)


class _Top(msgspec.Struct):
    """The members of a ``/sync`` answer: ``rooms`` split four levels deep, the others
    raw (empty when absent). Unknown members are skipped by msgspec: ``_split_top``
    then finds the lengths do not add up and the caller splits the body generically."""

    rooms: Tree4 | msgspec.UnsetType = msgspec.UNSET
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


def _split_top(body: bytes) -> tuple[Tree4, dict[str, Raw]] | None:
    """The ``rooms`` of a compact ``/sync`` body split four levels deep, and all the
    top-level members in their order (``rooms`` as that tree); None unless the body is
    an object of known members only, written compactly with minimal spelling (then, and
    only then, the lengths of its parts add up to ``len(body)``, and rendering those
    members gives ``body`` back)."""
    try:
        top = _top_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    if isinstance(top.rooms, msgspec.UnsetType):
        return None
    rooms_len = tree4_len(top.rooms)
    if rooms_len < 0:
        return None
    members = {b"rooms": rooms_len}
    values: dict[bytes, Raw] = {b"rooms": cast(Raw, top.rooms)}
    for name, key in _TOP_NAMES:
        value = getattr(top, name)
        if len(value):
            members[key] = len(value)
            values[key] = value
    # braces, and per member: quoted key, colon, value, comma (one fewer)
    total = 1 + sum(len(key) + 4 + length for key, length in members.items())
    if total != len(body):
        return None
    ordered: dict[str, Raw] = {}
    pos = 1
    while members:
        for key in members:
            if body.startswith(b'"%s":' % key, pos):
                break
        else:
            return None
        start = pos + len(key) + 3
        end = start + members.pop(key)
        if key != b"rooms" and body[start:end] != as_bytes(values[key]):
            return None
        if body[end : end + 1] != (b"," if members else b"}"):
            return None
        ordered[key.decode()] = values[key]
        pos = end + 1
    return top.rooms, ordered


def rewrite_sync(body: bytes, ctx: IgnoreContext) -> Rewritten | None:
    """Filter a ``/sync`` response.

    ``rooms.{join,leave}.*.timeline.events``: drop ignored senders' non-state events.
    ``rooms.invite.*``: drop rooms the user was invited to by an ignored user.
    ``rooms.join.*.ephemeral.events`` (if ``ctx.filter_ephemeral``): ignored users out of
    ``m.typing`` and ``m.receipt``. Bundled thread summaries everywhere. Everything else,
    including ``limited`` and ``prev_batch``, is left as it was.
    """
    split = _split_top(body)
    if split is not None:
        deep, members = split
        run = Run(ctx, body)
        if not run.anything or not _sync_deep(deep, run):
            return None
        return run.result(render(members))
    started = start(body, ctx)
    if started is None:
        return None
    top, run = started
    rooms_raw = top.get("rooms")
    if rooms_raw is None or not run.relevant(rooms_raw):
        return None
    rooms_deep = split_object4(rooms_raw)
    if rooms_deep is not None:
        changed = _sync_deep(rooms_deep, run)
        if changed:
            top["rooms"] = encode_object(cast(dict[str, Raw], rooms_deep))
        return finish(top, run, changed)
    sections = split_object2(rooms_raw)
    if sections is not None:
        changed = False
        if "join" in sections:
            changed |= _rooms_in(sections["join"], run, joined=True)
        if "leave" in sections:
            changed |= _rooms_in(sections["leave"], run, joined=False)
        if "invite" in sections:
            changed |= _invites_in(sections["invite"], run)
        if changed:
            top["rooms"] = encode_object(sections)
        return finish(top, run, changed)
    rooms = split_object(rooms_raw)
    if rooms is None:
        return None
    changed = edit(rooms, "join", lambda raw: _rooms(raw, run, joined=True))
    changed |= edit(rooms, "leave", lambda raw: _rooms(raw, run, joined=False))
    changed |= edit(rooms, "invite", lambda raw: _invites(raw, run))
    if changed:
        top["rooms"] = encode_object(rooms)
    return finish(top, run, changed)
