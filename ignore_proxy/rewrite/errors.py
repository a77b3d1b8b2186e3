"""Recognising a homeserver's own "sender ignored" error."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from .raw import decode_value, split_object

__all__ = ["SENDER_IGNORED_CODES", "UpstreamSenderIgnored", "normalise_sender_ignored"]

SENDER_IGNORED_CODES = frozenset({"M_SENDER_IGNORED", "UK.TIMEDOUT.MSC4406.SENDER_IGNORED"})
"""Upper-cased spellings: the stable code and the unstable one (ruma/continuwuity)."""


@dataclass(frozen=True, slots=True)
class UpstreamSenderIgnored:
    """The homeserver itself refused an event because its sender is ignored."""

    sender: str | None
    """The ``sender`` it named, if it named one (a string)."""


def normalise_sender_ignored(status: int, body: bytes) -> UpstreamSenderIgnored | None:
    """Recognise an upstream SenderIgnored error in either spelling, any letter case and
    any error status (continuwuity answers 400). None if the response is something else
    (a success, another error, or a body that is not a JSON object)."""
    if status < 400:
        return None
    try:
        members = split_object(body)
    except (msgspec.DecodeError, RecursionError):  # pragma: no cover - split_object catches
        return None
    if members is None or "errcode" not in members:
        return None
    errcode = decode_value(members["errcode"])
    if not isinstance(errcode, str) or errcode.upper() not in SENDER_IGNORED_CODES:
        return None
    sender = decode_value(members["sender"]) if "sender" in members else None
    return UpstreamSenderIgnored(sender if isinstance(sender, str) else None)
