"""The route table: which client-server endpoints the proxy acts on, and how.

Matching works on decoded, normalised path segments while the request itself is
forwarded with its raw path, so no spelling of a path (percent-encoding, repeated or
trailing slashes, dot segments, letter case, any version prefix, an unstable namespace)
can be a way around the filter. Anything not in the table passes through untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote_to_bytes

from . import rewrite
from .rewrite import Rewriter

AccountDataReader = Callable[[bytes], frozenset[str] | None]


@dataclass(frozen=True, slots=True)
class Route:
    name: str  # the route class, in logs and metrics
    method: str
    path: str  # segments after `/_matrix/client/{version}/`; `{name}` captures one segment
    rewriter: Rewriter | None = None
    # Rewrites the answer the same way for everyone (no identity needed).
    public_rewriter: Callable[[bytes], bytes] | None = None
    # Learns the ignore list from the account data the answer carries (sync).
    account_data: AccountDataReader | None = None
    # Answers about one event: an ignored sender's becomes 404 M_SENDER_IGNORED, and a
    # homeserver's own SenderIgnored error is normalised to the same shape.
    single_event: bool = False
    # The event named by `{event_id}` is not in the answer: look it up before answering.
    check_path_event: bool = False
    # The answer names one event and nothing about its sender (timestamp_to_event).
    nearest_unignored: bool = False
    ignore_list_write: bool = False
    evicts: Literal["token", "user"] | None = None
    segments: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", tuple(self.path.split("/")))

    @property
    def needs_ignore_list(self) -> bool:
        return self.rewriter is not None or self.nearest_unignored

    @property
    def reads_body(self) -> bool:
        """The proxy may have to read the answer whole (so asks for it uncompressed)."""
        return self.needs_ignore_list or self.public_rewriter is not None


ROUTES: tuple[Route, ...] = (
    Route("sync", "GET", "sync", rewrite.rewrite_sync,
          account_data=rewrite.ignored_users_from_sync),
    Route("sliding_sync", "POST", "sync", rewrite.rewrite_sliding_sync,
          account_data=rewrite.ignored_users_from_sliding_sync),
    Route("messages", "GET", "rooms/{room_id}/messages", rewrite.rewrite_messages),
    Route("context", "GET", "rooms/{room_id}/context/{event_id}", rewrite.rewrite_context,
          single_event=True),
    Route("event", "GET", "rooms/{room_id}/event/{event_id}", rewrite.rewrite_single_event,
          single_event=True),
    Route("event", "GET", "events/{event_id}", rewrite.rewrite_single_event, single_event=True),
    Route("events", "GET", "events", rewrite.rewrite_events_stream),
    Route("relations", "GET", "rooms/{room_id}/relations/{event_id}", rewrite.rewrite_relations,
          single_event=True, check_path_event=True),
    Route("relations", "GET", "rooms/{room_id}/relations/{event_id}/{rel_type}",
          rewrite.rewrite_relations, single_event=True, check_path_event=True),
    Route("relations", "GET", "rooms/{room_id}/relations/{event_id}/{rel_type}/{event_type}",
          rewrite.rewrite_relations, single_event=True, check_path_event=True),
    Route("threads", "GET", "rooms/{room_id}/threads", rewrite.rewrite_threads),
    Route("search", "POST", "search", rewrite.rewrite_search),
    Route("notifications", "GET", "notifications", rewrite.rewrite_notifications),
    Route("initial_sync", "GET", "initialSync", rewrite.rewrite_initial_sync),
    Route("room_initial_sync", "GET", "rooms/{room_id}/initialSync",
          rewrite.rewrite_room_initial_sync),
    Route("timestamp_to_event", "GET", "rooms/{room_id}/timestamp_to_event",
          nearest_unignored=True),
    Route("versions", "GET", "versions", public_rewriter=rewrite.add_msc4406_feature),
    Route("ignore_list", "PUT", "user/{user_id}/account_data/m.ignored_user_list",
          ignore_list_write=True),
    Route("ignore_list", "DELETE", "user/{user_id}/account_data/m.ignored_user_list",
          ignore_list_write=True),
    Route("logout", "POST", "logout", evicts="token"),
    Route("logout", "POST", "logout/all", evicts="user"),
    Route("devices", "DELETE", "devices/{device_id}", evicts="user"),
    Route("devices", "POST", "delete_devices", evicts="user"),
    Route("password", "POST", "account/password", evicts="user"),
    Route("refresh", "POST", "refresh", evicts="token"),
)  # fmt: skip


class AmbiguousPath(Exception):
    """The path names different endpoints depending on how `%2F` is read."""


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: Route
    params: dict[str, str]


def _index(routes: tuple[Route, ...]) -> dict[tuple[str, int], tuple[Route, ...]]:
    index: dict[tuple[str, int], list[Route]] = {}
    for route in routes:
        index.setdefault((route.method, len(route.segments)), []).append(route)
    return {key: tuple(value) for key, value in index.items()}


_BY_SHAPE = _index(ROUTES)


# Recent answers of `match`, by (method, raw path): the same paths come again and again
# (`/sync`, `/pushrules/`, a room's `/messages`), and matching costs more than a lookup.
_MATCHED: dict[tuple[str, bytes], RouteMatch | type[AmbiguousPath] | None] = {}
_MATCHED_MAX = 4096
_MATCHED_PATH_MAX = 512


def match(method: str, raw_path: bytes) -> RouteMatch | None:
    """The route for a request, or None when the proxy has nothing to do with it."""
    key = (method, raw_path)
    found = _MATCHED.get(key, _MATCHED)
    if found is _MATCHED:
        try:
            found = _match(method, raw_path)
        except AmbiguousPath:
            found = AmbiguousPath
        if len(raw_path) <= _MATCHED_PATH_MAX:
            if len(_MATCHED) >= _MATCHED_MAX:
                _MATCHED.clear()
            _MATCHED[key] = found
    if found is AmbiguousPath:
        raise AmbiguousPath
    return found  # type: ignore[return-value]


def _match(method: str, raw_path: bytes) -> RouteMatch | None:
    if b"client" not in raw_path.lower() and b"%" not in raw_path:
        return None  # the common fast case: media, federation, admin, well-known
    if method == "HEAD":
        return None  # no body, nothing to filter: relayed as it is
    readings = {
        (found.route, tuple(found.params.items())): found
        for segments in _segmentations(raw_path)
        if (found := _match_client_path(method, segments)) is not None
    }
    if len(readings) > 1:
        # `%2F` read as data and as a separator name two different requests: which one
        # the homeserver serves is unknown, so neither filter can be trusted.
        raise AmbiguousPath
    return next(iter(readings.values()), None)


def _segmentations(raw_path: bytes) -> Iterator[list[str]]:
    # A homeserver may decode `%2F` before or after splitting the path: try both readings.
    split_first = [_decode(part) for part in raw_path.split(b"/")]
    yield _normalise(split_first)
    if b"%" in raw_path:
        yield _normalise(_decode(raw_path).split("/"))


def _decode(raw: bytes) -> str:
    return unquote_to_bytes(raw).decode("utf-8", "surrogateescape")


def _normalise(parts: list[str]) -> list[str]:
    """Drop empty segments (repeated and trailing slashes) and resolve dot segments."""
    segments: list[str] = []
    for part in parts:
        if part in ("", "."):
            continue
        if part == "..":
            if segments:
                segments.pop()
            continue
        segments.append(part)
    return segments


def _match_client_path(method: str, segments: list[str]) -> RouteMatch | None:
    lowered = [segment.lower() for segment in segments[:4]]
    if lowered[:2] != ["_matrix", "client"] or len(segments) < 3:
        return None
    if len(segments) == 3:
        rest = segments[2:]  # unversioned: `/_matrix/client/versions`
    elif lowered[2:4] == ["api", "v1"]:
        rest = segments[4:]
    else:
        rest = segments[3:]
    if rest and "." in rest[0]:
        rest = rest[1:]  # an unstable namespace such as `org.matrix.msc3391`
    for route in _BY_SHAPE.get((method, len(rest)), ()):
        params = _match_segments(route.segments, rest)
        if params is not None:
            return RouteMatch(route, params)
    return None


def _match_segments(pattern: tuple[str, ...], segments: list[str]) -> dict[str, str] | None:
    params: dict[str, str] = {}
    for expected, actual in zip(pattern, segments, strict=True):
        if expected.startswith("{"):
            params[expected[1:-1]] = actual
        elif expected.lower() != actual.lower():
            return None
    return params
