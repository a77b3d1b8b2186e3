"""The processes a run needs: nginx (canned upstream + plain proxy_pass), the proxy via
its real command line, wrk; each one stopped by its own pid."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import bodies

ROOT = Path(__file__).resolve().parent.parent

TINY = "/_matrix/client/v3/pushrules/"
MESSAGES = f"/_matrix/client/v3/rooms/{bodies.ROOM}/messages?dir=b&limit=30"
SYNC_1M = "/_matrix/client/v3/sync?since=s1_0_0&timeout=0"
SYNC_8M = "/_matrix/client/r0/sync?since=s8_0_0&timeout=0"  # any version prefix is `sync`
MEDIA = "/_matrix/client/v1/media/download/bench.example/media1mib"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def _upstream_conf(files: dict[str, Path]) -> str:
    def exact(path: str, name: str, mime: str = "application/json") -> str:
        return f"location = {path} {{ default_type {mime}; alias {files[name]}; }}\n"

    def inline(path: str, name: str) -> str:
        body = files[name].read_text()
        assert "'" not in body
        return f"location = {path} {{ default_type application/json; return 200 '{body}'; }}\n"

    user = bodies.USER
    return (
        inline("/_matrix/client/v3/account/whoami", "whoami.json")
        + inline(f"/_matrix/client/v3/user/{user}/account_data/m.ignored_user_list", "ignored.json")
        + inline("/_matrix/client/v3/pushrules/", "pushrules.json")
        + exact(f"/_matrix/client/v3/rooms/{bodies.ROOM}/messages", "messages.json")
        + exact("/_matrix/client/v3/sync", "sync_1m.json")
        + exact("/_matrix/client/r0/sync", "sync_8m.json")
        + inline("/_matrix/client/versions", "pushrules.json")
        + exact(MEDIA, "media.bin", "application/octet-stream")
    )


def nginx_conf(workdir: Path, files: dict[str, Path], upstream_port: int, proxy_port: int) -> Path:
    """One nginx, two servers: the canned upstream, and a plain `proxy_pass` to it as
    operators run it (HTTP/1.1 keep-alive to the upstream, default buffering)."""
    temp = workdir / "nginx-temp"
    temp.mkdir(exist_ok=True)
    os.chmod(temp, 0o777)
    conf = f"""
worker_processes auto;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 8000; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    client_body_temp_path {temp}/client;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    upstream canned {{ server 127.0.0.1:{upstream_port}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{upstream_port} backlog=4096;
        {_upstream_conf(files)}
    }}
    server {{
        listen 127.0.0.1:{proxy_port} backlog=4096;
        location / {{
            proxy_pass http://canned;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_read_timeout 600s;
            client_max_body_size 100m;
        }}
    }}
}}
"""
    path = workdir / "nginx.conf"
    path.write_text(conf)
    return path


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def start_nginx(conf: Path, ports: list[int]) -> Proc:
    popen = subprocess.Popen(
        ["nginx", "-c", str(conf), "-p", str(conf.parent), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    for port in ports:
        wait_port(port)
    return Proc("nginx", popen)


def start_proxy(upstream: str, port: int, level: str, log: Path,
                extra_env: dict[str, str] | None = None,
                open_files: tuple[int, int] | None = None) -> Proc:  # fmt: skip
    """`open_files`: the (soft, hard) RLIMIT_NOFILE to start it with."""
    env = dict(os.environ, IGNORE_PROXY_LOGGING_LEVEL=level, **(extra_env or {}))

    def limit() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, open_files)

    popen = subprocess.Popen(
        [sys.executable, "-m", "ignore_proxy", "--upstream", upstream,
         "--listen", f"127.0.0.1:{port}"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("ab"),
        preexec_fn=limit if open_files is not None else None,
    )  # fmt: skip
    wait_port(port)
    return Proc("ignore-proxy", popen)


def _tree(pid: int) -> list[int]:
    """The process and its children (the proxy's workers, when `--workers` > 1)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        pids.extend(int(child) for child in children)
    return pids


def _stat_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its children, from /proc."""
    total = 0.0
    for member in _tree(pid):
        with contextlib.suppress(FileNotFoundError):  # a worker that just ended
            total += _stat_cpu(member)
    return total


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def peak_rss_mib(pid: int) -> float:
    """Peak RSS (VmHWM) of a process, summed over its children: an upper bound for
    several workers, whose shared pages count once per process."""
    return sum(_status_kib(member, "VmHWM:") for member in _tree(pid)) / 1024


def pss_mib(pid: int) -> float:
    """Proportional set size of a process and its children: memory shared between the
    workers (forked from one parent) counted once, split between them."""
    total = 0
    for member in _tree(pid):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total / 1024


class PeakPss:
    """Samples `pss_mib` of a process tree every `every` seconds, keeping the largest."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.pid, self.every, self.peak = pid, every, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, pss_mib(self.pid))
            self._stop.wait(self.every)

    def __enter__(self) -> PeakPss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, pss_mib(self.pid))


def rss_mib(pid: int) -> float:
    return sum(_status_kib(member, "VmRSS:") for member in _tree(pid)) / 1024


LUA = f"""
wrk.headers["Authorization"] = "Bearer {bodies.TOKEN}"
"""


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    cpu_us_per_req: float | None = None


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        return float("nan")
    return float(match[1]) * _UNITS[match[2]]


def wrk(url: str, seconds: float, connections: int, lua: Path, threads: int = 1,
        timeout: str = "30s") -> WrkResult:  # fmt: skip
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{int(seconds)}s", f"--timeout={timeout}",
         "--latency", "-s", str(lua), url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    req = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    assert req, out
    dur = float(req[2]) * {"s": 1.0, "ms": 0.001, "m": 60.0}[req[3]]
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    max_lat = re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out)
    errors = 0
    for match in re.finditer(r"(connect|read|write|timeout) (\d+)", out):
        errors += int(match[2])
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors += int(non2xx[1])
    return WrkResult(
        requests=int(req[1]), seconds=dur, rps=int(req[1]) / dur,
        p50_ms=_ms(lat.get("50", "nan")), p99_ms=_ms(lat.get("99", "nan")),
        max_ms=_ms(max_lat[1]) if max_lat else float("nan"), errors=errors,
    )  # fmt: skip
