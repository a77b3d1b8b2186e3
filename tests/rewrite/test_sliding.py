from __future__ import annotations

from typing import Any

from ignore_proxy.rewrite import rewrite_sliding_sync
from tests.rewrite.factories import (
    ALICE,
    BOB,
    CTX,
    CTX_NO_EPHEMERAL,
    SPAM,
    TROLL,
    dumps,
    event,
    ids,
    loads,
    receipt,
    state,
    stripped_invite,
    typing,
)


def _body(rooms: dict[str, Any], extensions: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "pos": "p1",
        "lists": {"all": {"count": len(rooms)}},
        "rooms": rooms,
        "extensions": extensions or {},
    }


def test_timeline_and_num_live() -> None:
    events = [event(SPAM), event(ALICE), state(SPAM), event(SPAM), event(BOB), event(TROLL)]
    room = {
        "timeline": events,
        "num_live": 4,
        "required_state": [state(SPAM)],
        "limited": True,
        "prev_batch": "pb",
        "bump_stamp": 7,
    }
    out = rewrite_sliding_sync(dumps(_body({"!r:x": room})), CTX)
    assert out is not None and out.removed == 3
    got = loads(out.body)["rooms"]["!r:x"]
    assert ids(got["timeline"]) == ids([events[1], events[2], events[4]])
    assert got["num_live"] == 2
    for key in ("required_state", "limited", "prev_batch", "bump_stamp"):
        assert got[key] == room[key]


def test_num_live_untouched_when_no_live_event_removed() -> None:
    events = [event(SPAM), event(ALICE)]
    out = rewrite_sliding_sync(dumps(_body({"!r:x": {"timeline": events, "num_live": 1}})), CTX)
    assert out is not None
    assert loads(out.body)["rooms"]["!r:x"]["num_live"] == 1


def test_invites() -> None:
    rooms = {
        "!a:x": {"invite_state": stripped_invite(SPAM)},
        "!b:x": {"stripped_state": stripped_invite(TROLL)},
        "!c:x": {"invite_state": stripped_invite(ALICE)},
    }
    out = rewrite_sliding_sync(dumps(_body(rooms)), CTX)
    assert out is not None and out.removed == 2
    parsed = loads(out.body)
    assert list(parsed["rooms"]) == ["!c:x"]
    assert parsed["lists"] == {"all": {"count": 3}}


def test_extensions() -> None:
    account_data = {
        "global": [{"type": "m.ignored_user_list", "content": {"ignored_users": {SPAM: {}}}}]
    }
    ext = {
        "typing": {"rooms": {"!a:x": typing(SPAM, BOB)}},
        "receipts": {
            "rooms": {
                "!a:x": receipt({"$e": {"m.read": {SPAM: {"ts": 1}, BOB: {"ts": 2}}}}),
                "!b:x": receipt({"$e": {"m.read": {TROLL: {"ts": 1}}}}),
            }
        },
        "account_data": account_data,
    }
    out = rewrite_sliding_sync(dumps(_body({}, ext)), CTX)
    assert out is not None and out.removed == 3
    got = loads(out.body)["extensions"]
    assert got["typing"] == {"rooms": {"!a:x": typing(BOB)}}
    assert got["receipts"] == {"rooms": {"!a:x": receipt({"$e": {"m.read": {BOB: {"ts": 2}}}})}}
    assert got["account_data"] == account_data
    assert rewrite_sliding_sync(dumps(_body({}, ext)), CTX_NO_EPHEMERAL) is None
