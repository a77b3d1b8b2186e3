"""The route table: which client-server endpoints the proxy acts on, and how.

The proxy must act on exactly the endpoint the homeserver will serve. Homeservers route
paths literally, so the proxy reads a path as each of them does and refuses (400
`M_UNRECOGNIZED`) a path that two readings take for different endpoints when one of them
is an endpoint of this table. The readings, and where each comes from:

- **literal** (Conduit and continuwuity on axum/matchit; Dendrite on gorilla/mux with
  `UseEncodedPath` and `SkipClean`): the raw path split at `/`; fixed segments compared
  byte for byte (case-sensitive, `%73ync` is not `sync`); variable segments
  percent-decoded after matching and never empty; no dot-segment resolution, no merging
  of slashes, the whole path must match.
- **synapse** (Twisted, `synapse/http/server.py` matching the regexes of
  `synapse/rest/client/*` against the raw path, groups `[^/]*` unquoted afterwards): as
  literal, but a variable segment may be empty, and where Synapse's pattern has no `$`
  (`open_ended` below) anything may follow it: `.../threads/..`, `.../threadsX`,
  `.../account_data/m.ignored_user_list/x` are served as that endpoint.
- **normalised**, twice (what a browser, a client library or a proxy in front may do to
  a path before it reaches the homeserver, and what a lenient router would accept):
  percent-decoded, empty and `.` segments dropped, `..` resolved, fixed segments compared
  case-insensitively, open-ended where Synapse is (Synapse may be what serves the
  normalised path); once with `%2F` read as data inside its segment, once as a
  separator. No homeserver splits at `%2F` (all route on the encoded path), but nginx
  does before it matches a `location`, and so does an nginx between the proxy and the
  homeserver whose `proxy_pass` has a URI part. The cost: an event ID holding `/`
  (standard base64, room version 3 only) cannot be named in the path of an endpoint of
  the table through the proxy.

Event and account-data types are data, not path keywords: where a homeserver reads a
segment as a variable (the account-data type), the table says so (`{name=value}`) and the
decoded segment must equal the value exactly.

A path whose readings agree is matched; a path no reading takes for an endpoint of the
table passes through untouched. Which version prefix a route is served under is not
checked (`r0`, `v3`, `api/v1`, `unstable`, an unstable namespace): over-matching a prefix
the homeserver does not serve only ever filters its 404.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_to_bytes

from . import rewrite
from .handlers import (
    FilteredRead,
    ForgetsIdentity,
    Handler,
    IgnoreListWrite,
    PushRules,
    Relations,
    SingleEvent,
    TimestampToEvent,
    Versions,
)
from .rewrite import Rewriter


@dataclass(frozen=True, slots=True)
class Route:
    name: str  # the route class, in logs and metrics
    method: str
    path: str  # segments after `/_matrix/client/{version}/`; `{name}` captures one segment
    handler: Handler
    # Synapse's pattern for it has no `$`: it serves the path with anything after it.
    open_ended: bool = False
    # The path and every path under it, in every reading (the handler reads the rest).
    subtree: bool = False
    segments: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", tuple(self.path.split("/")))


def _events(rewriter: Rewriter, **how: Any) -> FilteredRead:
    return FilteredRead(rewriter, **how)


_EVICTS_TOKEN, _EVICTS_USER = ForgetsIdentity("token"), ForgetsIdentity("user")
_IGNORE_LIST = IgnoreListWrite()

ROUTES: tuple[Route, ...] = (
    Route("sync", "GET", "sync", _events(rewrite.rewrite_sync,
          account_data=rewrite.ignored_users_from_sync, filter="query_or_stored",
          push_rules=rewrite.hide_in_sync)),
    Route("sliding_sync", "POST", "sync", _events(rewrite.rewrite_sliding_sync,
          account_data=rewrite.ignored_users_from_sliding_sync, timeout_in_body=True,
          push_rules=rewrite.hide_in_sliding_sync)),
    Route("messages", "GET", "rooms/{room_id}/messages",
          _events(rewrite.rewrite_messages, filter="query")),
    Route("context", "GET", "rooms/{room_id}/context/{event_id}",
          SingleEvent(rewrite.rewrite_context, filter="query")),
    Route("event", "GET", "rooms/{room_id}/event/{event_id}",
          SingleEvent(rewrite.rewrite_single_event)),
    Route("event", "GET", "events/{event_id}", SingleEvent(rewrite.rewrite_single_event)),
    Route("events", "GET", "events", _events(rewrite.rewrite_events_stream)),
    Route("relations", "GET", "rooms/{room_id}/relations/{event_id}",
          Relations(rewrite.rewrite_relations)),
    Route("relations", "GET", "rooms/{room_id}/relations/{event_id}/{rel_type}",
          Relations(rewrite.rewrite_relations)),
    Route("relations", "GET", "rooms/{room_id}/relations/{event_id}/{rel_type}/{event_type}",
          Relations(rewrite.rewrite_relations)),
    Route("threads", "GET", "rooms/{room_id}/threads", _events(rewrite.rewrite_threads),
          open_ended=True),
    Route("search", "POST", "search", _events(rewrite.rewrite_search, filter="search_body")),
    # Dendrite's MSC2836 (opt-in): whole events in `events`.
    Route("event_relationships", "POST", "event_relationships",
          _events(rewrite.rewrite_event_relationships)),
    Route("notifications", "GET", "notifications", _events(rewrite.rewrite_notifications)),
    Route("initial_sync", "GET", "initialSync", _events(rewrite.rewrite_initial_sync,
          push_rules=rewrite.hide_in_initial_sync)),
    Route("room_initial_sync", "GET", "rooms/{room_id}/initialSync",
          _events(rewrite.rewrite_room_initial_sync)),
    Route("timestamp_to_event", "GET", "rooms/{room_id}/timestamp_to_event",
          TimestampToEvent()),
    Route("versions", "GET", "versions", Versions()),
    Route("ignore_list", "PUT", "user/{user_id}/account_data/{type=m.ignored_user_list}",
          _IGNORE_LIST, open_ended=True),
    Route("ignore_list", "DELETE", "user/{user_id}/account_data/{type=m.ignored_user_list}",
          _IGNORE_LIST, open_ended=True),
    Route("logout", "POST", "logout", _EVICTS_TOKEN),
    Route("logout", "POST", "logout/all", _EVICTS_USER),
    Route("devices", "DELETE", "devices/{device_id}", _EVICTS_USER),
    Route("devices", "POST", "delete_devices", _EVICTS_USER, open_ended=True),
    Route("password", "POST", "account/password", _EVICTS_USER),
    Route("refresh", "POST", "refresh", _EVICTS_TOKEN),
)  # fmt: skip

# With `ignore.suppress_push` only: the proxy's push rules are kept out of what clients
# read and write. Synapse serves `pushrules/.*` (anything under it, `%2F` decoded before
# it splits); the others serve `pushrules/`, `global/`, a kind, a rule and its
# `enabled`/`actions`. Answers are judged by their shape, not by the rest of the path.
_PUSH_RULES, _PUSH_RULES_CONTENT = PushRules(names_rules=True), PushRules(names_rules=False)
PUSH_RULE_ROUTES: tuple[Route, ...] = (
    Route("push_rules", "GET", "pushrules", _PUSH_RULES, subtree=True),
    Route("push_rules", "PUT", "pushrules", _PUSH_RULES, subtree=True),
    Route("push_rules", "DELETE", "pushrules", _PUSH_RULES, subtree=True),
    # Synapse and Conduit serve the ruleset as global account data too.
    Route("push_rules", "GET", "user/{user_id}/account_data/{type=m.push_rules}",
          _PUSH_RULES_CONTENT, open_ended=True),
)  # fmt: skip


class AmbiguousPath(Exception):
    """Homeservers (or what sits before them) could read the path as different endpoints,
    one of them an endpoint the proxy acts on."""


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: Route
    params: dict[str, str]


def _index(routes: tuple[Route, ...]) -> dict[str, tuple[Route, ...]]:
    index: dict[str, list[Route]] = {}
    for route in routes:
        index.setdefault(route.method, []).append(route)
    return {key: tuple(value) for key, value in index.items()}


_BY_METHOD = _index(ROUTES)
_BY_METHOD_WITH_PUSH_RULES = _index(ROUTES + PUSH_RULE_ROUTES)


# Recent answers of `match`, by (method, raw path): the same paths come again and again
# (`/sync`, `/pushrules/`, a room's `/messages`), and matching costs more than a lookup.
_MATCHED: dict[tuple[str, bytes, bool], RouteMatch | type[AmbiguousPath] | None] = {}
_MATCHED_MAX = 4096
_MATCHED_PATH_MAX = 512


def match(method: str, raw_path: bytes, *, push_rules: bool = False) -> RouteMatch | None:
    """The route for a request, or None when the proxy has nothing to do with it;
    `push_rules`: with `PUSH_RULE_ROUTES`.

    Raises `AmbiguousPath` when the readings of the path disagree (module docstring)."""
    key = (method, raw_path, push_rules)
    found = _MATCHED.get(key, _MATCHED)
    if found is _MATCHED:
        try:
            found = _match(
                method, raw_path, _BY_METHOD_WITH_PUSH_RULES if push_rules else _BY_METHOD
            )
        except AmbiguousPath:
            found = AmbiguousPath
        if len(raw_path) <= _MATCHED_PATH_MAX:
            if len(_MATCHED) >= _MATCHED_MAX:
                _MATCHED.clear()
            _MATCHED[key] = found
    if found is AmbiguousPath:
        raise AmbiguousPath
    return found  # type: ignore[return-value]


def _match(
    method: str, raw_path: bytes, by_method: dict[str, tuple[Route, ...]]
) -> RouteMatch | None:
    if b"client" not in raw_path.lower() and b"%" not in raw_path:
        return None  # the common fast case: media, federation, admin, well-known
    if method == "HEAD":
        return None  # no body, nothing to filter: relayed as it is
    routes = by_method.get(method, ())
    if not routes:
        return None
    raw = raw_path.decode("latin-1").split("/")
    literal = _read(routes, raw, _decode)
    readings = (
        _read(routes, raw, _decode, empty_params=True, open_ended=True),
        _read(routes, _normalise([_decode(p) for p in raw]), str, open_ended=True, fold=True),
        _read(
            routes,
            _normalise(_decode(raw_path.decode("latin-1")).split("/")),
            str,
            open_ended=True,
            fold=True,
        ),
    )
    if any(reading != literal for reading in readings):
        raise AmbiguousPath
    return literal


def _decode(raw: str) -> str:
    """Percent-decode a piece of the path (held as latin-1 text, byte for byte)."""
    return unquote_to_bytes(raw.encode("latin-1")).decode("utf-8", "surrogateescape")


def _normalise(parts: list[str]) -> list[str]:
    """Drop empty and `.` segments and resolve `..` in decoded segments."""
    segments: list[str] = []
    for part in parts:
        if part in ("", "."):
            continue
        if part == "..":
            if segments:
                segments.pop()
            continue
        segments.append(part)
    return ["", *segments]


def _read(
    routes: tuple[Route, ...],
    raw: list[str],
    decode: Callable[[str], str],
    *,
    empty_params: bool = False,
    open_ended: bool = False,
    fold: bool = False,
) -> RouteMatch | None:
    """The route one reading takes the path for. `raw` starts with the empty segment
    before the first `/`; fixed segments are compared as they stand in `raw` (ignoring
    case with `fold`), variables are read through `decode`."""
    fixed = [part.lower() for part in raw[:5]] if fold else raw[:5]
    if len(raw) < 4 or fixed[0] != "" or fixed[1] != "_matrix" or fixed[2] != "client":
        return None
    if len(raw) == 4:
        rest = raw[3:]  # unversioned: `/_matrix/client/versions`
    elif fixed[3] == "api" and len(raw) > 4 and fixed[4] == "v1":
        rest = raw[5:]
    else:
        rest = raw[4:]
    if rest and "." in rest[0] and rest[0] not in (".", ".."):
        rest = rest[1:]  # an unstable namespace such as `org.matrix.msc3391`
    for route in routes:
        params = _match_segments(
            route, rest, decode, empty_params=empty_params, open_ended=open_ended, fold=fold
        )
        if params is not None:
            return RouteMatch(route, params)
    return None


def _match_segments(
    route: Route,
    segments: list[str],
    decode: Callable[[str], str],
    *,
    empty_params: bool,
    open_ended: bool,
    fold: bool,
) -> dict[str, str] | None:
    pattern = route.segments
    if len(segments) != len(pattern) and not (
        (route.subtree or (open_ended and route.open_ended)) and len(segments) > len(pattern)
    ):
        return None
    params: dict[str, str] = {}
    last = len(pattern) - 1
    for position, (expected, actual) in enumerate(zip(pattern, segments, strict=False)):
        if expected.startswith("{"):
            if not actual and not empty_params:
                return None
            name, _, fixed = expected[1:-1].partition("=")
            value = decode(actual)
            if fixed and value != fixed:
                return None
            params[name] = value
        elif expected == actual or (fold and expected.lower() == actual.lower()):
            continue
        elif not (open_ended and route.open_ended and position == last
                  and actual.startswith(expected)):  # fmt: skip
            return None
    return params
