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
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["IgnoredEventLeft", "remove_ignored_events"]

Path = tuple[str | int, ...]

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
    if len(path) < 2 or path[-1] != "redacted_because" or path[-2] != "unsigned":
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

    def own(node: Any) -> Any:
        """A shallow copy of a container on the way to a removal."""
        copy = list(node) if isinstance(node, list) else dict(node)
        made.add(id(copy))
        return copy

    root = own(value)
    removals: dict[int, tuple[list[Any], list[int]]] = {}
    for path in found:
        parent = root
        for step in path[:-1]:
            child = parent[step]
            if id(child) not in made:
                child = own(child)
                parent[step] = child
            parent = child
        index = path[-1]
        assert isinstance(index, int) and isinstance(parent, list)
        removals.setdefault(id(parent), (parent, []))[1].append(index)
    for array, indexes in removals.values():
        for index in sorted(indexes, reverse=True):
            del array[index]
    return root, len(found)
