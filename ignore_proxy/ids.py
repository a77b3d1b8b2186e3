"""Matrix identifiers, checked the same way everywhere."""

from __future__ import annotations


def is_user_id(value: str) -> bool:
    """A loose Matrix user ID check: ``@localpart:server``, at most 255 bytes, printable."""
    if not value.startswith("@") or len(value.encode("utf-8", "surrogatepass")) > 255:
        return False
    localpart, sep, server = value[1:].partition(":")
    if not (localpart and sep and server):
        return False
    return all(ch.isprintable() and not ch.isspace() for ch in value)
