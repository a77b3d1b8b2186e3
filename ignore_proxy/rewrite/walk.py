"""Small helpers to edit one member of a split JSON object in place."""

from __future__ import annotations

from collections.abc import Callable

from .events import RewriteState
from .raw import Raw, encode_object, render, split_object, top_object
from .types import IgnoreContext, Rewritten

__all__ = ["edit", "edit_in", "finish", "start"]


def edit(members: dict[str, Raw], key: str, fn: Callable[[Raw], Raw | None]) -> bool:
    """Replace ``members[key]`` by ``fn(members[key])`` unless that is None; True if it was."""
    value = members.get(key)
    if value is None:
        return False
    new = fn(value)
    if new is None:
        return False
    members[key] = new
    return True


def edit_in(raw: Raw, key: str, fn: Callable[[Raw], Raw | None]) -> Raw | None:
    """``raw`` (an object) with ``fn`` applied to its member ``key``; None if unchanged."""
    members = split_object(raw)
    if members is None or not edit(members, key, fn):
        return None
    return encode_object(members)


def start(body: bytes, ctx: IgnoreContext) -> tuple[dict[str, Raw], RewriteState] | None:
    """Split the top level (InvalidBody if it is not an object) and set up a run;
    None if the body certainly mentions no ignored user."""
    top = top_object(body)
    run = RewriteState(ctx, body)
    if not run.anything:
        return None
    return top, run


def finish(top: dict[str, Raw], run: RewriteState, changed: bool) -> Rewritten | None:
    if not changed:
        return None
    return run.result(render(top))
