"""Serving the app with uvicorn, tuned for a reverse proxy's position, and the metrics
on their own listener in the same process and event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import logging
import signal
import socket
from collections.abc import Callable, Iterator

import uvicorn

from . import descriptors, logs, startup
from .app import IgnoreProxyApp, create_app
from .config import Settings, parse_host_port
from .http_protocol import bounded_headers_protocol
from .metrics import MetricsEndpoint

log = logging.getLogger(__name__)

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def uvicorn_config(settings: Settings, app: IgnoreProxyApp | None = None) -> uvicorn.Config:
    host, port = settings.listen_address
    return uvicorn.Config(
        app if app is not None else create_app(settings),
        host=host,
        port=port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http=bounded_headers_protocol(settings.limits.max_header_bytes)
        if importlib.util.find_spec("httptools")
        else "h11",
        h11_max_incomplete_event_size=settings.limits.max_header_bytes,
        lifespan="on",
        # The upstream's own Server and Date headers go through; no second copy.
        server_header=False,
        date_header=False,
        # Longer than nginx's 60 s upstream keepalive, or nginx sees sporadic 502s.
        timeout_keep_alive=75,
        access_log=False,
        log_config=None,
        proxy_headers=False,
        backlog=startup.LISTEN_BACKLOG,  # uvicorn listens again on the sockets given
    )


def metrics_config(settings: Settings, endpoint: MetricsEndpoint) -> uvicorn.Config:
    """The metrics listener: `/metrics` of the app's registry, nothing else."""
    host, port = parse_host_port(settings.metrics.listen)
    return uvicorn.Config(
        endpoint,
        host=host,
        port=port,
        http="h11",
        lifespan="off",
        server_header=False,
        access_log=False,
        log_config=None,
    )


class Listener(uvicorn.Server):
    """A uvicorn server that leaves signals to `serve_all`, which stops every listener."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listeners(settings: Settings, *, with_metrics: bool = True) -> list[Listener]:
    app = create_app(settings)
    servers = [Listener(uvicorn_config(settings, app))]
    if settings.metrics.listen and with_metrics:
        servers.append(Listener(metrics_config(settings, MetricsEndpoint(app.metrics.registry))))
    return servers


async def serve_all(
    servers: list[Listener],
    sockets: list[socket.socket],
    on_start: Callable[[IgnoreProxyApp], None] | None = None,
) -> None:
    """Run the listeners side by side, each on its socket (bound already, in the order of
    `servers`); SIGTERM or SIGINT (or one of them stopping) stops all of them gracefully,
    a second signal at once."""

    def stop() -> None:
        for server in servers:
            if server.should_exit:
                server.force_exit = True
            server.should_exit = True

    async def run(server: Listener, own_socket: socket.socket) -> None:
        try:
            await server.serve(sockets=[own_socket])
        finally:
            for other in servers:
                other.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, stop)
    if on_start is not None:
        app = servers[0].config.app
        assert isinstance(app, IgnoreProxyApp)
        on_start(app)
    try:
        await asyncio.gather(
            *(run(server, sock) for server, sock in zip(servers, sockets, strict=True))
        )
    finally:
        for sig in _STOP_SIGNALS:
            loop.remove_signal_handler(sig)


def _raise_open_files_limit(settings: Settings) -> None:
    before, after = descriptors.raise_open_files_limit()
    configured = settings.limits.max_connections
    room = descriptors.connection_limit(0, after)
    log.info("open files limit %d (was %d): room for %d upstream connections", after, before,
             room)  # fmt: skip
    if configured > room:
        log.warning(
            "limits.max_connections is %d but the open files limit (%d) leaves room for %d "
            "(two descriptors each, and the lookups'): raise the hard limit (systemd "
            "LimitNOFILE=, docker "
            "--ulimit nofile=)", configured, after, room,
        )  # fmt: skip


# Collections of the oldest generation: one per this many of the middle one's.
_OLDEST_EVERY = 100


def settle_heap() -> None:
    """What startup made stays (modules, the app): the collector leaves it alone.

    The oldest generation is collected ten times less often than by default. A full
    collection walks every object alive, and thousands of clients parking in /sync at
    once promote enough of them to set off one after another while they arrive, each a
    pause every waiting request shares. Requests leave no cyclic garbage for it to find
    (tests/test_garbage.py), so the memory it frees is next to nothing; the token-flood
    test (tests/reliability/test_token_flood_and_secrets.py) bounds what could pile up.
    The young generations keep the interpreter's thresholds: collecting them is cheap."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, _OLDEST_EVERY)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    if importlib.util.find_spec("uvloop") is None:
        return None
    import uvloop

    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def serve(
    settings: Settings,
    sockets: list[socket.socket] | None = None,
    on_start: Callable[[IgnoreProxyApp], None] | None = None,
) -> None:
    """Serve until stopped: one process (`sockets` None), or one worker of several, whose
    metrics the parent serves (`workers.py`). A taken address raises `CannotStart`."""
    logs.configure(settings)
    if sockets is None:  # one process: its addresses bound before anything runs
        sockets = [startup.bind("listen", settings.listen)]
        if settings.metrics.listen:
            sockets.append(startup.bind("metrics.listen", settings.metrics.listen))
        logs.log_start(settings)
    _raise_open_files_limit(settings)
    servers = listeners(settings, with_metrics=len(sockets) > 1)
    settle_heap()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve_all(servers, sockets, on_start))
