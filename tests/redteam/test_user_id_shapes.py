"""`ids.is_user_id` wants every character printable and not a space. Synapse takes a
remote sender's localpart as it comes (`UserID.from_string` checks only `@`, `:` and
length), and ruma with `compat-user-id` (Conduit, continuwuity) too; so a harasser on a
homeserver of their own can be `@b\u00adob:evil.example` (a soft hyphen, invisible) or
hold U+200B, U+00A0, ... in the localpart.

- `ignore_lists.validate_put_body` refuses the list naming them (400 M_INVALID_PARAM):
  the user cannot ignore them through the proxy at all;
- `parse_ignored_users` / `rewrite.ignored_users_from_content` drop them silently from a
  list set elsewhere (another client, before the proxy was deployed): their messages
  are delivered on a homeserver that does not filter."""

from __future__ import annotations

import pytest

from tests.fake_homeserver import (
    ALICE,
    CHARLIE,
    ROOM,
    FakeHomeserver,
    build_app,
    client_for,
    message,
)

SYNC = "/_matrix/client/v3/sync"
LIST = f"/_matrix/client/v3/user/{ALICE}/account_data/m.ignored_user_list"
SHAPES = ["@b\u00adob:evil.example", "@bob\u200b:evil.example", "@bo\u00a0b:evil.example"]


@pytest.mark.parametrize("harasser", SHAPES)
async def test_such_a_user_can_be_ignored(harasser: str) -> None:
    hs = FakeHomeserver()
    app = build_app(hs)
    async with client_for(app, "alice-token") as alice:
        put = await alice.put(LIST, json={"ignored_users": {harasser: {}}})
    assert put.status_code == 200, put.text


@pytest.mark.parametrize("harasser", SHAPES)
async def test_such_a_user_stays_ignored(harasser: str) -> None:
    hs = FakeHomeserver()
    hs.ignore(ALICE, harasser)  # written by a client that does not go through the proxy
    hs.answers[("GET", "/sync")] = {
        "next_batch": "s2",
        "rooms": {
            "join": {
                ROOM: {
                    "timeline": {
                        "events": [
                            message("$h1", harasser, "harassment"),
                            message("$c1", CHARLIE),
                        ]
                    }
                }
            }
        },
    }
    app = build_app(hs)
    async with client_for(app, "alice-token") as alice:
        resp = await alice.get(SYNC)
    assert resp.status_code == 200
    assert "harassment" not in resp.text, resp.text
