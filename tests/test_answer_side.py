"""Fail closed, answer side: on a route the proxy filters, the client gets a body the proxy
read whole and filtered, or a Matrix error; never bytes it could not judge."""

from __future__ import annotations

import gzip
import json
from typing import Any

import httpx
import pytest

from .fake_homeserver import (
    ALICE,
    BOB,
    CHARLIE,
    ROOM,
    FakeHomeserver,
    build_app,
    client_for,
    message,
)

SYNC = "/_matrix/client/v3/sync"
EVENT = f"/_matrix/client/v3/rooms/{ROOM}/event/$b1"
SYNC_BODY: dict[str, Any] = {
    "next_batch": "s2",
    "rooms": {
        "join": {ROOM: {"timeline": {"events": [message("$b1", BOB), message("$c1", CHARLIE)]}}}
    },
}


@pytest.fixture
def homeserver() -> FakeHomeserver:
    hs = FakeHomeserver()
    hs.ignore(ALICE, BOB)
    return hs


def answering(status: int, body: bytes, **headers: str) -> Any:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, headers=headers)

    return answer


@pytest.mark.parametrize("status", [201, 203, 206, 299])
async def test_every_success_is_filtered_like_a_200(
    homeserver: FakeHomeserver, status: int
) -> None:
    homeserver.answers[("GET", "/sync")] = answering(status, json.dumps(SYNC_BODY).encode())
    homeserver.answers[("GET", f"/rooms/{ROOM}/event/$b1")] = answering(
        status, json.dumps(message("$b1", BOB)).encode()
    )
    async with client_for(build_app(homeserver), "alice-token") as alice:
        response = await alice.get(SYNC)
        assert response.status_code == status
        assert "$b1" not in response.text and "$c1" in response.text
        single = await alice.get(EVENT)
    assert single.status_code == 404
    assert single.json() == {
        "errcode": "M_SENDER_IGNORED",
        "error": "You have ignored the user that sent this event",
        "sender": BOB,
    }


@pytest.mark.parametrize("status", [300, 301, 302, 303, 307, 308])
async def test_a_redirect_on_a_filtered_route_is_refused(
    homeserver: FakeHomeserver, status: int
) -> None:
    homeserver.answers[("GET", "/sync")] = answering(
        status, json.dumps(SYNC_BODY).encode(), location="http://elsewhere/"
    )
    async with client_for(build_app(homeserver), "alice-token") as alice:
        response = await alice.get(SYNC)
    assert response.status_code == 502
    assert "$b1" not in response.text
    assert response.json()["errcode"] == "M_UNKNOWN"


async def test_headers_asking_for_part_of_an_answer_are_not_forwarded_on_filtered_routes(
    homeserver: FakeHomeserver,
) -> None:
    homeserver.answers[("GET", "/sync")] = SYNC_BODY
    homeserver.answers[("GET", "/pushrules/")] = {"global": {}}
    partial = {
        "range": "bytes=0-10",
        "if-range": '"e1"',
        "if-none-match": '"e1"',
        "if-modified-since": "Sat, 05 Dec 2026 00:00:00 GMT",
        "accept-encoding": "gzip, br",
    }
    async with client_for(build_app(homeserver), "alice-token") as alice:
        await alice.get(SYNC, headers=partial)
        await alice.get("/_matrix/client/v3/pushrules/", headers=partial)
    filtered, passed = (r for r in homeserver.requests if "whoami" not in str(r.url)
                        and "account_data" not in str(r.url))  # fmt: skip
    assert "/sync" in str(filtered.url)
    assert not {"range", "if-range", "if-none-match", "if-modified-since"} & set(filtered.headers)
    assert filtered.headers["accept-encoding"] == "identity"
    # Pass-through routes keep them: the proxy does not read those answers.
    assert passed.headers["range"] == "bytes=0-10"
    assert passed.headers["accept-encoding"] == "gzip, br"


SYNC_BYTES = json.dumps(SYNC_BODY).encode()


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (SYNC_BYTES.decode().encode("utf-16"), {"content-type": "application/json"}),
        (SYNC_BYTES.decode().encode("utf-16-le"), {"content-type": "application/json"}),
        (SYNC_BYTES.decode().encode("utf-32"), {}),
        (b"\xef\xbb\xbf" + SYNC_BYTES, {"content-type": "application/json"}),
        (SYNC_BYTES, {"content-type": "application/json; charset=utf-16"}),
        (SYNC_BYTES, {"content-type": 'application/json; charset="ISO-8859-1"'}),
        (gzip.compress(SYNC_BYTES), {}),  # compressed, the header missing
        (SYNC_BYTES, {"content-encoding": "br"}),
        (SYNC_BYTES, {"content-encoding": "zstd"}),
        (gzip.compress(SYNC_BYTES)[:-12], {"content-encoding": "gzip"}),
        (b"[" + SYNC_BYTES + b"]", {}),
        # not UTF-8 inside a string: a lone 0xff, an encoded surrogate, a cut sequence
        (SYNC_BYTES.replace(b'"hi"', b'"h\xff"', 1), {}),
        (SYNC_BYTES.replace(b'"hi"', b'"h\xed\xa0\x80"', 1), {}),
        (SYNC_BYTES.replace(b'"hi"', b'"h\xc3"', 1), {}),
    ],
)
async def test_an_answer_the_proxy_cannot_read_is_refused(
    homeserver: FakeHomeserver, body: bytes, headers: dict[str, str]
) -> None:
    homeserver.answers[("GET", "/sync")] = answering(200, body, **headers)
    async with client_for(build_app(homeserver), "alice-token") as alice:
        response = await alice.get(SYNC)
    assert response.status_code == 502, response.content[:100]
    assert response.json()["errcode"] == "M_UNKNOWN"


async def test_an_answer_in_utf_8_beyond_ascii_is_filtered(homeserver: FakeHomeserver) -> None:
    """Conduit writes non-ASCII text as raw UTF-8 (Synapse escapes it): read and filtered."""
    body = SYNC_BYTES.replace(b'"hi"', '"h\u00e9 \u2603 \U0001f600"'.encode())
    assert not body.isascii()
    homeserver.answers[("GET", "/sync")] = answering(200, body)
    async with client_for(build_app(homeserver), "alice-token") as alice:
        response = await alice.get(SYNC)
    assert response.status_code == 200, response.text
    assert "h\u00e9 \u2603 \U0001f600" in response.text


@pytest.mark.parametrize(
    "encoding", ["gzip", "x-gzip", "deflate", "gzip, identity", "identity, gzip"]
)
async def test_a_compressed_answer_is_decoded_and_filtered(
    homeserver: FakeHomeserver, encoding: str
) -> None:
    import zlib

    coded = zlib.compress(SYNC_BYTES) if encoding == "deflate" else gzip.compress(SYNC_BYTES)
    homeserver.answers[("GET", "/sync")] = answering(200, coded, **{"content-encoding": encoding})
    async with client_for(build_app(homeserver), "alice-token") as alice:
        response = await alice.get(SYNC)
    assert response.status_code == 200
    assert "content-encoding" not in response.headers
    assert "$b1" not in response.text and "$c1" in response.text


async def test_an_event_where_no_rewriter_looks_is_removed_from_its_list(
    homeserver: FakeHomeserver,
) -> None:
    body = {
        **SYNC_BODY,
        "org.example.new_msc": {"events": [message("$b9", BOB), message("$c9", CHARLIE)]},
    }
    homeserver.answers[("GET", "/sync")] = body
    async with client_for(build_app(homeserver), "alice-token") as alice:
        response = await alice.get(SYNC)
    assert response.status_code == 200
    assert "$b9" not in response.text and "$b1" not in response.text
    assert "$c9" in response.text


@pytest.mark.parametrize(
    "timeline",
    [
        {"events": {"0": message("$b1", BOB)}},  # an object where a list should be
        {"events": [], "org.example.latest": message("$b1", BOB)},
    ],
)
async def test_an_ignored_event_that_cannot_be_removed_refuses_the_answer(
    homeserver: FakeHomeserver, timeline: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    homeserver.answers[("GET", "/sync")] = {
        "next_batch": "s",
        "rooms": {"join": {ROOM: {"timeline": timeline}}},
    }
    async with client_for(build_app(homeserver), "alice-token") as alice:
        response = await alice.get(SYNC)
    assert response.status_code == 502
    assert "$b1" not in response.text
    assert "/rooms/join/" in caplog.text and "hi" not in caplog.text  # the path, not content


async def test_msc2836_event_relationships_is_filtered(homeserver: FakeHomeserver) -> None:
    homeserver.answers[("POST", "/event_relationships")] = {
        "events": [message("$b1", BOB), message("$c1", CHARLIE)],
        "limited": False,
    }
    async with client_for(build_app(homeserver), "alice-token") as alice:
        response = await alice.post(
            "/_matrix/client/unstable/event_relationships", json={"event_id": "$c1"}
        )
    assert response.status_code == 200
    assert [e["event_id"] for e in response.json()["events"]] == ["$c1"]


async def test_thread_counts_are_learned_once_per_state_of_the_thread(
    homeserver: FakeHomeserver,
) -> None:
    summary = {"latest_event": message("$c3", CHARLIE), "count": 3}
    root = {**message("$root", CHARLIE), "unsigned": {"m.relations": {"m.thread": summary}}}
    homeserver.answers[("GET", f"/rooms/{ROOM}/messages")] = {"chunk": [root], "start": "s"}
    relations = f"/rooms/{ROOM}/relations/$root/m.thread"
    homeserver.answers[("GET", relations)] = {
        "chunk": [message("$c3", CHARLIE), message("$b2", BOB), message("$c1", CHARLIE)]
    }
    path = f"/_matrix/client/v3/rooms/{ROOM}/messages"
    async with client_for(build_app(homeserver), "alice-token") as alice:
        counts = []
        for _ in range(3):
            body = (await alice.get(path)).json()
            counts.append(body["chunk"][0]["unsigned"]["m.relations"]["m.thread"]["count"])
        summary["count"] = 4  # a new reply: looked up again
        homeserver.answers[("GET", f"/rooms/{ROOM}/messages")] = {"chunk": [root], "start": "s"}
        body = (await alice.get(path)).json()
    assert counts == [2, 2, 2]
    asked = [r for r in homeserver.requests if "/relations/" in str(r.url)]
    assert len(asked) == 2
    assert body["chunk"][0]["unsigned"]["m.relations"]["m.thread"]["count"] == 3


async def test_msc4354_sticky_events_are_filtered_in_sync_and_sliding_sync(
    homeserver: FakeHomeserver,
) -> None:
    """A stand-in: Synapse sends them only with experimental_features.msc4354_enabled."""
    sticky = {"events": [message("$b7", BOB), message("$c7", CHARLIE)]}
    homeserver.answers[("GET", "/sync")] = {
        "next_batch": "s",
        "rooms": {"join": {ROOM: {"timeline": {"events": []}, "msc4354_sticky": sticky}}},
    }
    homeserver.answers[("POST", "/sync")] = {
        "pos": "1",
        "rooms": {},
        "extensions": {"org.matrix.msc4354.sticky_events": {"rooms": {ROOM: sticky}}},
    }
    async with client_for(build_app(homeserver), "alice-token") as alice:
        classic = await alice.get(SYNC)
        sliding = await alice.post("/_matrix/client/v4/sync", json={"lists": {}})
    for response in (classic, sliding):
        assert response.status_code == 200
        assert "$b7" not in response.text and "$c7" in response.text
