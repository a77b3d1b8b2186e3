from __future__ import annotations

import json
from typing import Any

import pytest

from ignore_proxy.rewrite import IgnoreContext, InvalidBody, rewrite_sync
from tests.rewrite.factories import (
    ALICE,
    BOB,
    CTX,
    CTX_NO_EPHEMERAL,
    ME,
    SPAM,
    TROLL,
    dumps,
    event,
    ids,
    loads,
    member,
    receipt,
    state,
    stripped_invite,
    sync_body,
    thread_unsigned,
    typing,
)

R1 = "!one:example.org"
R2 = "!two:example.org"


def _timeline(body: bytes, room: str, section: str = "join") -> list[dict[str, object]]:
    events: list[dict[str, object]] = loads(body)["rooms"][section][room]["timeline"]["events"]
    return events


def test_drops_ignored_non_state_events_and_keeps_the_rest() -> None:
    keep1, drop1, keep2, drop2 = event(ALICE), event(SPAM), event(BOB), event(TROLL)
    body = dumps({"next_batch": "s1", **_rooms({R1: [keep1, drop1, keep2, drop2]})})
    out = rewrite_sync(body, CTX)
    assert out is not None
    assert out.removed == 2
    assert ids(_timeline(out.body, R1)) == [keep1["event_id"], keep2["event_id"]]
    parsed = loads(out.body)
    assert parsed["next_batch"] == "s1"
    timeline = parsed["rooms"]["join"][R1]["timeline"]
    assert timeline["limited"] is True
    assert timeline["prev_batch"] == f"t_{R1}"


def _rooms(join: dict[str, list[dict[str, object]]]) -> dict[str, object]:

    body = sync_body(join)
    return {"rooms": body["rooms"]}


def test_state_events_of_ignored_users_are_kept_including_empty_state_key() -> None:
    name = state(SPAM)
    mem = member(SPAM, SPAM, "join")
    null_key = event(SPAM, type="m.custom", state_key=None)
    msg = event(SPAM)
    body = dumps(_rooms({R1: [name, mem, null_key, msg]}))
    out = rewrite_sync(body, CTX)
    assert out is not None
    assert ids(_timeline(out.body, R1)) == ids([name, mem, null_key])


def test_leave_rooms_are_filtered_too() -> None:

    drop, keep = event(SPAM), event(ALICE)
    body = dumps(sync_body({}, leave={R1: [drop, keep]}))
    out = rewrite_sync(body, CTX)
    assert out is not None
    assert ids(_timeline(out.body, R1, "leave")) == [keep["event_id"]]


def test_state_state_after_account_data_to_device_untouched_presence_filtered() -> None:

    body_obj = sync_body({R1: [event(SPAM)]}, room_state={R1: [state(SPAM), state(ALICE)]})
    alice_presence = {"type": "m.presence", "sender": ALICE, "content": {}}
    spam_presence = {"type": "m.presence", "sender": SPAM, "content": {"status_msg": "hi"}}
    body_obj["presence"] = {"events": [spam_presence, alice_presence]}
    body_obj["rooms"]["join"][R1]["state_after"] = {"events": [state(SPAM, "m.room.topic")]}
    body_obj["to_device"] = {"events": [{"type": "m.room_key", "sender": SPAM, "content": {}}]}
    body_obj["account_data"] = {"events": [{"type": "m.direct", "content": {SPAM: ["!x:y"]}}]}
    body = dumps(body_obj)
    out = rewrite_sync(body, CTX)
    assert out is not None
    parsed = loads(out.body)
    room = parsed["rooms"]["join"][R1]
    original = body_obj["rooms"]["join"][R1]
    for key in ("state", "state_after", "account_data", "unread_notifications"):
        assert room[key] == original[key]
    for key in ("to_device", "account_data", "next_batch"):
        assert parsed[key] == body_obj[key]
    assert room["timeline"]["events"] == []
    # An ignored user's presence is theirs (`status_msg` is their words): dropped.
    assert parsed["presence"] == {"events": [alice_presence]}
    unfiltered = rewrite_sync(body, IgnoreContext(CTX.ignored, CTX.user_id, filter_ephemeral=False))
    assert unfiltered is not None and loads(unfiltered.body)["presence"] == body_obj["presence"]


def test_untouched_parts_are_byte_identical() -> None:
    keep = dumps(event(ALICE, content={"body": "\u00e9 ☃", "n": 1}))
    odd = (
        b'{"type":"m.room.message","sender":"@bob:x","event_id":"$odd",  '
        b'"content":{"big":123456789012345678901234567890123}}'
    )
    drop = dumps(event(SPAM))
    other_room = b'{ "timeline" : {"events": [ ] , "limited" : false} }'
    body = (
        b'{"rooms":{"join":{"!a:x":{"timeline":{"events":['
        + keep
        + b","
        + odd
        + b","
        + drop
        + b']}},"!b:x":'
        + other_room
        + b'}},"next_batch":"n"}'
    )
    out = rewrite_sync(body, CTX)
    assert out is not None
    assert keep in out.body and odd in out.body and other_room in out.body
    assert drop not in out.body


def test_nothing_to_remove_returns_none() -> None:
    body = dumps(_rooms({R1: [event(ALICE), state(SPAM)]}))
    assert rewrite_sync(body, CTX) is None
    body = dumps(_rooms({R1: [event(ALICE, content={"body": f"hi {SPAM}"})]}))
    assert rewrite_sync(body, CTX) is None


def test_invites_from_ignored_users_are_dropped() -> None:

    body = dumps(
        sync_body(
            {},
            invite={
                R1: stripped_invite(SPAM),
                R2: stripped_invite(ALICE),
                "!three:x": stripped_invite(SPAM, target="@other:x"),
            },
        )
    )
    out = rewrite_sync(body, CTX)
    assert out is not None
    assert out.removed == 1
    assert set(loads(out.body)["rooms"]["invite"]) == {R2, "!three:x"}


def test_invite_needs_membership_invite() -> None:

    events = stripped_invite(SPAM)
    events[1]["content"] = {"membership": "join"}
    body = dumps(sync_body({}, invite={R1: events}))
    assert rewrite_sync(body, CTX) is None


def test_typing_and_receipts_filtered() -> None:

    rcpt = receipt(
        {
            "$a": {"m.read": {SPAM: {"ts": 1}, ALICE: {"ts": 2}}},
            "$b": {"m.read": {TROLL: {"ts": 1}}, "m.read.private": {SPAM: {"ts": 3}}},
        }
    )
    only_spam = receipt({"$c": {"m.read": {SPAM: {"ts": 1}}}})
    body = dumps(
        sync_body(
            {R1: [event(ALICE)]}, ephemeral={R1: [typing(SPAM, ALICE, TROLL), rcpt, only_spam]}
        )
    )
    out = rewrite_sync(body, CTX)
    assert out is not None
    assert out.removed == 2 + 4
    eph = loads(out.body)["rooms"]["join"][R1]["ephemeral"]["events"]
    assert eph == [
        typing(ALICE),
        receipt({"$a": {"m.read": {ALICE: {"ts": 2}}}}),
    ]
    assert rewrite_sync(body, CTX_NO_EPHEMERAL) is None


def test_typing_event_kept_when_it_becomes_empty() -> None:

    body = dumps(sync_body({R1: []}, ephemeral={R1: [typing(SPAM)]}))
    out = rewrite_sync(body, CTX)
    assert out is not None
    assert loads(out.body)["rooms"]["join"][R1]["ephemeral"]["events"] == [typing()]


def test_bundled_thread_summary_with_ignored_latest_event_is_removed() -> None:
    annotations: dict[str, Any] = {"m.annotation": {"chunk": []}}
    root = event(ALICE, unsigned=thread_unsigned(SPAM, **annotations))
    root_only_thread = event(BOB, unsigned=thread_unsigned(TROLL))
    fine = event(BOB, unsigned=thread_unsigned(ALICE))
    body = dumps(_rooms({R1: [root, root_only_thread, fine]}))
    out = rewrite_sync(body, CTX)
    assert out is not None
    assert out.removed == 2
    got = _timeline(out.body, R1)
    assert got[0]["unsigned"] == {"age": 1234, "m.relations": {"m.annotation": {"chunk": []}}}
    assert got[1]["unsigned"] == {"age": 1234}
    assert got[2] == fine
    assert dumps(fine) in out.body
    # everything but unsigned is unchanged
    assert {k: v for k, v in got[0].items() if k != "unsigned"} == {
        k: v for k, v in root.items() if k != "unsigned"
    }


def test_sender_spelled_with_escapes_is_recognised() -> None:
    raw = b'{"type":"m.room.message","sender":"\\u0040spam:evil\\u002eexample","content":{}}'
    raw2 = b'{"type":"m.room.message","sender":"@spam\\u003aevil.example","content":{}}'
    body = b'{"rooms":{"join":{"!a:x":{"timeline":{"events":[' + raw + b"," + raw2 + b"]}}}}}"
    out = rewrite_sync(body, CTX)
    assert out is not None
    assert out.removed == 2


def test_lone_surrogates_do_not_break_filtering() -> None:
    keep = (
        b'{"type":"m.room.message","sender":"@alice:example.org","event_id":"$k",'
        b'"content":{"body":"\\ud800 x"}}'
    )
    drop = (
        b'{"type":"m.room.message","sender":"@spam:evil.example","event_id":"$d",'
        b'"content":{"body":"\\udfff"}}'
    )
    keep2 = b'{"type":"m.room.message","sender":"@bob:x","event_id":"$k2","content":{}}'
    body = (
        b'{"next_batch":"\\ud83d","rooms":{"join":{"!a:x":{"timeline":{"events":['
        + b",".join([keep, drop, keep2])
        + b']}},"!b:x":{"timeline":{"events":[{"sender":"@spam:evil.example","type":"x"}]}}}}}'
    )
    out = rewrite_sync(body, CTX)
    assert out is not None
    assert out.removed == 2
    assert keep in out.body and keep2 in out.body and drop not in out.body
    assert json.loads(out.body)["next_batch"] == "\ud83d"


def test_duplicate_sender_keys_last_one_wins() -> None:
    looks_ok = (
        b'{"type":"m.room.message","sender":"@alice:example.org","sender":"@spam:evil.example"}'
    )
    looks_bad = (
        b'{"type":"m.room.message","sender":"@spam:evil.example","sender":"@alice:example.org"}'
    )
    body = (
        b'{"rooms":{"join":{"!a:x":{"timeline":{"events":['
        + looks_ok
        + b","
        + looks_bad
        + b"]}}}}}"
    )
    out = rewrite_sync(body, CTX)
    assert out is not None
    assert looks_bad in out.body and looks_ok not in out.body


@pytest.mark.parametrize(
    "body",
    [
        b'{"rooms":{"join":{"!a:x":{"timeline":"@spam:evil.example"}}}}',
        b'{"rooms":{"join":{"!a:x":{"timeline":{"events":{"sender":"@spam:evil.example"}}}}}}',
        b'{"rooms":{"join":{"!a:x":{"timeline":{"events":["@spam:evil.example", 1, null]}}}}}',
        b'{"rooms":{"join":["@spam:evil.example"]}}',
        b'{"rooms":"@spam:evil.example"}',
        b'{"rooms":{"join":{"!a:x":{"timeline":{"events":[{"sender":5,"x":"@spam:evil.example"}]}}}}}',
        b'{"rooms":{"invite":{"!a:x":{"invite_state":{"events":[{"sender":"@spam:evil.example","type":"m.room.member","state_key":"@me:example.org","content":"invite"}]}}}}}',
    ],
)
def test_wrong_inner_types_are_left_untouched(body: bytes) -> None:
    assert rewrite_sync(body, CTX) is None


@pytest.mark.parametrize(
    "body", [b"", b"not json", b"[]", b'"@spam:evil.example"', b"{", b'{"a":1}x', b"null"]
)
def test_invalid_bodies_raise(body: bytes) -> None:
    with pytest.raises(InvalidBody):
        rewrite_sync(body, CTX)


def test_ignored_member_events_for_me_in_timeline_are_state_and_kept() -> None:
    ev = member(SPAM, ME, "invite")
    body = dumps(_rooms({R1: [ev]}))
    assert rewrite_sync(body, CTX) is None
