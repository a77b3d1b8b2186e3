"""Synapse (Twisted) reads a POST body sent as `application/x-www-form-urlencoded` into
`request.args`, the very dict it takes `access_token` and `user_id` from
(`twisted.web.http.Request.requestReceived`, `Site._parsePOSTFormSubmission` is on;
Synapse only cuts `multipart/form-data`). A JSON body can be form-urlencoded at the same
time: `{"pad": "&access_token=T&"}` is, to Twisted, one parameter `access_token=T`
between two items without `=` that it drops. `dict.update` even replaces a query
parameter of the same name. The proxy reads credentials from the header and the query
only, so it filters with the wrong list, or with none."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import Stack, Target, World
from tests.e2e.harness.matrix import CS, unique
from tests.e2e.harness.raw import raw_request
from tests.e2e.harness.synapse import register_user

pytestmark = pytest.mark.e2e

FORM = [(b"content-type", b"application/x-www-form-urlencoded")]


@pytest.fixture(params=["no-ignore"])
def target(request: pytest.FixtureRequest, stack: Stack) -> Target:
    return Target(request.param, "proxy", stack.url(request.param, "proxy"),
                  stack.synapse(request.param))  # fmt: skip


def _search_body(token: str) -> bytes:
    return json.dumps(
        {
            "search_categories": {"room_events": {"search_term": "formbody"}},
            "pad": f"&access_token={token}&",
        }
    ).encode()


async def test_token_only_in_a_form_body(world: World) -> None:
    """No header, no query token: the proxy sees nobody and relays; Synapse serves
    alice's search with bob's message in it."""
    w = world
    await w.bob.send_text(w.room_id, "bob formbody words")
    await w.charlie.send_text(w.room_id, "charlie formbody words")
    resp = await raw_request(w.target.url, "POST", f"{CS}/search", FORM,
                             _search_body(w.alice.access_token))  # fmt: skip
    assert "bob formbody words" not in resp.text, resp.text
    assert resp.status_code == 400 and resp.json()["errcode"] == "M_NOT_JSON", resp.text


async def test_form_body_token_overrides_the_query_token(world: World) -> None:
    """`?access_token=<dave>` (dave is in no room and ignores nobody: the proxy relays
    untouched); the body's `access_token=<alice>` replaces it in Twisted's args, so
    Synapse answers as alice: bob's message can only come from her search."""
    w = world
    dave = await register_user(w.http, w.target.synapse, unique("dave"))
    await w.bob.send_text(w.room_id, "bob formbody override")
    resp = await raw_request(
        w.target.url,
        "POST",
        f"{CS}/search?access_token={dave.access_token}",
        FORM,
        _search_body(w.alice.access_token).replace(b"formbody", b"formbody override"),
    )
    # the answer would be alice's (Synapse acts as her) judged with dave's list: refused
    assert "bob formbody override" not in resp.text, resp.text
    assert resp.status_code == 400 and resp.json()["errcode"] == "M_NOT_JSON", resp.text
