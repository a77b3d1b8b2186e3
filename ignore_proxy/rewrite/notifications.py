"""``GET /notifications``."""

from __future__ import annotations

from .events import Run, fix_event, head_of, is_invite_for
from .raw import Raw, encode_array, encode_object, split_array, split_object
from .types import IgnoreContext, Rewritten
from .walk import edit, finish, start

__all__ = ["rewrite_notifications"]


def _notifications(raw: Raw, run: Run) -> Raw | None:
    if not run.relevant(raw):
        return None
    items = split_array(raw)
    if items is None:
        return None
    out: list[Raw] = []
    changed = False
    for item in items:
        notification = split_object(item) if run.relevant(item) else None
        event = None if notification is None else notification.get("event")
        head = None if event is None else head_of(event)
        if notification is None or head is None:
            out.append(item)
            continue
        if run.hides(head) or (head.sender in run.ignored and is_invite_for(head, run.ctx.user_id)):
            run.removed += 1
            changed = True
            continue
        new = fix_event(event, head, run) if event is not None else None
        if new is not None:
            notification["event"] = new
            out.append(encode_object(notification))
            changed = True
        else:
            out.append(item)
    return encode_array(out) if changed else None


def rewrite_notifications(body: bytes, ctx: IgnoreContext) -> Rewritten | None:
    """``GET /notifications``: drop notifications for ignored senders' non-state events and
    for invites of the user by an ignored user; ``next_token`` kept."""
    started = start(body, ctx)
    if started is None:
        return None
    top, run = started
    changed = edit(top, "notifications", lambda raw: _notifications(raw, run))
    return finish(top, run, changed)
