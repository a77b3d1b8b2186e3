"""routes.py: the proxy reads a path as the homeservers route it, and refuses a path that
two readings take for different endpoints when one of them is an endpoint it acts on."""

from __future__ import annotations

import pytest

from ignore_proxy.routes import AmbiguousPath, match

AMBIGUOUS = "ambiguous"
CS = "/_matrix/client/v3"
IGNORE_LIST = ("ignore_list", {"user_id": "@a:hs", "type": "m.ignored_user_list"})


def outcome(method: str, path: str) -> tuple[str, dict[str, str]] | str | None:
    try:
        found = match(method, path.encode())
    except AmbiguousPath:
        return AMBIGUOUS
    return None if found is None else (found.route.name, found.params)


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", f"{CS}/sync", ("sync", {})),
        ("GET", "/_matrix/client/r0/sync", ("sync", {})),
        ("POST", "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
         ("sliding_sync", {})),
        ("POST", "/_matrix/client/v4/sync", ("sliding_sync", {})),
        ("GET", f"{CS}/rooms/%21r%3Ahs/messages", ("messages", {"room_id": "!r:hs"})),
        ("GET", "/_matrix/client/api/v1/rooms/!r:hs/messages", ("messages", {"room_id": "!r:hs"})),
        ("GET", "/_matrix/client/v1/rooms/!r:hs/relations/$e/m.thread",
         ("relations", {"room_id": "!r:hs", "event_id": "$e", "rel_type": "m.thread"})),
        ("PUT", f"{CS}/user/%40a%3Ahs/account_data/m.ignored_user_list", IGNORE_LIST),
        # The account-data type is data the homeserver decodes, not a path keyword.
        ("PUT", f"{CS}/user/@a:hs/account_data/m%2Eignored_user_list", IGNORE_LIST),
        ("DELETE", "/_matrix/client/unstable/org.matrix.msc3391/user/@a:hs/account_data/"
         "m.ignored_user_list", IGNORE_LIST),
        # Case-sensitive data: another account-data type, which the proxy leaves alone.
        ("PUT", f"{CS}/user/@a:hs/account_data/M.IGNORED_USER_LIST", None),
        ("PUT", f"{CS}/user/@a:hs/account_data/m.ignored_user_listX", None),
        # Not endpoints of the table in any reading.
        ("GET", f"{CS}/pushrules/", None),
        ("GET", f"{CS}/rooms/!r:hs/state/m.room.member/%40a%3Ahs", None),
        ("GET", "/_matrix/media/v3/download/hs/abc", None),
        ("HEAD", f"{CS}/sync", None),
        # Synapse takes `..` as the relation type and answers with the parent event; a
        # normalising reading sees `/relations` (no endpoint): refused either way.
        ("GET", "/_matrix/client/v1/rooms/!r/relations/$e/..", AMBIGUOUS),
        ("GET", "/_matrix/client/v1/rooms/!r/relations/$e/%2e%2e", AMBIGUOUS),
        ("GET", "/_matrix/client/v1/rooms/!r/relations/$e/../..", AMBIGUOUS),
        ("GET", "/_matrix/client/v1/rooms/!r/relations/$e/../m.reaction", AMBIGUOUS),
        # Synapse's patterns without `$` serve what follows them.
        ("GET", "/_matrix/client/v1/rooms/!r/threads/..", AMBIGUOUS),
        ("GET", "/_matrix/client/v1/rooms/!r/threadsX", AMBIGUOUS),
        ("PUT", f"{CS}/user/@a:hs/account_data/m.ignored_user_list/x", AMBIGUOUS),
        ("PUT", f"{CS}/user/@a:hs/account_data/m.ignored_user_list/../..", AMBIGUOUS),
        ("POST", f"{CS}/delete_devices/x", AMBIGUOUS),
        # Spellings a homeserver does not serve but a lenient router or a normalising
        # proxy between would.
        ("GET", f"{CS}/sync/", AMBIGUOUS),
        ("GET", f"{CS}//sync", AMBIGUOUS),
        ("GET", f"{CS}/./sync", AMBIGUOUS),
        ("GET", f"{CS}/%73ync", AMBIGUOUS),
        ("GET", f"{CS}/SYNC", AMBIGUOUS),
        ("GET", "/_matrix/CLIENT/v3/sync", AMBIGUOUS),
        ("GET", f"{CS}/rooms/x/../../sync", AMBIGUOUS),
        ("GET", "/_matrix/client/v3%2Fsync", AMBIGUOUS),
        ("GET", f"{CS}/rooms/!r/event/$a%2Fb", AMBIGUOUS),
        # Synapse matches an empty room ID, matchit and gorilla/mux do not.
        ("GET", f"{CS}/rooms//messages", AMBIGUOUS),
    ],
)  # fmt: skip
def test_readings(method: str, path: str, expected: object) -> None:
    assert outcome(method, path) == expected


def test_matching_is_cached_per_method_and_path() -> None:
    first = match("GET", f"{CS}/rooms/!cache:hs/messages".encode())
    assert first is match("GET", f"{CS}/rooms/!cache:hs/messages".encode())
    with pytest.raises(AmbiguousPath):
        match("GET", f"{CS}/rooms/!cache:hs/messages/".encode())
    with pytest.raises(AmbiguousPath):  # an ambiguous answer is cached as one too
        match("GET", f"{CS}/rooms/!cache:hs/messages/".encode())


PUSH_RULES: tuple[str, dict[str, str]] = ("push_rules", {})


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", f"{CS}/pushrules/", PUSH_RULES),
        ("GET", "/_matrix/client/r0/pushrules/global/", PUSH_RULES),
        ("GET", f"{CS}/pushrules/global/override/", PUSH_RULES),
        ("PUT", f"{CS}/pushrules/global/override/mine", PUSH_RULES),
        ("PUT", f"{CS}/pushrules/global/override/mine/enabled", PUSH_RULES),
        ("DELETE", f"{CS}/pushrules/global/content/mine", PUSH_RULES),
        # Synapse splits the rule's path after decoding it: the handler reads the rest.
        ("DELETE", f"{CS}/pushrules/global/override/a%2Fenabled", PUSH_RULES),
        ("GET", f"{CS}/user/@a:hs/account_data/m.push_rules",
         ("push_rules", {"user_id": "@a:hs", "type": "m.push_rules"})),
        ("POST", f"{CS}/pushrules/global/override/mine", None),
        ("GET", f"{CS}/pushrulesX/", None),
        # A reading that leaves the subtree, or finds it in another spelling.
        ("GET", f"{CS}/pushrules/../sync", AMBIGUOUS),
        ("GET", f"{CS}/PushRules/", AMBIGUOUS),
        ("PUT", f"{CS}/x/../pushrules/global/override/mine", AMBIGUOUS),
        # The table without them is unchanged.
        ("GET", f"{CS}/sync", ("sync", {})),
    ],
)  # fmt: skip
def test_push_rule_routes_with_suppress_push(method: str, path: str, expected: object) -> None:
    try:
        found = match(method, path.encode(), push_rules=True)
    except AmbiguousPath:
        got: object = AMBIGUOUS
    else:
        got = None if found is None else (found.route.name, found.params)
    assert got == expected
    if expected == PUSH_RULES:
        assert match(method, path.encode()) is None  # the setting off: relayed as before
