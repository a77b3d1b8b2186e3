"""The command line: `ignore-proxy [serve] --upstream URL --listen HOST:PORT [--config FILE]`,
`ignore-proxy check-config`, `ignore-proxy healthcheck` (exit 0 or 1, for Docker) and
`ignore-proxy push-rules --user USER [--remove]` (the proxy's push rules of a user).

Each failure is one line on stderr and one exit status (`startup.EXIT_*`)."""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from . import __version__
from .config import (
    ACCESS_TOKEN_ENV,
    DEFAULT_LISTEN,
    ENV_PREFIX,
    ConfigError,
    Settings,
    load_settings,
    parse_host_port,
)
from .startup import (
    EXIT_CANNOT_START,
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    CannotStart,
    forget_listen,
    note_listen,
    noted_listen,
)

COMMANDS = ("serve", "check-config", "healthcheck", "push-rules")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ignore-proxy",
        description="Enforce Matrix 'ignore user' semantics and MSC4406 in front of a homeserver.",
        epilog=f"Commands: {', '.join(COMMANDS)} (default: serve). Every setting can also be "
        f"given as an {ENV_PREFIX}* environment variable; flags win over both.",
    )
    parser.add_argument("command", nargs="?", choices=COMMANDS, default="serve")
    parser.add_argument("--config", metavar="FILE", help=f"TOML file (or {ENV_PREFIX}CONFIG)")
    parser.add_argument("--upstream", metavar="URL", help="homeserver base URL")
    parser.add_argument("--listen", metavar="HOST:PORT", help="address to serve on")
    parser.add_argument("--workers", metavar="N", help="processes serving the address (default 1)")
    parser.add_argument("--user", metavar="USER_ID", help="push-rules: whose rules")
    parser.add_argument("--remove", action="store_true", help="push-rules: delete them all")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The exit status of a command: `startup.EXIT_*` (README "Exit statuses")."""
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(
            args.config,
            {"upstream": args.upstream, "listen": args.listen, "workers": args.workers},
        )
    except ConfigError as exc:
        print(f"ignore-proxy: {exc}", file=sys.stderr)
        # Docker reserves a healthcheck's 2: a proxy nobody can check is not healthy.
        return EXIT_FAILED if args.command == "healthcheck" else EXIT_CONFIG
    if args.command == "check-config":
        print(f"ignore-proxy: config OK (upstream {settings.upstream}, listen {settings.listen})")
        return EXIT_OK
    if args.command == "healthcheck":
        return healthcheck(settings, listen_given=args.listen is not None)
    if args.command == "push-rules":
        return push_rules(settings, args.user, remove=args.remove)
    note = note_listen(_configured_listen(args.config), settings.listen) if args.listen else None
    try:
        if settings.workers > 1:
            from .workers import serve_workers

            return serve_workers(settings)
        from .server import serve  # uvicorn is imported only to serve

        serve(settings)
    except CannotStart as exc:
        print(f"ignore-proxy: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    finally:
        forget_listen(note, settings.listen)
    return EXIT_OK


def push_rules(settings: Settings, user_id: str | None, *, remove: bool) -> int:
    """The proxy's push rules of one user, listed or removed, with the user's access token
    (or an appservice's) from IGNORE_PROXY_ACCESS_TOKEN or standard input: never a flag,
    which process lists and shell histories would show."""
    import asyncio
    import os

    from .push_rules import push_rules_command

    if not user_id:
        print("ignore-proxy: push-rules needs --user USER_ID", file=sys.stderr)
        return EXIT_CONFIG
    token = os.environ.get(ACCESS_TOKEN_ENV) or (
        sys.stdin.readline() if not sys.stdin.isatty() else ""
    )
    token = token.strip()
    if not token:
        print(f"ignore-proxy: push-rules reads the access token from {ACCESS_TOKEN_ENV} or "
              "standard input", file=sys.stderr)  # fmt: skip
        return EXIT_CONFIG
    return asyncio.run(push_rules_command(settings.upstream, user_id, token, remove=remove))


def _configured_listen(config_file: str | None) -> str:
    """The address the configuration alone gives, which is what `healthcheck` sees."""
    try:
        return load_settings(config_file).listen
    except ConfigError:  # only a flag made the configuration valid
        return DEFAULT_LISTEN


def healthcheck(settings: Settings, *, listen_given: bool = False) -> int:
    """0 if the proxy answers its liveness endpoint, else 1: where `--listen` says, else
    where a server moved there by its flag noted it listens, else the configured address.
    Proxy variables (`http_proxy`, ...) are ignored: the proxy is on this host."""
    listen = settings.listen
    if not listen_given:
        listen = noted_listen(settings.listen) or listen
    try:
        host, port = parse_host_port(listen)
    except ValueError:
        print(
            f"ignore-proxy: healthcheck: bad address in the listen note: {listen!r}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1" if host != "::" else "::1"
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{port}/_ignore_proxy/health/live"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as response:
            healthy = response.status == 200
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"ignore-proxy: healthcheck failed: {url}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK if healthy else EXIT_FAILED
