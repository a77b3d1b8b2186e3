"""Open files: the soft limit raised to the hard one at start (as nginx's
`worker_rlimit_nofile`), and the upstream connections that limit leaves room for.

Each request in flight holds two descriptors, its client's connection and its upstream
one; a client parked in `/sync` holds both for its whole timeout. Most systems start a
process with a soft limit of 1,024 and a hard one far above it (systemd: 524,288), so
without raising it the proxy would refuse its 500th idle client.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

# Descriptors kept for everything but the requests: listening sockets, the metrics
# listener, the event loop's own, logs, a sibling worker's socket, idle upstream
# connections on their way out, the lookups' pool when it is larger than its share.
RESERVED = 128
_LOOKUPS_AT_LEAST = 64  # the lookups' pool's smallest size (upstream.create_lookup_pool)
# What "unlimited" becomes: Linux refuses a soft limit above fs.nr_open (2^20 unless
# raised).
_UNLIMITED = 1 << 20


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:  # a hard limit above what the kernel allows
            log.warning("could not raise the open files limit to %d: %s", target, exc)
    return soft, open_files_limit()


def open_files_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return _UNLIMITED if soft == resource.RLIM_INFINITY else soft


def connection_limit(configured: int, open_files: int | None = None) -> int:
    """Upstream connections of forwarded requests at once: `configured`
    (`limits.max_connections`), or with 0 as many as the open files limit leaves room for:
    two descriptors each (the client's, the upstream one) and the lookups' pool beside
    them, an eighth as many (upstream.create_lookup_pool)."""
    if configured:
        return configured
    room = max((open_files or open_files_limit()) - RESERVED, 0)
    forwarded = room * 8 // 17
    if forwarded // 8 < _LOOKUPS_AT_LEAST:
        forwarded = (room - _LOOKUPS_AT_LEAST) // 2
    return max(forwarded, 1)
