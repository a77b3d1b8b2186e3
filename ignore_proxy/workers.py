"""Several processes serving one address (`workers` > 1), as nginx's worker processes do.

One Python process tops out at one core (benchmarks/: ~10,000 tiny requests/s, ~250
filtered 1 MB syncs/s). With `workers = N` the parent forks N workers; each binds the
listen address with SO_REUSEPORT (the kernel spreads connections over them) and runs the
whole proxy with its own caches and upstream pool.

What keeps the workers' caches honest: a user's ignore list that changes in one worker (a
PUT through it, or new account data in its /sync) is forgotten by the others, which read
it again on that user's next request. The message (the user ID only, never a token) goes
over a datagram socketpair per worker, made before forking, and is sent before the
answer that carries the change leaves: a client cannot ask again before its sibling
worker has it. Token -> user mappings need no such care: a token revoked through one
worker is refused by the homeserver on the next request through another, which forgets
it on that 401.

The parent forwards SIGTERM/SIGINT to the workers, serves the metrics of all of them
(prometheus_client's multiprocess mode, when `metrics.listen` is set) and exits when they
have; a worker that dies on its own stops the others and the parent exits 1, for the
service manager (Docker, systemd) to restart the whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import startup
from .config import Settings

if TYPE_CHECKING:
    from .app import IgnoreProxyApp

log = logging.getLogger(__name__)

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # metrics.MULTIPROCESS_ENV, without importing it
_SEND_TIMEOUT = 1.0


class Siblings:
    """The worker's end of the change messages (its inbox, the others' outboxes), and its
    watch on the parent."""

    def __init__(self, inbox: socket.socket, outboxes: list[socket.socket], parent: int) -> None:
        self.inbox = inbox
        self.outboxes = outboxes
        self.parent = parent
        inbox.setblocking(False)
        for outbox in outboxes:
            # A sibling whose queue is full (a burst of changes, a busy loop) makes the
            # sender wait for it, briefly, rather than leave it with an outdated list.
            outbox.settimeout(_SEND_TIMEOUT)

    def attach(self, app: IgnoreProxyApp) -> None:
        """Forget what the others changed; tell them what changes here."""
        loop = asyncio.get_running_loop()
        loop.add_reader(self.inbox.fileno(), self._receive, app.ignore_lists.forget)
        app.ignore_lists.on_change.append(self.changed)
        app.metrics.start_mirroring()
        loop.call_later(1.0, self._watch_parent)

    def changed(self, user_id: str) -> None:
        message = user_id.encode("utf-8", "surrogatepass")
        for outbox in self.outboxes:
            try:
                outbox.send(message)
            except OSError as exc:
                # Gone, or stuck for a second: it keeps its list until the list's TTL.
                log.warning("could not tell a sibling worker of a list change: %s", exc)

    def _receive(self, forget: Callable[[str], None]) -> None:
        while True:
            try:
                message = self.inbox.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            forget(message.decode("utf-8", "surrogatepass"))

    def _watch_parent(self) -> None:
        if os.getppid() != self.parent:  # the parent was killed: do not serve on alone
            os.kill(os.getpid(), signal.SIGTERM)
            return
        asyncio.get_running_loop().call_later(1.0, self._watch_parent)


def _worker(
    settings: Settings, index: int, channels: list[tuple[socket.socket, socket.socket]]
) -> int:
    from .server import serve

    sock = startup.bind("listen", settings.listen, reuse_port=True)
    inbox = channels[index][1]
    outboxes = [pair[0] for other, pair in enumerate(channels) if other != index]
    serve(settings, [sock], Siblings(inbox, outboxes, os.getppid()).attach)
    return 0


def _stop_with(parent: int) -> None:
    """On Linux the kernel sends this worker SIGTERM the moment its parent dies, even
    while it is still starting (`Siblings` watches the parent too, once it serves, and
    elsewhere). A parent that died before this was asked for is caught right after."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _run_worker(
    settings: Settings,
    index: int,
    channels: list[tuple[socket.socket, socket.socket]],
    parent: int,
) -> None:
    """In the forked child; never returns (the parent's cleanup is not the child's)."""
    os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the parent, which stops the workers
    _stop_with(parent)
    code = startup.EXIT_FAILED
    try:
        code = _worker(settings, index, channels)
    except startup.CannotStart as exc:  # the address was taken after the parent's check
        print(f"ignore-proxy: worker {os.getpid()}: {exc}", file=sys.stderr)
        code = startup.EXIT_CANNOT_START
    except BaseException:
        traceback.print_exc()
    finally:
        from . import logs

        logs.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve_workers(settings: Settings) -> int:
    """Fork the workers and supervise them; a taken address raises `CannotStart` before
    any worker runs, as it does in one process."""
    from . import logs

    # The workers bind their own sockets; the check fails here, with one line, instead.
    startup.bind("listen", settings.listen, reuse_port=True).close()
    metrics_socket = None
    if settings.metrics.listen:
        metrics_socket = startup.bind("metrics.listen", settings.metrics.listen)
    logs.configure(settings)
    for path in startup.remove_stale_metrics_dirs():
        log.info("removed %s, left by a run that was killed", path)
    logs.log_start(settings)
    metrics_dir = None
    if metrics_socket is not None:
        # Before prometheus_client is imported: it picks its value store then.
        metrics_dir = startup.make_metrics_dir()
        os.environ[_MULTIPROC_ENV] = metrics_dir
    try:
        channels = [
            socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(settings.workers)
        ]
        pids = []
        parent = os.getpid()
        for index in range(settings.workers):
            pid = os.fork()
            if pid == 0:
                if metrics_socket is not None:
                    metrics_socket.close()  # the parent's alone
                _run_worker(settings, index, channels, parent)
            pids.append(pid)
        return asyncio.run(_supervise(settings, pids, metrics_socket))
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


async def _supervise(
    settings: Settings, pids: list[int], metrics_socket: socket.socket | None
) -> int:
    loop = asyncio.get_running_loop()
    alive = set(pids)
    done = asyncio.Event()
    stopping = False
    exit_code = 0

    def stop() -> None:
        nonlocal stopping
        sig = signal.SIGKILL if stopping else signal.SIGTERM  # a second signal: now
        stopping = True
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def reap() -> None:
        nonlocal exit_code
        for pid in list(alive):
            try:
                ended, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                ended, status = pid, 0
            if ended == 0:
                continue
            alive.discard(pid)
            if not stopping:
                code = os.waitstatus_to_exitcode(status)
                if code != startup.EXIT_CANNOT_START:  # which said why in its own line
                    print(f"ignore-proxy: worker {pid} ended ({code}); stopping", file=sys.stderr)
                exit_code = code if code == startup.EXIT_CANNOT_START else startup.EXIT_FAILED
                stop()
        if not alive:
            done.set()

    loop.add_signal_handler(signal.SIGCHLD, reap)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    reap()  # a worker may have ended before the handler was in place
    metrics = (
        asyncio.create_task(_serve_metrics(settings, metrics_socket)) if metrics_socket else None
    )
    await done.wait()
    if metrics is not None:
        metrics.cancel()
        await asyncio.gather(metrics, return_exceptions=True)
    return exit_code


async def _serve_metrics(settings: Settings, metrics_socket: socket.socket) -> None:
    from prometheus_client import CollectorRegistry, multiprocess

    from .metrics import MetricsEndpoint
    from .server import Listener, metrics_config

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    await Listener(metrics_config(settings, MetricsEndpoint(registry))).serve([metrics_socket])
