"""Settings: a TOML file, then `IGNORE_PROXY_*` environment variables, then flags.

Everything is validated once at start into frozen objects; a bad value raises
`ConfigError` with one line naming the key and its environment variable (and, for a
choice, what is accepted), which the CLI prints before exiting 2. An unknown key or
`IGNORE_PROXY_*` variable is an error too, naming the closest real one: a misspelled
setting silently left at its default is a setting the operator believes is in force.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

import msgspec

ENV_PREFIX = "IGNORE_PROXY_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
# `ignore-proxy push-rules` reads a user's access token here (never from a flag).
ACCESS_TOKEN_ENV = ENV_PREFIX + "ACCESS_TOKEN"
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
    # Upstream connections at once (each idle long-poll holds one); 0: as many as the
    # open files limit leaves room for (descriptors.py).
    max_connections: NonNegativeInt = 0
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


class Cluster(_Section, frozen=True):
    # Several instances (replicas) in front of one homeserver tell each other of list
    # changes through Redis pub/sub: "redis://[:password@]host:6379/0", "rediss://..." or
    # "unix:///path"; empty: off (each instance learns changes from /sync or list_ttl).
    redis_url: str = ""  # checked by _check_redis_url, never echoed (it may hold a password)
    channel: Annotated[str, msgspec.Meta(min_length=1)] = "ignore-proxy:ignore-list-changed"
    # While Redis is unreachable (changes elsewhere may go unheard), lists are re-read
    # after this many seconds instead of ignore.list_ttl.
    fallback_list_ttl: PositiveFloat = 10.0
    # How long a write's answer waits for Redis to accept the change's message.
    publish_timeout: PositiveFloat = 0.1


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
    cluster: Cluster = msgspec.field(default_factory=Cluster)

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
        ("cluster", Cluster),
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


def environment_names() -> frozenset[str]:
    """Every `IGNORE_PROXY_*` variable the program reads."""
    return frozenset([CONFIG_ENV, ACCESS_TOKEN_ENV, *(env_name(*key) for key in all_keys())])


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
    _check_environment(environ)
    config_file = config_file or environ.get(CONFIG_ENV) or None
    merged: dict[str, Any] = _read_toml(config_file) if config_file else {}
    for key in all_keys():
        value = environ.get(env_name(*key))
        if value is not None:
            _put(merged, key, value)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _put(merged, tuple(dotted.split(".")), value)
    _check_known_keys(merged)
    _read_choices(merged)
    try:
        settings = msgspec.convert(merged, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_describe(exc, merged)) from None
    _check_semantics(settings)
    return settings


def _key_text(key: tuple[str, ...]) -> str:
    """How errors name a key: `config key ignore.errcode (IGNORE_PROXY_IGNORE_ERRCODE)`."""
    return f"config key {'.'.join(key)} ({env_name(*key)})"


def _closest(name: str, known: Iterable[str], prefix: str = "") -> str:
    """ "; did you mean X?" for the known name closest to `name`, if one is close."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _check_environment(environ: Mapping[str, str]) -> None:
    known = environment_names()
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known:
            # Compared without the prefix every candidate shares, which would make anything
            # look close.
            suffixes = {known_name.removeprefix(ENV_PREFIX) for known_name in known}
            close = _closest(name.removeprefix(ENV_PREFIX), suffixes, prefix=ENV_PREFIX)
            raise ConfigError(f"unknown environment variable {name}{close}")


def _check_known_keys(merged: Mapping[str, Any]) -> None:
    """Unknown keys and tables, named in full with the closest real one."""
    known = {".".join(key) for key in all_keys()}
    for name, value in merged.items():
        if name in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"config table [{name}]: expected a table of keys")
            for field in value:
                dotted = f"{name}.{field}"
                if dotted not in known:
                    raise ConfigError(f"unknown config key {dotted}{_closest(dotted, known)}")
        elif name not in known:
            top = {key[0] for key in all_keys()}
            raise ConfigError(f"unknown config key {name}{_closest(name, top)}")


_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def _read_choices(merged: dict[str, Any]) -> None:
    """Booleans in their usual spellings, choices in any letter case; anything else names
    what is accepted. Types come from the structs, so a new setting needs nothing here."""
    for key in all_keys():
        table = merged
        for part in key[:-1]:
            table = table.get(part, {})
        if key[-1] not in table:
            continue
        value = table[key[-1]]
        kind = _field_type(key)
        if kind is bool and isinstance(value, str):
            word = value.strip().lower()
            if word not in _TRUE | _FALSE:
                raise ConfigError(
                    f"{_key_text(key)}: expected true or false "
                    f"(also yes/no, on/off, 1/0), got {value!r}"
                )
            table[key[-1]] = word in _TRUE
        elif get_origin(kind) is Literal:
            choices: tuple[str, ...] = get_args(kind)
            found = [c for c in choices if isinstance(value, str) and c.lower() == value.lower()]
            if not found:
                raise ConfigError(
                    f"{_key_text(key)}: expected one of {', '.join(choices)}, got {value!r}"
                )
            table[key[-1]] = found[0]


def _field_type(key: tuple[str, ...]) -> Any:
    struct: type[msgspec.Struct] = SECTIONS[key[0]] if len(key) == 2 else Settings
    return next(f.type for f in msgspec.structs.fields(struct) if f.name == key[-1])


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
            raise ConfigError(f"config table [{part}]: expected a table of keys")
        tree = child
    tree[key[-1]] = value


def _describe(exc: msgspec.ValidationError, merged: Mapping[str, Any]) -> str:
    message = str(exc)
    text, _, path = message.rpartition(" - at `$.")
    if not path:
        return f"config: {message}"
    key = tuple(path.rstrip("`").split("."))
    value: Any = merged
    for part in key:
        value = value.get(part) if isinstance(value, Mapping) else None
    # msgspec's "Expected `int`, got `str`" names the type; the operator wants the value.
    expected = re.sub(r", got `[^`]*`$", "", text)
    return f"{_key_text(key)}: {expected[:1].lower()}{expected[1:]}, got {value!r}"


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
    if settings.cluster.redis_url:
        _check_redis_url(settings.cluster.redis_url)
    for key, value in (
        (("listen",), settings.listen),
        (("metrics", "listen"), settings.metrics.listen),
    ):
        if key == ("metrics", "listen") and not value:
            continue
        try:
            parse_host_port(value)
        except ValueError as exc:
            raise ConfigError(f"{_key_text(key)}: {exc}, got {value!r}") from None
    if settings.metrics.listen and _same_address(settings.listen, settings.metrics.listen):
        raise ConfigError(
            f"{_key_text(('metrics', 'listen'))}: {settings.metrics.listen!r} takes the port "
            f"the proxy serves on (listen is {settings.listen!r}); give the metrics their own"
        )


_ANY_HOST = frozenset({"0.0.0.0", "::", ""})
_LOOPBACK_NAMES = {"localhost": "127.0.0.1"}


def _same_address(first: str, second: str) -> bool:
    """Whether two listen addresses would take the same port (a wildcard takes it on all)."""
    (host_a, port_a), (host_b, port_b) = parse_host_port(first), parse_host_port(second)
    host_a, host_b = _LOOPBACK_NAMES.get(host_a, host_a), _LOOPBACK_NAMES.get(host_b, host_b)
    return port_a == port_b and (host_a == host_b or bool({host_a, host_b} & _ANY_HOST))


def _check_redis_url(url: str) -> None:
    from redis.asyncio.connection import parse_url

    try:
        parse_url(url)
    except ValueError as exc:  # its words name the part, never the password
        raise ConfigError(f"{_key_text(('cluster', 'redis_url'))}: {exc}") from None
