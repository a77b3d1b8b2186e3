"""Launch Synapse with its ignore support switched off.

Stands in for a homeserver that does not implement "ignore user" (Conduit, Dendrite):
Synapse still stores ``m.ignored_user_list`` account data (and its ``ignored_users``
table), but every reader of that table sees nobody ignored, so sync, /messages,
/context, /relations, /threads, /search, /notifications, sliding sync, push and
invites all deliver ignored senders' events.

Usage: ``python synapse_no_ignore.py -c homeserver.yaml`` (same arguments as
``python -m synapse.app.homeserver``).
"""

from __future__ import annotations

from typing import Any


async def _nobody(self: Any, user_id: str) -> frozenset[str]:
    return frozenset()


def disable_ignore_support() -> None:
    from synapse.storage.databases.main.account_data import AccountDataWorkerStore

    # Both are ``@cached`` descriptors: replace the wrapped function and keep the cache
    # machinery (invalidation on account data writes still refers to them).
    for name in ("ignored_users", "ignored_by"):
        descriptor = AccountDataWorkerStore.__dict__[name]
        descriptor.orig = _nobody


def main() -> None:
    disable_ignore_support()
    from synapse.app.homeserver import main as synapse_main

    synapse_main()


if __name__ == "__main__":
    main()
