"""Real servers for tests: an upstream served by uvicorn in a thread, and the proxy
started with its real command line in a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ThreadedServer(uvicorn.Server):
    """uvicorn in a thread, as httpx's own tests do; no signal handlers."""

    def install_signal_handlers(self) -> None:
        pass

    @contextlib.contextmanager
    def run_in_thread(self) -> Iterator[None]:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while not self.started:
                if time.monotonic() > deadline or not thread.is_alive():
                    raise RuntimeError("test server did not start")
                time.sleep(0.01)
            yield
        finally:
            self.should_exit = True
            thread.join(timeout=10)


@dataclass
class Seen:
    """What the upstream saw of one request."""

    method: str
    raw_path: bytes
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body_size: int


@dataclass
class Upstream:
    """A fake homeserver whose endpoints exercise the proxy's forwarding."""

    seen: list[Seen] = field(default_factory=list)
    open_streams: int = 0
    disconnects: int = 0
    chunk = b"x" * 65536

    def last(self) -> Seen:
        return self.seen[-1]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path: str = scope["path"]
        body_size = 0
        if not path.startswith("/drip") and not path.startswith("/hold"):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body_size += len(message.get("body", b""))
                if not message.get("more_body"):
                    break
        self.seen.append(
            Seen(
                scope["method"],
                scope["raw_path"],
                scope["query_string"],
                scope["headers"],
                body_size,
            )
        )
        query: dict[str, str] = dict(
            part.split("=", 1) for part in scope["query_string"].decode().split("&") if "=" in part
        )
        if path.startswith("/bytes/"):
            await self._bytes(send, int(path.rsplit("/", 1)[1]))
        elif path.startswith("/drip"):
            await self._drip(receive, send)
        elif path.startswith("/hold") or "hold" in query:  # `?hold=`: on any path
            await self._hold(receive, send, float(query.get("seconds", query.get("hold", "30"))))
        elif path.startswith("/headers"):
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/plain"),
                        (b"set-cookie", b"a=1; Path=/"),
                        (b"set-cookie", b"b=2; Path=/"),
                        (b"x-multi", b"one"),
                        (b"x-multi", b"two"),
                        (b"connection", b"x-hop"),
                        (b"x-hop", b"secret"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b"ok"})
        else:
            body = b'{"ok":true,"body_size":%d}' % body_size
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})

    async def _bytes(self, send: Send, size: int) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/octet-stream"),
                    (b"content-length", str(size).encode()),
                ],
            }
        )
        while size > 0:
            piece = self.chunk[: min(size, len(self.chunk))]
            size -= len(piece)
            await send({"type": "http.response.body", "body": piece, "more_body": size > 0})

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.disconnects += 1

    async def _drip(self, receive: Receive, send: Send) -> None:
        """Streams forever, until the other side goes away."""
        self.open_streams += 1
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream")],
                }
            )
            while not watcher.done():
                await send({"type": "http.response.body", "body": b"x" * 1024, "more_body": True})
                await asyncio.sleep(0.01)
        finally:
            self.open_streams -= 1
            watcher.cancel()

    async def _hold(self, receive: Receive, send: Send, seconds: float) -> None:
        """A long-poll: answers after `seconds`, unless the other side goes away first."""
        self.open_streams += 1
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(watcher), seconds)
            if not watcher.done():
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send({"type": "http.response.body", "body": b'{"next_batch":"s1"}'})
        finally:
            self.open_streams -= 1
            watcher.cancel()


@contextlib.contextmanager
def serve_upstream(app: Any, port: int | None = None, **tls: str) -> Iterator[str]:
    """`tls`: uvicorn's `ssl_certfile` and `ssl_keyfile`, for an https upstream."""
    port = port or free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
        timeout_keep_alive=30, **tls,  # type: ignore[arg-type]
    )  # fmt: skip
    with ThreadedServer(config).run_in_thread():
        # https by name: the test certificate names `localhost`.
        yield f"https://localhost:{port}" if tls else f"http://127.0.0.1:{port}"


HandlerResult = httpx.Response | Awaitable[httpx.Response]


class _InLoopServer(uvicorn.Server):
    """uvicorn in the test's own event loop: an async handler may wait on the test's events."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # pytest owns the signals of its main thread


def handler_app(handler: Callable[[httpx.Request], HandlerResult], base_url: str) -> Any:
    """An ASGI app answering each request with ``handler(request)`` (sync or async), the
    request rebuilt as httpx's with ``base_url`` and the raw path as sent."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": message["type"] + ".complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        query: bytes = scope["query_string"]
        raw_path: bytes = scope["raw_path"] + (b"?" + query if query else b"")
        request = httpx.Request(
            scope["method"],
            httpx.URL(base_url).copy_with(raw_path=raw_path),
            headers=scope["headers"],
            content=body,
        )
        answer = handler(request)
        if not isinstance(answer, httpx.Response):
            answer = await answer
        # The bytes as given, not `content`, which httpx would have decoded (gzip).
        raw = b"".join([chunk async for chunk in answer.stream])  # type: ignore[union-attr]
        headers = [
            (name, value)
            for name, value in answer.headers.raw
            if name.lower() not in (b"transfer-encoding", b"content-length")
        ]
        headers.append((b"content-length", b"%d" % len(raw)))
        start = {"type": "http.response.start", "status": answer.status_code, "headers": headers}
        await send(start)
        await send({"type": "http.response.body", "body": raw})

    return app


_served: list[tuple[_InLoopServer, asyncio.Task[None], socket.socket]] = []


def serve_handler(handler: Callable[[httpx.Request], HandlerResult]) -> str:
    """Serve ``handler`` (request -> answer, sync or async) over a real socket on 127.0.0.1
    in the running event loop, until ``stop_served_handlers``; returns its base URL.

    The listening socket is bound before this returns, so connections made at once wait in
    its backlog while the server starts."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(
        handler_app(handler, url),
        log_level="warning",
        lifespan="off",
        access_log=False,
        timeout_graceful_shutdown=1,
        backlog=4096,  # uvicorn listens again with its own backlog: thousands connect at once
    )
    server = _InLoopServer(config)
    task = asyncio.get_running_loop().create_task(server.serve([sock]))
    _served.append((server, task, sock))
    return url


async def stop_served_handlers() -> None:
    """Stop the servers ``serve_handler`` started in the running loop (an autouse fixture
    calls this after each test)."""
    loop = asyncio.get_running_loop()
    running = [entry for entry in _served if entry[1].get_loop() is loop]
    for entry in running:
        _served.remove(entry)
        entry[0].should_exit = True
    await asyncio.gather(*(task for _, task, _ in running), return_exceptions=True)
    for _, _, sock in running:
        sock.close()


@dataclass
class ProxyProcess:
    """The proxy's command line running; its log in ``log_path`` when one was given."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path | None = None
    metrics_url: str = ""  # with a metrics listener

    def peak_rss_kib(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmHWM")

    def log_lines(self) -> list[str]:
        assert self.log_path is not None, "started without a log file"
        return self.log_path.read_text(encoding="utf-8").splitlines()

    def stop(self) -> int:
        """SIGTERM, as a supervisor stops it; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def _open_files_limit(limits: tuple[int, int]) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)

    return apply


@contextlib.contextmanager
def run_proxy(
    upstream: str,
    env: dict[str, str] | None = None,
    *,
    log_path: Path | None = None,
    metrics: bool = False,
    open_files: tuple[int, int] | None = None,
    **settings: str,
) -> Iterator[ProxyProcess]:
    """The proxy as operators run it: ``ignore-proxy --upstream URL --listen HOST:PORT``,
    served by uvicorn, ready when it answers (and its metrics listener, with ``metrics``).

    Settings come as ``IGNORE_PROXY_*`` variables: ``env`` by name, ``settings`` by key
    (``logging_level="debug"``); none from the test runner's environment. Output goes to
    ``log_path`` if given (at the proxy's default level), else to the test's (warnings).
    ``open_files``: the (soft, hard) RLIMIT_NOFILE it starts with."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IGNORE_PROXY_")}
    if log_path is None:
        environ["IGNORE_PROXY_LOGGING_LEVEL"] = "warning"  # the test's output stays readable
    if metrics:
        environ["IGNORE_PROXY_METRICS_LISTEN"] = f"127.0.0.1:{free_port()}"
    environ.update(env or {})
    environ.update({f"IGNORE_PROXY_{key.upper()}": value for key, value in settings.items()})
    command = [sys.executable, "-m", "ignore_proxy", "--upstream", upstream,
               "--listen", f"127.0.0.1:{port}"]  # fmt: skip
    with contextlib.ExitStack() as output:
        log = output.enter_context(log_path.open("wb")) if log_path else None
        process = subprocess.Popen(
            command, env=environ, stdout=log, stderr=log,
            preexec_fn=None if open_files is None else _open_files_limit(open_files),
        )  # fmt: skip
    metrics_listen = environ.get("IGNORE_PROXY_METRICS_LISTEN")
    running = ProxyProcess(
        f"http://127.0.0.1:{port}",
        process,
        log_path,
        f"http://{metrics_listen}" if metrics_listen else "",
    )
    try:
        deadline = time.monotonic() + 20
        while not _ready(running):
            if process.poll() is not None:
                logged = log_path.read_text() if log_path else ""
                raise RuntimeError(f"proxy exited with {process.returncode}: {logged}")
            if time.monotonic() > deadline:
                raise RuntimeError("proxy did not start")
            time.sleep(0.05)
        yield running
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _ready(proxy: ProxyProcess) -> bool:
    urls = [proxy.url + "/_ignore_proxy/health/live"]
    if proxy.metrics_url:
        urls.append(proxy.metrics_url + "/metrics")
    try:
        return all(httpx.get(url).status_code == 200 for url in urls)
    except httpx.TransportError:
        return False
