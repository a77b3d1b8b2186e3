"""Settings: a TOML file, then `IGNORE_PROXY_*` environment variables, then flags.

Everything is validated once at start into frozen objects; a bad value raises
`ConfigError` with one line naming the key, which the CLI prints before exiting 2.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec

ENV_PREFIX = "IGNORE_PROXY_"
DEFAULT_UPSTREAM = "http://127.0.0.1:8008"
DEFAULT_LISTEN = "127.0.0.1:8010"

PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class Timeouts(_Section, frozen=True):
    connect: PositiveFloat = 10.0
    # Longest silence allowed between two chunks of an upstream answer. A request that
    # carries `?timeout=N` (a long-poll) gets N milliseconds on top.
    read: PositiveFloat = 60.0
    write: PositiveFloat = 60.0
    # How long a request may wait for a free upstream connection before a 503.
    pool: PositiveFloat = 10.0
    # Upper bound for the `?timeout=` a client may ask for, in seconds.
    max_long_poll: PositiveFloat = 300.0


class Limits(_Section, frozen=True):
    # Enough for every idle long-poll of a busy server: each holds one connection.
    max_connections: PositiveInt = 4096
    max_keepalive_connections: NonNegativeInt = 512
    # Request bodies larger than this are refused with 413; 0 means no limit of our own.
    max_request_body: NonNegativeInt = 0
    # Upstream answers the proxy must read whole to rewrite are capped at this size.
    max_rewrite_body: PositiveInt = 256 * 1024 * 1024
    # Client JSON bodies the proxy must parse itself (ignore-list writes).
    max_json_body: PositiveInt = 4 * 1024 * 1024
    # A request line and headers larger than this get 431 before anything is forwarded.
    max_header_bytes: PositiveInt = 64 * 1024


class Identity(_Section, frozen=True):
    cache_size: PositiveInt = 100_000
    cache_ttl: PositiveFloat = 300.0
    negative_ttl: PositiveFloat = 10.0
    # whoami requests in flight at once; more wait (a flood of unknown tokens).
    max_concurrent_lookups: PositiveInt = 32


class Ignore(_Section, frozen=True):
    errcode: Literal["M_SENDER_IGNORED", "UK.TIMEDOUT.MSC4406.SENDER_IGNORED"] = "M_SENDER_IGNORED"
    # Drop typing notifications, read receipts and presence of ignored users.
    filter_ephemeral: bool = True
    # Leave rooms that ignored users invite the user to, on the user's behalf.
    reject_invites: bool = False
    # Re-read each user's list after this many seconds (a sync filter can hide account data).
    list_ttl: PositiveFloat = 300.0
    list_cache_size: PositiveInt = 100_000
    # When a user's list cannot be learned and none is known: "refuse" answers 503,
    # "pass" serves the response unfiltered.
    on_unavailable: Literal["refuse", "pass"] = "refuse"
    # Keep a non-notifying push rule per ignored user at the homeserver (README, "Push
    # notifications and unread counts"), hidden from the user's clients.
    suppress_push: bool = False


class Logging(_Section, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class MetricsSettings(_Section, frozen=True):
    # "HOST:PORT" for a separate Prometheus listener; empty disables it.
    listen: str = ""


class Settings(_Section, frozen=True):
    upstream: str = DEFAULT_UPSTREAM
    listen: str = DEFAULT_LISTEN
    # Processes serving `listen` (like nginx's worker_processes); each has its own caches.
    workers: PositiveInt = 1
    timeouts: Timeouts = msgspec.field(default_factory=Timeouts)
    limits: Limits = msgspec.field(default_factory=Limits)
    identity: Identity = msgspec.field(default_factory=Identity)
    ignore: Ignore = msgspec.field(default_factory=Ignore)
    logging: Logging = msgspec.field(default_factory=Logging)
    metrics: MetricsSettings = msgspec.field(default_factory=MetricsSettings)

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_host_port(self.listen)


class ConfigError(Exception):
    """A configuration problem, worded as the one line the operator will read."""


SECTIONS: dict[str, type[_Section]] = {
    name: field_type
    for name, field_type in (
        ("timeouts", Timeouts),
        ("limits", Limits),
        ("identity", Identity),
        ("ignore", Ignore),
        ("logging", Logging),
        ("metrics", MetricsSettings),
    )
}


def env_name(*key: str) -> str:
    """The environment variable for a key: `ignore.errcode` -> `IGNORE_PROXY_IGNORE_ERRCODE`."""
    return ENV_PREFIX + "_".join(part.upper() for part in key)


def all_keys() -> list[tuple[str, ...]]:
    """Every settable key, as (key,) or (section, key)."""
    keys: list[tuple[str, ...]] = [("upstream",), ("listen",), ("workers",)]
    for section, struct in SECTIONS.items():
        keys.extend((section, field) for field in struct.__struct_fields__)
    return keys


def parse_host_port(value: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError("expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError("port out of range")
    return host, port


def load_settings(
    config_file: str | None = None,
    overrides: Mapping[str, str | None] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge file < environment < `overrides` (flags, dotted keys) and validate."""
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG") or None
    merged: dict[str, Any] = _read_toml(config_file) if config_file else {}
    for key in all_keys():
        value = environ.get(env_name(*key))
        if value is not None:
            _put(merged, key, value)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _put(merged, tuple(dotted.split(".")), value)
    try:
        settings = msgspec.convert(merged, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    _check_semantics(settings)
    return settings


def _read_toml(path: str) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None


def _put(tree: dict[str, Any], key: tuple[str, ...], value: str) -> None:
    for part in key[:-1]:
        child = tree.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{part}: expected a table")
        tree = child
    tree[key[-1]] = value


def _describe(exc: msgspec.ValidationError) -> str:
    message = str(exc)
    text, _, path = message.rpartition(" - at `$.")
    if not path:
        return f"config: {message}"
    key = path.rstrip("`")
    return f"config key {key} ({env_name(*key.split('.'))}): {text}"


def _check_semantics(settings: Settings) -> None:
    url = urlsplit(settings.upstream)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(
            f"config key upstream ({env_name('upstream')}): expected an http(s) URL, "
            f"got {settings.upstream!r}"
        )
    if url.path not in ("", "/") or url.query or url.fragment:
        raise ConfigError(
            f"config key upstream ({env_name('upstream')}): must be scheme://host[:port] "
            "with no path, query or fragment"
        )
    for key, value in (("listen", settings.listen), ("metrics.listen", settings.metrics.listen)):
        if key == "metrics.listen" and not value:
            continue
        try:
            parse_host_port(value)
        except ValueError as exc:
            raise ConfigError(
                f"config key {key} ({env_name(*key.split('.'))}): {exc}, got {value!r}"
            ) from None
