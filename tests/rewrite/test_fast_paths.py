"""The fast paths (a compact body split down to its events in one decode) against the
oracle and against the generic level-by-level paths, on the same generated bodies.

The bodies of test_properties hold a lone surrogate or an escaped string outside the
events, which sends them down the generic paths; these ones have neither.
"""

from __future__ import annotations

import json
from typing import Any
from unittest import mock

from hypothesis import given
from hypothesis import strategies as st

from ignore_proxy.rewrite import (
    IgnoreContext,
    Rewritten,
    rewrite_messages,
    rewrite_sync,
    rooms,
    sync,
)
from ignore_proxy.rewrite.raw import split_members
from ignore_proxy.rewrite.sync import _split_top
from tests.rewrite.factories import CTX, CTX_NO_EPHEMERAL, ME
from tests.rewrite.test_properties import (
    SENDERS,
    SETTINGS,
    Counter,
    Spec,
    _enc,
    check_list,
    render_list,
    specs,
)

# no lone surrogate: msgspec would refuse the whole body
compact_specs = specs.filter(lambda spec: spec.content not in (2, 3))
compact_lists = st.lists(compact_specs, max_size=6)
EPHEMERAL = [
    b"[]",
    b'[{"type":"m.typing","content":{"user_ids":["@spam:evil.example","@a:b"]}}]',
    b'[{"type":"m.typing","content":{"user_ids":["\\u0040troll:evil.example"]}}]',
    b'[{"type":"m.receipt","content":{"$e":{"m.read":{"@spam:evil.example":{"ts":1},"@a:b":{}}}}}]',
    b'[{"type":"m.receipt","content":{"$e":{"m.read":{"@troll:evil.example":{"ts":1}}}}}]',
]


def _invite(sender: str) -> bytes:
    return (
        b'{"invite_state":{"events":[{"type":"m.room.member","sender":'
        + _enc(sender)
        + b',"state_key":'
        + _enc(ME)
        + b',"content":{"membership":"invite"}}]}}'
    )


def _same(fast: Rewritten | None, slow: Rewritten | None) -> None:
    if fast is None or slow is None:
        assert fast is slow is None
        return
    assert json.loads(fast.body) == json.loads(slow.body)
    assert fast.removed == slow.removed
    assert fast.stale_threads == slow.stale_threads
    assert fast.hidden_invites == slow.hidden_invites


@SETTINGS
@given(
    join=st.lists(
        st.tuples(compact_lists, compact_lists, st.sampled_from(EPHEMERAL), compact_lists),
        max_size=3,
    ),
    leave=st.lists(compact_lists, max_size=2),
    inviters=st.lists(st.sampled_from(SENDERS), max_size=2),
    ephemeral=st.booleans(),
)
def test_sync_fast_path(
    join: list[tuple[list[Spec], list[Spec], bytes, list[Spec]]],
    leave: list[list[Spec]],
    inviters: list[str],
    ephemeral: bool,
) -> None:
    ctx = CTX if ephemeral else CTX_NO_EPHEMERAL
    c = Counter()
    timelines: list[tuple[str, str, list[tuple[Spec, bytes]]]] = []
    stickies: list[tuple[str, list[tuple[Spec, bytes]]]] = []

    def timeline(section: str, room_id: str, items: list[Spec]) -> bytes:
        raw, rendered = render_list(items, c)
        timelines.append((section, room_id, rendered))
        return b'{"events":' + raw + b',"limited":true,"prev_batch":"pb"}'

    def sticky(room_id: str, items: list[Spec]) -> bytes:
        raw, rendered = render_list(items, c)
        stickies.append((room_id, rendered))
        return b'{"events":' + raw + b"}"

    rooms: dict[str, list[bytes]] = {"join": [], "leave": [], "invite": []}
    for i, (items, state, eph, sticky_items) in enumerate(join):
        room_id = f"!j{i}:x"
        state_raw, _ = render_list([s for s in state if s.state_key is not None], c)
        rooms["join"].append(
            _enc(room_id)
            + b':{"timeline":'
            + timeline("join", room_id, items)
            + b',"state":{"events":'
            + state_raw
            + b'},"ephemeral":{"events":'
            + eph
            + b'},"unread_notifications":{"notification_count":2},"summary":{},"msc4354_sticky":'
            + sticky(room_id, sticky_items)
            + b"}"
        )
    for i, items in enumerate(leave):
        room_id = f"!l{i}:x"
        rooms["leave"].append(
            _enc(room_id) + b':{"timeline":' + timeline("leave", room_id, items) + b"}"
        )
    for i, sender in enumerate(inviters):
        rooms["invite"].append(_enc(f"!i{i}:x") + b":" + _invite(sender))
    sections = b",".join(b'"%s":{%s}' % (k.encode(), b",".join(v)) for k, v in rooms.items())
    body = b'{"next_batch":"nb","rooms":{' + sections + b'},"account_data":{"events":[]}}'
    assert _split_top(body) is not None
    with mock.patch.object(sync, "start", side_effect=AssertionError("generic path")):
        fast = rewrite_sync(body, ctx)  # the fast path's answer is kept
    # a space in "join" sends the same body down the generic path, room by room
    _same(fast, rewrite_sync(body.replace(b'"join":{', b'"join": {', 1), ctx))

    final = fast.body if fast is not None else body
    parsed: dict[str, Any] = json.loads(final)
    for section, room_id, rendered in timelines:
        check_list(final, parsed["rooms"][section][room_id]["timeline"]["events"], rendered)
    for room_id, rendered in stickies:
        check_list(final, parsed["rooms"]["join"][room_id]["msc4354_sticky"]["events"], rendered)
    hidden = {f"!i{i}:x" for i, sender in enumerate(inviters) if sender in ctx.ignored}
    assert set(parsed["rooms"]["invite"]) == {f"!i{i}:x" for i in range(len(inviters))} - hidden


@SETTINGS
@given(chunk=compact_lists, state=compact_lists)
def test_messages_fast_path(chunk: list[Spec], state: list[Spec]) -> None:
    c = Counter()
    chunk_raw, rendered = render_list(chunk, c)
    state_raw, _ = render_list([s for s in state if s.state_key is not None], c)
    body = b'{"chunk":' + chunk_raw + b',"start":"s","end":"e","state":' + state_raw + b"}"
    assert split_members(body) is not None
    ctx: IgnoreContext = CTX
    with mock.patch.object(rooms, "start", side_effect=AssertionError("generic path")):
        fast = rewrite_messages(body, ctx)  # the fast path's answer is kept
    _same(fast, rewrite_messages(body.replace(b'"start":"s"', b'"start":"\\u0073"'), ctx))
    final = fast.body if fast is not None else body
    check_list(final, json.loads(final)["chunk"], rendered)
