"""Starting to serve: the exit statuses, the addresses bound before anything runs, the
note that tells `healthcheck` where the proxy listens, and the metrics directories of
earlier runs that were killed before they could remove theirs.

Every failure to start is one line on stderr and one exit status, whatever the mode (one
process or `--workers`) and whichever address is taken: the sockets are bound here, by the
program, before uvicorn or any worker runs, so uvicorn's own bind errors (a log line and
its exit 3, or a traceback from a task nobody awaits) never happen.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

from .config import parse_host_port

# The exit statuses of every command (README "Exit statuses" lists them).
EXIT_OK = 0  # served until SIGTERM/SIGINT; check-config: valid; healthcheck: healthy
EXIT_FAILED = 1  # a worker ended on its own; healthcheck: not healthy (whatever the reason)
EXIT_CONFIG = 2  # a configuration error (or a command-line usage error, from argparse)
EXIT_CANNOT_START = 3  # an address could not be bound (taken, not permitted, not local)

# Connections the kernel completes before the proxy accepts them: thousands of clients
# reconnecting at once (a restart) must not overflow it, or each waits a SYN-ACK
# retransmission (1 s, then 2 s...). The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 65535


class CannotStart(Exception):
    """A failure to start, worded as the one line the operator reads."""


def bind(key: str, address: str, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on `address` (the value of config key `key`), or CannotStart."""
    host, port = parse_host_port(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # the workers share the address; the kernel spreads connections
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise CannotStart(f"cannot listen on {address} ({key}): {reason}") from None
    return sock


# -- where the proxy listens, for `healthcheck` ----------------------------------------------
#
# The image's HEALTHCHECK runs `ignore-proxy healthcheck` with the container's environment
# but not the server's flags: `serve --listen 0.0.0.0:9000` would leave it checking the
# configured 8010. So a server whose flag moved it writes where it really listens (and its
# pid) into a note named after the address it was configured with, which the healthcheck
# (seeing the same configuration) finds; a note whose server is gone (killed before it
# could remove it) is ignored.


def _note_path(configured: str) -> Path:
    name = re.sub(r"[^0-9A-Za-z.]", "_", configured)
    return Path(tempfile.gettempdir()) / f"ignore-proxy-{os.getuid()}-{name}.listen"


def note_listen(configured: str, actual: str) -> Path | None:
    """Write the note (when a flag moved the address); the path to remove at exit."""
    if configured == actual:
        return None
    path = _note_path(configured)
    try:
        temporary = path.with_suffix(f".{os.getpid()}")
        temporary.write_text(f"{actual} {os.getpid()}\n")
        temporary.replace(path)
    except OSError:
        return None  # no writable temp dir: the healthcheck checks the configured address
    return path


def forget_listen(path: Path | None, actual: str) -> None:
    """Remove the note at exit, unless a later server has written its own."""
    if path is None:
        return
    with contextlib.suppress(OSError):
        if path.read_text().split() == [actual, str(os.getpid())]:
            path.unlink()


def noted_listen(configured: str) -> str | None:
    """Where the server moved from `configured` listens, if it still runs."""
    try:
        address, pid = _note_path(configured).read_text().split()
    except (OSError, ValueError):
        return None
    return address if pid.isdigit() and _alive(int(pid)) else None


# -- the metrics directories of `--workers` ---------------------------------------------------

METRICS_DIR_PREFIX = "ignore-proxy-metrics-"
_OWNER_PID = re.compile(re.escape(METRICS_DIR_PREFIX) + r"(\d+)-")
_WORKER_PID = re.compile(r"_(\d+)\.db$")  # prometheus_client's `counter_<pid>.db`
_LEGACY_GRACE = 60.0


def make_metrics_dir() -> str:
    """A directory for the workers' shared metrics, named after the parent's pid."""
    return tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")


def remove_stale_metrics_dirs() -> list[str]:
    """Remove this user's metrics directories whose parent is gone (killed with SIGKILL,
    it could not remove its own); the removed paths."""
    removed = []
    uid = os.getuid()
    for path in Path(tempfile.gettempdir()).glob(METRICS_DIR_PREFIX + "*"):
        try:
            stat = path.stat()
        except OSError:
            continue
        if stat.st_uid != uid or not path.is_dir():
            continue
        owner = _OWNER_PID.match(path.name)
        if owner is not None:
            stale = not _alive(int(owner.group(1)))
        else:  # named by an earlier version: stale when none of its workers lives
            pids = [int(m.group(1)) for f in path.iterdir() if (m := _WORKER_PID.search(f.name))]
            stale = time.time() - stat.st_mtime > _LEGACY_GRACE and not any(map(_alive, pids))
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: not ours to judge
    return True
