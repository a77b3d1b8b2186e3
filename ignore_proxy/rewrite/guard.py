"""A last line of defence: whatever a route's rewriter knows about, no ignored user's
non-state event leaves the proxy.

``remove_ignored_events`` walks a decoded answer (after its rewriter) looking for
event-shaped objects: dicts with string ``event_id``, ``sender`` and ``type`` and no
``state_key`` key. One sent by an ignored user is removed where it sits directly in an
array (a list of events: the rewriters' rule), and anywhere else (an object's member,
where removing it would change the answer's shape) ``IgnoredEventLeft`` is raised with
its JSON path, for the proxy to refuse the answer rather than serve it.

Not searched: the ``content`` of an event. It is its sender's own words: a copy of an
ignored user's event there was put there by someone the user does not ignore (a quote),
and taking it out would let anyone make any answer fail. A redaction stub in
``unsigned.redacted_because`` (see ``events.redaction_stub``) is allowed: it carries
nothing of its sender's.

Meant to run only when the mention scan finds an ignored ID in the rewritten body. The
walk uses an explicit stack (any depth), and copies only the containers on the way to
what it removes: the rest of the tree is shared with its input, which is not changed.
That walk visits every object of the answer (plus a decode of all of it);
``guard_body_exact`` does the same on the raw body, splitting only the parts that mention
an ignored user and splicing the rest back untouched. That still reads a big answer
once per level on the way to each mention, and the ignored users' state events, which
stay, are mentions in many rooms of a ``/sync``. So ``guard_body`` first tries to show
from the bytes that there is nothing to remove (``sender_scan``), and walks only when
it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Final

import msgspec

from .events import DROP, RewriteState
from .raw import (
    Raw,
    as_bytes,
    decode_value,
    encode_array,
    encode_object,
    render,
    split_array,
    split_object,
)
from .sender_scan import event_sender, holds_no_ignored_event
from .types import IgnoreContext, Rewriter, Rewritten

__all__ = [
    "Guarded",
    "IgnoredEventLeft",
    "guard_body",
    "guard_body_exact",
    "remove_ignored_events",
    "rewrite_guarded",
]

Path = tuple[str | int, ...]
_encoder = msgspec.json.Encoder()

_STUB_KEYS: Final = frozenset(
    {"type", "event_id", "origin_server_ts", "redacts", "sender", "room_id", "content"}
)


class IgnoredEventLeft(Exception):
    """An ignored user's non-state event sits where it cannot just be removed (not
    directly in an array). ``path`` locates it (object keys and array indexes, from the
    top); the message names only the path, never any content."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"an ignored user's event is left at {json_pointer(path)}")
        self.path = path


def json_pointer(path: Path) -> str:
    """``path`` as an RFC 6901 JSON pointer."""
    parts = (str(p).replace("~", "~0").replace("/", "~1") for p in path)
    return "".join("/" + part for part in parts)


def _is_event(value: dict[str, Any]) -> bool:
    """Event-shaped, state or not."""
    return (
        isinstance(value.get("event_id"), str)
        and isinstance(value.get("sender"), str)
        and isinstance(value.get("type"), str)
    )


def _is_redaction_stub(value: dict[str, Any], path: Path) -> bool:
    # In `unsigned`, or at the event's top level where Synapse copies it.
    if not path or path[-1] != "redacted_because":
        return False
    content = value.get("content", {})
    return set(value) <= _STUB_KEYS and isinstance(content, dict) and set(content) <= {"redacts"}


def find_ignored_events(value: Any, ignored: frozenset[str]) -> list[Path]:
    """The paths of the ignored users' non-state events directly in arrays (in walk
    order); IgnoredEventLeft for the first found anywhere else."""
    found: list[Path] = []
    stack: list[tuple[Any, Path]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            event = _is_event(node)
            hidden = event and node["sender"] in ignored and "state_key" not in node
            if hidden and not _is_redaction_stub(node, path):
                if path and isinstance(path[-1], int):
                    found.append(path)
                    continue
                raise IgnoredEventLeft(path)
            for key, child in node.items():
                if isinstance(child, dict | list) and not (event and key == "content"):
                    stack.append((child, (*path, key)))
        elif isinstance(node, list):
            for index, child in enumerate(node):
                if isinstance(child, dict | list):
                    stack.append((child, (*path, index)))
    return found


def remove_ignored_events(value: Any, ignored: frozenset[str]) -> tuple[Any, int]:
    """``value`` without the ignored users' non-state events that sit directly in arrays,
    and how many were removed (``value`` itself when none). IgnoredEventLeft if one
    sits anywhere else. ``value`` is not changed."""
    found = find_ignored_events(value, ignored)
    if not found:
        return value, 0
    made: set[int] = set()

    def copy_for_removal(node: Any) -> Any:
        """A shallow copy of a container on the way to a removal."""
        copy = list(node) if isinstance(node, list) else dict(node)
        made.add(id(copy))
        return copy

    root = copy_for_removal(value)
    removals: dict[int, tuple[list[Any], list[int]]] = {}
    for path in found:
        parent = root
        for step in path[:-1]:
            child = parent[step]
            if id(child) not in made:
                child = copy_for_removal(child)
                parent[step] = child
            parent = child
        index = path[-1]
        assert isinstance(index, int) and isinstance(parent, list)
        removals.setdefault(id(parent), (parent, []))[1].append(index)
    for array, indexes in removals.values():
        for index in sorted(indexes, reverse=True):
            del array[index]
    return root, len(found)


def guard_body(body: bytes, ctx: IgnoreContext) -> Rewritten | None:
    """``remove_ignored_events`` on a raw JSON body (a rewriter's answer): None if
    nothing was removed, else the new body, what was not removed byte for byte as it
    was. IgnoredEventLeft as there. A body that is not JSON is left alone."""
    if holds_no_ignored_event(body, ctx.ignored):
        return None
    return guard_body_exact(body, ctx)


def guard_body_exact(body: bytes, ctx: IgnoreContext) -> Rewritten | None:
    """``guard_body`` by walking the body, without its byte-level shortcut."""
    run = RewriteState(ctx, body)
    if not run.anything:
        return None
    try:
        new = _guard_raw(Raw(body), (), run)
    except RecursionError:
        # nesting deeper than this walk's stack: the iterative walk over the decoded body
        value = decode_value(body)
        if value is None:
            # deeper than the decoders go (~1000 levels): it mentions an ignored user and
            # cannot be shown to hold none of their events
            raise IgnoredEventLeft(()) from None
        value, removed = remove_ignored_events(value, ctx.ignored)
        return Rewritten(_encoder.encode(value), removed) if removed else None
    if new is None:
        return None
    if new is DROP:  # the whole body is an ignored event
        raise IgnoredEventLeft(())
    return run.result(render(new))


def _guard_raw(raw: Raw, path: Path, run: RewriteState) -> Raw | None:
    """``raw`` without ignored events (None if unchanged); DROP if it is one itself,
    for the array holding it to remove (else its parent raises)."""
    if not run.relevant(raw):
        return None
    members = split_object(raw)
    if members is None:
        items = split_array(raw)
        if items is not None:
            return _guard_items(items, path, run)
        if as_bytes(raw).lstrip()[:1] in (b"{", b"["):
            # a container no decoder could split from this deep in the stack
            raise RecursionError
        return None
    # the members, not head_of(raw): that would parse all of a big object once more
    sender = event_sender(members)
    event = sender is not None
    hidden = event and sender in run.ignored
    if hidden and "state_key" not in members and not _raw_is_redaction_stub(members, path):
        run.removed += 1
        return DROP
    changed = False
    for key, value in members.items():
        if event and key == "content":
            continue
        new = _guard_raw(value, (*path, key), run)
        if new is None:
            continue
        if new is DROP:
            raise IgnoredEventLeft((*path, key))
        members[key] = new
        changed = True
    return encode_object(members) if changed else None


def _guard_items(items: list[Raw], path: Path, run: RewriteState) -> Raw | None:
    dropped: list[int] = []
    changed = False
    for index in run.relevant_indexes(items):
        new = _guard_raw(items[index], (*path, index), run)
        if new is None:
            continue
        changed = True
        if new is DROP:
            dropped.append(index)
        else:
            items[index] = new
    for index in reversed(dropped):
        del items[index]
    return encode_array(items) if changed else None


def _raw_is_redaction_stub(members: dict[str, Raw], path: Path) -> bool:
    # In `unsigned`, or at the event's top level where Synapse copies it.
    if not path or path[-1] != "redacted_because":
        return False
    content = split_object(members["content"]) if "content" in members else {}
    return set(members) <= _STUB_KEYS and content is not None and set(content) <= {"redacts"}


@dataclass(frozen=True, slots=True)
class Guarded:
    """A route's rewrite checked by the guard: `caught` events the rewriter left in."""

    rewritten: Rewritten | None
    caught: int = 0


def rewrite_guarded(rewriter: Rewriter, body: bytes, ctx: IgnoreContext) -> Guarded:
    """`rewriter`'s answer, then `guard_body` over it (which looks no further than one
    scan of the bytes where no ignored user's event can be left). Raises what they raise:
    SenderIgnored, InvalidBody, IgnoredEventLeft."""
    rewritten = rewriter(body, ctx)
    final = body if rewritten is None else rewritten.body
    caught = guard_body(final, ctx)
    if caught is None:
        return Guarded(rewritten)
    base = rewritten if rewritten is not None else Rewritten(body, 0)
    return Guarded(replace(base, body=caught.body, removed=base.removed + caught.removed),
                   caught.removed)  # fmt: skip
