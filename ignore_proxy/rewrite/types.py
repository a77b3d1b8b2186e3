"""Shared value types and exceptions of the rewriters."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = [
    "IgnoreContext",
    "InvalidBody",
    "Rewriter",
    "Rewritten",
    "SenderIgnored",
    "StaleThread",
]


@dataclass(frozen=True, slots=True)
class IgnoreContext:
    """Who is asking and whom they ignore."""

    ignored: frozenset[str]
    """User IDs the requesting user ignores (never empty when a rewriter is called)."""
    user_id: str
    """The requesting (effective) user."""
    filter_ephemeral: bool = True
    """Drop typing notifications and read receipts of ignored users."""
    thread_summaries: Mapping[str, bytes | None] | None = None
    """Replacement ``m.thread`` summaries by thread root event ID, for summaries whose
    ``latest_event`` is hidden (None: remove it). Learned by the proxy from the
    homeserver after a first rewrite reported them in ``Rewritten.stale_threads``."""


@dataclass(frozen=True, slots=True)
class StaleThread:
    """A bundled thread summary whose ``latest_event`` is an ignored user's reply."""

    room_id: str
    root_id: str
    summary: bytes
    """The summary as the homeserver sent it (``count``, ``current_user_participated``)."""


@dataclass(frozen=True, slots=True)
class Rewritten:
    """A rewritten body and how many events/entries were removed or redacted."""

    body: bytes
    removed: int
    stale_threads: tuple[StaleThread, ...] = ()
    """Thread summaries removed for want of a replacement (see IgnoreContext)."""
    hidden_invites: tuple[str, ...] = ()
    """Rooms whose invite from an ignored user was removed (sync and sliding sync)."""


class SenderIgnored(Exception):
    """The whole response must become 404 ``M_SENDER_IGNORED``."""

    def __init__(self, sender: str) -> None:
        super().__init__(sender)
        self.sender = sender


class InvalidBody(Exception):
    """The body is not JSON, or its top level is not of the expected shape."""


Rewriter = Callable[[bytes, IgnoreContext], Rewritten | None]
"""``None`` means nothing changed: send the original bytes."""
