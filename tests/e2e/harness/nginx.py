"""Run Debian's nginx with one of the shipped configs from ``config/nginx/``."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .procs import ManagedProcess, free_port

REPO = Path(__file__).resolve().parents[3]
CONFIG_DIR = REPO / "config" / "nginx"
SHIPPED = ("ignore-proxy-all-client.conf", "ignore-proxy-selected.conf")

_PROXY_LINE = re.compile(r"server 127\.0\.0\.1:8010;")
_HS_LINE = re.compile(r"server 127\.0\.0\.1:8008;")
_LISTEN_LINE = re.compile(r"listen 8080;")
_HEALTH_LINE = re.compile(r"listen 127\.0\.0\.1:8081;")


def nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
    )
    if found is None:
        raise RuntimeError(
            "nginx is not installed: the e2e suite needs it "
            "(Debian/Ubuntu: `apt-get install -y nginx`; CI does this in .ci/run)"
        )
    return found


def render_site(
    shipped: str, listen: int, proxy: str, homeserver: str, health: int | None = None
) -> str:
    """The shipped file with only the marked addresses and the listen ports replaced (the
    internal health listener on `health`, a free port if not given)."""
    text = (CONFIG_DIR / shipped).read_text()
    for pattern, repl in (
        (_PROXY_LINE, f"server {proxy};"),
        (_HS_LINE, f"server {homeserver};"),
        (_LISTEN_LINE, f"listen 127.0.0.1:{listen};"),
        (_HEALTH_LINE, f"listen 127.0.0.1:{health or free_port()};"),
    ):
        text, n = pattern.subn(repl, text)
        if n != 1:
            raise AssertionError(f"{shipped}: expected one `{pattern.pattern}` line, found {n}")
    return text


def main_conf(prefix: Path, site: Path) -> str:
    user = ""
    if os.geteuid() == 0:
        # Workers would otherwise run as `nobody` and could not use the private tmp dir.
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n"
    return f"""{user}worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {site};
}}
"""


@dataclass
class NginxServer:
    shipped: str
    url: str
    conf: Path
    process: ManagedProcess
    health_url: str = ""  # the internal listener of the proxy's health checks

    def stop(self) -> None:
        self.process.stop()


def write_config(
    prefix: Path, shipped: str, listen: int, proxy: str, homeserver: str, health: int | None = None
) -> Path:
    prefix.mkdir(parents=True, exist_ok=True)
    site = prefix / "site.conf"
    site.write_text(render_site(shipped, listen, proxy, homeserver, health))
    conf = prefix / "nginx.conf"
    conf.write_text(main_conf(prefix, site))
    return conf


def nginx_test(conf: Path, prefix: Path) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on a generated configuration."""
    return subprocess.run(
        [nginx_binary(), "-t", "-c", str(conf), "-p", str(prefix), "-e", str(prefix / "error.log")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def start_nginx(prefix: Path, shipped: str, proxy: str, homeserver: str) -> NginxServer:
    listen, health = free_port(), free_port()
    conf = write_config(prefix, shipped, listen, proxy, homeserver, health)
    checked = nginx_test(conf, prefix)
    if checked.returncode != 0:
        raise RuntimeError(f"nginx -t failed for {shipped}:\n{checked.stderr}")
    proc = ManagedProcess(
        f"nginx-{shipped}",
        [
            nginx_binary(),
            "-c",
            str(conf),
            "-p",
            str(prefix),
            "-e",
            str(prefix / "error.log"),
            "-g",
            "daemon off;",
        ],
        prefix / "nginx.stdout.log",
    )
    url = f"http://127.0.0.1:{listen}"
    # Any HTTP answer means nginx listens (the upstream may answer anything).
    proc.wait_http(f"{url}/_matrix/client/versions", 20.0, ok=lambda r: r.status_code < 500)
    return NginxServer(shipped, url, conf, proc, f"http://127.0.0.1:{health}")
