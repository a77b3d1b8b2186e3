"""``GET /notifications``."""

from __future__ import annotations

from .events import DROP, RewriteState, edit_items, fix_event, head_of
from .raw import Raw, encode_object, split_object
from .types import IgnoreContext, Rewritten
from .walk import edit, finish, start

__all__ = ["rewrite_notifications"]


def _notification(item: Raw, run: RewriteState) -> Raw | None:
    notification = split_object(item)
    event = None if notification is None else notification.get("event")
    head = None if event is None else head_of(event)
    if notification is None or event is None or head is None:
        return None
    if run.hides(head) or run.hides_invite(head):
        run.removed += 1
        return DROP
    new = fix_event(event, head, run)
    if new is None:
        return None
    notification["event"] = new
    return encode_object(notification)


def rewrite_notifications(body: bytes, ctx: IgnoreContext) -> Rewritten | None:
    """``GET /notifications``: drop notifications for ignored senders' non-state events and
    for invites of the user by an ignored user; ``next_token`` kept."""
    started = start(body, ctx)
    if started is None:
        return None
    top, run = started
    changed = edit(
        top, "notifications", lambda raw: edit_items(raw, run, lambda i: _notification(i, run))
    )
    return finish(top, run, changed)
