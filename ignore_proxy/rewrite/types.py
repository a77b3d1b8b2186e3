"""Shared value types and exceptions of the rewriters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "IgnoreContext",
    "InvalidBody",
    "Rewriter",
    "Rewritten",
    "SenderIgnored",
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


@dataclass(frozen=True, slots=True)
class Rewritten:
    """A rewritten body and how many events/entries were removed or redacted."""

    body: bytes
    removed: int


class SenderIgnored(Exception):
    """The whole response must become 404 ``M_SENDER_IGNORED``."""

    def __init__(self, sender: str) -> None:
        super().__init__(sender)
        self.sender = sender


class InvalidBody(Exception):
    """The body is not JSON, or its top level is not of the expected shape."""


Rewriter = Callable[[bytes, IgnoreContext], Rewritten | None]
"""``None`` means nothing changed: send the original bytes."""
