"""Reading ``m.ignored_user_list`` out of sync responses."""

from __future__ import annotations

from ..ids import is_user_id
from .raw import Raw, decode_value, split_array, split_object, top_object
from .types import InvalidBody

__all__ = [
    "ignored_users_from_content",
    "ignored_users_from_sliding_sync",
    "ignored_users_from_sync",
]

IGNORED_USER_LIST = "m.ignored_user_list"


def ignored_users_from_content(content: Raw | bytes) -> frozenset[str]:
    """The ignored users of an ``m.ignored_user_list`` content.

    A content (or ``ignored_users``) that is not an object means nobody is ignored;
    keys that do not look like user IDs are skipped.
    """
    members = split_object(content)
    if members is None or "ignored_users" not in members:
        return frozenset()
    users = split_object(members["ignored_users"])
    if users is None:
        return frozenset()
    return frozenset(key for key in users if is_user_id(key))


def _from_events(events: Raw) -> frozenset[str] | None:
    items = split_array(events)
    if items is None:
        return None
    found: frozenset[str] | None = None
    for item in items:
        event = split_object(item)
        if event is None or "type" not in event:
            continue
        if decode_value(event["type"]) != IGNORED_USER_LIST:
            continue
        found = ignored_users_from_content(event.get("content", Raw(b"null")))
    return found


def _top(body: bytes) -> dict[str, Raw] | None:
    try:
        return top_object(body)
    except InvalidBody:
        return None


def ignored_users_from_sync(body: bytes) -> frozenset[str] | None:
    """``m.ignored_user_list`` from a ``/sync`` body's ``account_data.events``.

    None if absent (or the body is not a JSON object); the last one wins if repeated.
    """
    top = _top(body)
    if top is None or "account_data" not in top:
        return None
    account_data = split_object(top["account_data"])
    if account_data is None or "events" not in account_data:
        return None
    return _from_events(account_data["events"])


def ignored_users_from_sliding_sync(body: bytes) -> frozenset[str] | None:
    """``m.ignored_user_list`` from a sliding sync body's ``extensions.account_data.global``
    (a list of events). None if absent (or the body is not a JSON object)."""
    top = _top(body)
    if top is None or "extensions" not in top:
        return None
    extensions = split_object(top["extensions"])
    if extensions is None or "account_data" not in extensions:
        return None
    account_data = split_object(extensions["account_data"])
    if account_data is None or "global" not in account_data:
        return None
    return _from_events(account_data["global"])
