"""Thread summaries whose `count` may include ignored users' replies.

The threading module says a bundled `m.thread` summary's `count` does not count replies
of ignored users. A summary whose `latest_event` is an ignored user's is replaced by the
rewriters (see `events._fix_thread`); any other one may still count ignored replies the
answer does not show, and nothing in the answer tells. So the proxy finds every summary
that counts more than one reply (`find_thread_counts`), learns the right count from the
homeserver once per thread and state of it (the proxy's cache, keyed by the summary's
`latest_event` and `count`: a new reply changes them), and writes it in
(`apply_thread_counts`). Pure: no I/O; only the parts holding `"m.thread"` are split,
everything else is spliced back byte for byte.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

import msgspec

from .raw import Raw, encode_array, encode_object, render, split_array, split_object

__all__ = ["ThreadCount", "apply_thread_counts", "find_thread_counts", "latest_and_count"]

_THREAD: Final = re.compile(rb'"m\.thread"')
_ROOM_SECTIONS: Final = frozenset({"join", "leave", "invite", "knock"})


@dataclass(frozen=True, slots=True)
class ThreadCount:
    """A summary as the homeserver sent it, and where its thread is."""

    room_id: str
    root_id: str
    latest_id: str
    count: int
    summary: bytes


class _Head(msgspec.Struct):
    event_id: str | None = None
    room_id: str | None = None


class _Latest(msgspec.Struct):
    event_id: str | None = None


class _Summary(msgspec.Struct):
    count: int | None = None
    latest_event: _Latest | None = None


def find_thread_counts(body: bytes) -> list[ThreadCount]:
    """Every thread summary of more than one reply in an answer (each root once)."""
    if _THREAD.search(body) is None:
        return []
    found: dict[str, ThreadCount] = {}
    for event, room_id in _events_with_threads(Raw(body), None, None):
        seen = _summary_of(event, room_id)
        if seen is not None and seen.count > 1:
            found.setdefault(seen.root_id, seen)
    return list(found.values())


def apply_thread_counts(body: bytes, counts: Mapping[str, int]) -> bytes | None:
    """The answer with the summary of each root in `counts` counting that many replies;
    None if nothing changed."""
    if not counts or _THREAD.search(body) is None:
        return None
    fixed = _fix(Raw(body), counts)
    return None if fixed is None else render(fixed)


def _events_with_threads(
    raw: Raw, room_id: str | None, parent: str | int | None
) -> Iterator[tuple[Raw, str | None]]:
    """Objects holding `unsigned` with a thread summary, with the room they are in where
    the path says (`rooms.join.{roomId}` of `/sync`)."""
    stack: list[tuple[Raw, str | None, str | int | None]] = [(raw, room_id, parent)]
    while stack:
        node, room, key = stack.pop()
        if _THREAD.search(memoryview(node)) is None:
            continue
        members = split_object(node)
        if members is not None and "unsigned" in members and "event_id" in members:
            yield node, room
        items = split_array(node) if members is None else None
        children: Iterable[tuple[str | int, Raw]] = (
            members.items() if members is not None else enumerate(items or [])
        )
        for child_key, child in children:
            if child_key == "content" and members is not None:
                continue  # an event's content is its sender's words, not a summary
            child_room = child_key if key in _ROOM_SECTIONS and isinstance(child_key, str) else room
            stack.append((child, child_room, child_key))


def _summary_of(event: Raw, room_id: str | None) -> ThreadCount | None:
    try:
        head = msgspec.json.decode(event, type=_Head)
    except msgspec.MsgspecError:
        return None
    thread = _thread_of(event)
    if thread is None or head.event_id is None:
        return None
    try:
        summary = msgspec.json.decode(thread, type=_Summary)
    except msgspec.MsgspecError:
        return None
    room = head.room_id or room_id
    latest = summary.latest_event.event_id if summary.latest_event is not None else None
    if room is None or latest is None or summary.count is None:
        return None
    return ThreadCount(room, head.event_id, latest, summary.count, bytes(memoryview(thread)))


def latest_and_count(summary: bytes) -> tuple[str, int] | None:
    """A summary's latest reply and count, as `find_thread_counts` keys them."""
    try:
        decoded = msgspec.json.decode(summary, type=_Summary)
    except msgspec.MsgspecError:
        return None
    latest = decoded.latest_event.event_id if decoded.latest_event is not None else None
    return None if latest is None or decoded.count is None else (latest, decoded.count)


def _thread_of(event: Raw) -> Raw | None:
    members = split_object(event)
    unsigned = None if members is None else members.get("unsigned")
    relations = None if unsigned is None else (split_object(unsigned) or {}).get("m.relations")
    return None if relations is None else (split_object(relations) or {}).get("m.thread")


def _fix(node: Raw, counts: Mapping[str, int]) -> Raw | None:
    if _THREAD.search(memoryview(node)) is None:
        return None
    members = split_object(node)
    if members is not None:
        fixed = _fixed_event(members, counts) if "unsigned" in members else None
        if fixed is not None:
            return fixed
        changed = False
        for key, value in members.items():
            if key == "content":
                continue  # its sender's words: a summary quoted there is not the thread's
            new = _fix(value, counts)
            if new is not None:
                members[key], changed = new, True
        return encode_object(members) if changed else None
    items = split_array(node)
    if items is None:
        return None
    changed = False
    for index, item in enumerate(items):
        new = _fix(item, counts)
        if new is not None:
            items[index], changed = new, True
    return encode_array(items) if changed else None


def _fixed_event(members: dict[str, Raw], counts: Mapping[str, int]) -> Raw | None:
    try:
        root_id = msgspec.json.decode(members.get("event_id", b"null"))
    except msgspec.MsgspecError:
        return None
    if not isinstance(root_id, str) or root_id not in counts:
        return None
    unsigned = split_object(members["unsigned"])
    relations = None if unsigned is None else split_object(unsigned.get("m.relations", b"null"))
    thread = None if relations is None else split_object(relations.get("m.thread", b"null"))
    if unsigned is None or relations is None or thread is None:
        return None
    count = Raw(str(counts[root_id]).encode())
    if bytes(memoryview(thread.get("count", b""))) == bytes(memoryview(count)):
        return None
    thread["count"] = count
    relations["m.thread"] = encode_object(thread)
    unsigned["m.relations"] = encode_object(relations)
    members["unsigned"] = encode_object(unsigned)
    return encode_object(members)
