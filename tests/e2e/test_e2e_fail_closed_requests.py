"""Requests the proxy could once be tricked by, against real Synapse (stock and without
ignore support): the proxy and Synapse must agree on who asks and which endpoint is
served, or the proxy refuses. alice ignores bob in every test."""

from __future__ import annotations

import json
from typing import Any

import pytest

from .conftest import PROXIED, Stack, Target, World, _target_id
from .harness.matrix import CS, q
from .harness.raw import RawResponse, raw_request

pytestmark = pytest.mark.e2e

THROUGH_PROXY = [param for param in PROXIED if param[1] == "proxy"]


@pytest.fixture(params=THROUGH_PROXY, ids=_target_id)
def target(request: pytest.FixtureRequest, stack: Stack) -> Target:
    mode, via = request.param
    return Target(mode, via, stack.url(mode, via), stack.synapse(mode))


async def raw_get(
    w: World, target: str, headers: list[tuple[bytes, bytes]] | None = None
) -> RawResponse:
    return await raw_request(w.target.url, "GET", target, headers)


def auth(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {token}".encode())]


@pytest.mark.parametrize("tail", ["..", "%2e%2e", "%2E%2E", "../..", "../m.reaction", ".", "%2e"])
async def test_dot_segments_after_relations_are_refused(world: World, tail: str) -> None:
    """Synapse reads `..` as a relation type and answers with the parent event in
    `original_event` on the unstable prefix; the proxy once resolved the dot segment,
    saw no route and relayed bob's message."""
    w = world
    bob_msg = await w.bob.send_text(w.room_id, "bob's words behind a dot segment")
    for prefix in ("/_matrix/client/unstable", "/_matrix/client/v1"):
        path = f"{prefix}/rooms/{q(w.room_id)}/relations/{q(bob_msg)}/{tail}"
        resp = await raw_get(w, path, auth(w.alice.access_token))
        assert "behind a dot segment" not in resp.text, (path, resp.text)
        assert resp.status_code == 400, (path, resp.text)
        assert resp.json()["errcode"] == "M_UNRECOGNIZED"


async def test_relations_of_an_ignored_parent_on_the_unstable_prefix(world: World) -> None:
    w = world
    bob_msg = await w.bob.send_text(w.room_id, "bob's parent")
    path = f"/_matrix/client/unstable/rooms/{q(w.room_id)}/relations/{q(bob_msg)}"
    resp = await raw_get(w, path, auth(w.alice.access_token))
    assert "bob's parent" not in resp.text, resp.text
    assert resp.status_code in (403, 404), resp.text


async def test_an_account_data_type_in_other_letters_is_not_the_ignore_list(
    world: World,
) -> None:
    """Types are case-sensitive: `M.IGNORED_USER_LIST` is another account-data type, and
    writing it must not empty alice's list in the proxy."""
    w = world
    path = f"{CS}/user/{q(w.alice.user_id)}/account_data/M.IGNORED_USER_LIST"
    resp = await w.alice.request("PUT", path, json={"ignored_users": {}})
    assert resp.status_code == 200, resp.text
    await w.bob.send_text(w.room_id, "bob after the decoy write")
    body = await w.alice.get_json(
        f"{CS}/rooms/{q(w.room_id)}/messages", params={"dir": "b", "limit": "50"}
    )
    assert "bob after the decoy write" not in json.dumps(body)
    stored = await w.alice.get_json(path)
    assert stored == {"ignored_users": {}}  # the homeserver stored it as its own type


async def test_ignore_list_write_with_a_suffix_is_refused(world: World) -> None:
    """Synapse serves `.../account_data/m.ignored_user_list/x` as the list itself."""
    w = world
    path = f"{CS}/user/{q(w.alice.user_id)}/account_data/m.ignored_user_list/x"
    resp = await w.alice.request("PUT", path, json={"ignored_users": {}})
    assert resp.status_code == 400, resp.text
    assert resp.json()["errcode"] == "M_UNRECOGNIZED"
    stored = await w.alice.get_json(
        f"{CS}/user/{q(w.alice.user_id)}/account_data/m.ignored_user_list"
    )
    assert w.bob.user_id in stored["ignored_users"]


async def test_a_header_named_in_connection_does_not_decide_whose_list(world: World) -> None:
    """`Connection: close, authorization` drops the header before it is forwarded; the
    homeserver acts on the query token, so the proxy must too."""
    w = world
    await w.bob.send_text(w.room_id, "bob behind a hop-by-hop header")
    path = f"{CS}/rooms/{q(w.room_id)}/messages?dir=b&limit=50&access_token={w.alice.access_token}"
    headers = [*auth(w.bob.access_token), (b"connection", b"close, authorization")]
    resp = await raw_get(w, path, headers)
    assert resp.status_code == 200, resp.text
    assert "bob behind a hop-by-hop header" not in resp.text


@pytest.mark.parametrize(
    "extra",
    [
        "user_id=%FF",
        "device_id=%FF",
        "org.matrix.msc3202.device_id=%FE%FF",
        "x=1;user_id=%FF",
        "x=1;access_token=other",
        "user_id={alice}&user_id={bob}",
    ],
)
async def test_credentials_read_otherwise_by_some_homeserver_are_refused(
    world: World, extra: str
) -> None:
    w = world
    await w.bob.send_text(w.room_id, "bob behind odd credentials")
    extra = extra.format(alice=q(w.alice.user_id), bob=q(w.bob.user_id))
    path = f"{CS}/rooms/{q(w.room_id)}/messages?dir=b&limit=50&{extra}"
    resp = await raw_get(w, path, auth(w.alice.access_token))
    assert "bob behind odd credentials" not in resp.text
    assert resp.status_code == 400, resp.text
    assert resp.json()["errcode"] == "M_INVALID_PARAM"


async def test_a_non_ascii_header_beside_a_query_token_is_refused(world: World) -> None:
    w = world
    await w.bob.send_text(w.room_id, "bob behind a broken header")
    path = f"{CS}/rooms/{q(w.room_id)}/messages?dir=b&limit=50&access_token={w.alice.access_token}"
    resp = await raw_get(w, path, [(b"authorization", "Bearer caf\xe9".encode("latin-1"))])
    assert "bob behind a broken header" not in resp.text
    assert resp.status_code == 401, resp.text
    assert resp.json()["errcode"] == "M_MISSING_TOKEN"


def _timeline(body: dict[str, Any], room_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = body["rooms"]["join"][room_id]["timeline"]["events"]
    return events


CONTENT_ONLY = {
    "event_fields": ["content", "type"],
    "room": {"timeline": {"limit": 50}},
}


async def test_an_inline_filter_cannot_strip_the_sender(world: World) -> None:
    """`event_fields` makes Synapse leave `sender` out of every event: the proxy takes
    them out of the filter it forwards and applies them itself after filtering."""
    w = world
    await w.bob.send_text(w.room_id, "bob behind event_fields")
    await w.charlie.send_text(w.room_id, "charlie behind event_fields")
    body = await w.alice.sync(filter_json=json.dumps(CONTENT_ONLY))
    text = json.dumps(body)
    assert "bob behind event_fields" not in text
    assert "charlie behind event_fields" in text
    for event in _timeline(body, w.room_id):
        assert set(event) <= {"content", "type"}, event  # the client's fields, applied


async def test_a_stored_filter_cannot_strip_the_sender(world: World) -> None:
    w = world
    stored = await w.alice.request(
        "POST", f"{CS}/user/{q(w.alice.user_id)}/filter", json=CONTENT_ONLY
    )
    assert stored.status_code == 200, stored.text
    filter_id = stored.json()["filter_id"]
    await w.bob.send_text(w.room_id, "bob behind a stored filter")
    await w.charlie.send_text(w.room_id, "charlie behind a stored filter")
    for _ in range(2):  # the second time from the proxy's cache of stored filters
        body = await w.alice.sync(filter_json=filter_id)
        text = json.dumps(body)
        assert "bob behind a stored filter" not in text
        assert "charlie behind a stored filter" in text
        for event in _timeline(body, w.room_id):
            assert set(event) <= {"content", "type"}, event


@pytest.mark.parametrize(
    ("value", "errcode"),
    [("{not json", "M_NOT_JSON"), ("999999", "M_INVALID_PARAM"), ('["a"]', "M_INVALID_PARAM")],
)
async def test_a_filter_the_proxy_cannot_read_is_refused(
    world: World, value: str, errcode: str
) -> None:
    w = world
    resp = await w.alice.request("GET", f"{CS}/sync", params={"filter": value})
    assert resp.status_code == 400, resp.text
    assert resp.json()["errcode"] == errcode


async def test_search_and_messages_filters_lose_their_event_fields(world: World) -> None:
    w = world
    await w.bob.send_text(w.room_id, "bob searchable words")
    await w.charlie.send_text(w.room_id, "charlie searchable words")
    room_filter = {"event_fields": ["content"], "rooms": [w.room_id]}
    resp = await w.alice.request(
        "POST",
        f"{CS}/search",
        json={"search_categories": {"room_events": {"search_term": "searchable",
                                                     "filter": room_filter}}},
    )  # fmt: skip
    assert resp.status_code == 200, resp.text
    assert "bob searchable" not in resp.text
    assert "charlie searchable" in resp.text
    resp = await w.alice.request(
        "GET",
        f"{CS}/rooms/{q(w.room_id)}/messages",
        params={"dir": "b", "filter": json.dumps({"event_fields": ["content"]})},
    )
    assert resp.status_code == 200, resp.text
    assert "bob searchable" not in resp.text
    assert "charlie searchable" in resp.text
