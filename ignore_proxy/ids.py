"""Matrix identifiers, checked the same way everywhere."""

from __future__ import annotations


def is_user_id(value: str) -> bool:
    """``@localpart:server`` of at most 255 bytes, as homeservers accept a sender from
    another server: Synapse checks no more (the sigil, a colon, the length), and Conduit
    little more. A harasser picks their own ID, with invisible or odd characters if that
    helps, so anything a homeserver may deliver must be ignorable."""
    if not value.startswith("@") or len(value.encode("utf-8", "surrogatepass")) > 255:
        return False
    localpart, sep, server = value[1:].partition(":")
    return bool(localpart and sep and server)
