"""The command line: `ignore-proxy [serve] --upstream URL --listen HOST:PORT [--config FILE]`,
`ignore-proxy check-config`, `ignore-proxy healthcheck` (exit 0 or 1, for Docker) and
`ignore-proxy push-rules --user USER [--remove]` (the proxy's push rules of a user)."""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from . import __version__
from .config import ENV_PREFIX, ConfigError, Settings, load_settings

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
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(
            args.config,
            {"upstream": args.upstream, "listen": args.listen, "workers": args.workers},
        )
    except ConfigError as exc:
        print(f"ignore-proxy: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(f"ignore-proxy: config OK (upstream {settings.upstream}, listen {settings.listen})")
        return 0
    if args.command == "healthcheck":
        return healthcheck(settings)
    if args.command == "push-rules":
        return push_rules(settings, args.user, remove=args.remove)
    if settings.workers > 1:
        from .workers import serve_workers

        return serve_workers(settings)
    from .server import serve  # uvicorn is imported only to serve

    serve(settings)
    return 0


def push_rules(settings: Settings, user_id: str | None, *, remove: bool) -> int:
    """The proxy's push rules of one user, listed or removed, with the user's access token
    (or an appservice's) from IGNORE_PROXY_ACCESS_TOKEN or standard input."""
    import asyncio
    import os

    from .push_rules import TOKEN_ENV, push_rules_command

    if not user_id:
        print("ignore-proxy: push-rules needs --user USER_ID", file=sys.stderr)
        return 2
    token = os.environ.get(TOKEN_ENV) or (sys.stdin.readline() if not sys.stdin.isatty() else "")
    token = token.strip()
    if not token:
        print(f"ignore-proxy: push-rules reads the access token from {TOKEN_ENV} or standard "
              "input", file=sys.stderr)  # fmt: skip
        return 2
    return asyncio.run(push_rules_command(settings.upstream, user_id, token, remove=remove))


def healthcheck(settings: Settings) -> int:
    host, port = settings.listen_address
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1" if host != "::" else "::1"
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{port}/_ignore_proxy/health/live"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"ignore-proxy: healthcheck failed: {exc}", file=sys.stderr)
        return 1
