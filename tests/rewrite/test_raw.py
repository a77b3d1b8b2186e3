"""The JSON splitting layer: fallbacks and byte identity of untouched siblings."""

from __future__ import annotations

import json

from ignore_proxy.rewrite import rewrite_messages, rewrite_sync
from ignore_proxy.rewrite.sync import _split_top
from tests.rewrite.factories import CTX

SPAM_EV = b'{"type":"m.room.message","sender":"@spam:evil.example","content":{}}'
OK_EV = b'{"type":"m.room.message","sender":"@alice:example.org","content":{}}'


# Room texts that rendering their decoded tree does not give back byte for byte.
_NOT_MINIMAL = [
    b'{"timeline":{"events":[]} }',
    b'{"timeline":{"events":[1, 2]}}',
    b'{"t":{"d":1,"d":2}}',
    b'{"t":{},"t":{}}',
    b'{"\\u0074":{}}',
    b'{"t":{"\\/":1}}',
    b'{"t":{"d":"\\u0040"}}',
    b'{"t":{"d":1E2}}',
    b'{"t":{"d":-1.5}}',
    b'{"t":{"d":-0}}',
    b'{"t":{"d":"\\ud800"}}',
    b'{"t":1}',
    b'{"t":[]}',
]


def test_a_room_the_fast_path_cannot_render_back_goes_out_byte_identical() -> None:
    """One room needs an edit; the other, spelled as rendering would not write it, must
    come out as it came in (``render_edited`` refuses, the generic path keeps its bytes)."""
    edited = b'{"timeline":{"events":[' + OK_EV + b"," + SPAM_EV + b"]}}"
    for text in _NOT_MINIMAL:
        body = b'{"rooms":{"join":{"!a:x":' + edited + b',"!b:x":' + text + b'}},"next_batch":"x"}'
        out = rewrite_sync(body, CTX)
        assert out is not None and out.removed == 1, text
        assert b'"!b:x":' + text in out.body, text
        assert SPAM_EV not in out.body


def test_sync_deep_split_matches_level_by_level() -> None:
    """A compact body (split down to its events at once) and the same body with a space in
    ``rooms`` (split level by level) give the same answer."""
    events = b"[" + OK_EV + b"," + SPAM_EV + b"]"
    thread = (
        b'{"type":"m.room.member","state_key":"","sender":"@alice:example.org","content":{},'
        b'"unsigned":{"m.relations":{"m.thread":{"latest_event":' + SPAM_EV + b',"count":1}}}}'
    )
    room = (
        b'{"timeline":{"events":' + events + b',"limited":false},"state":{"events":['
        + thread + b']},"ephemeral":{"events":[]},"summary":{}}'
    )  # fmt: skip
    invite = (
        b'{"invite_state":{"events":[{"type":"m.room.member","state_key":"@me:example.org",'
        b'"sender":"@spam:evil.example","content":{"membership":"invite"}}]}}'
    )
    rooms = (
        b'{"join":{"!a:x":' + room + b',"!b:x":{}},"leave":{"!c:x":' + room + b"},"
        b'"invite":{"!d:x":' + invite + b',"!e:x":{}}}'
    )
    compact = rewrite_sync(b'{"rooms":' + rooms + b"}", CTX)
    spaced = rewrite_sync(b'{"rooms":' + rooms[:-1] + b" }}", CTX)
    assert compact is not None and spaced is not None
    assert compact.body == spaced.body.replace(b" }", b"}")
    assert compact.removed == spaced.removed == 5
    assert compact.stale_threads == spaced.stale_threads
    assert compact.hidden_invites == spaced.hidden_invites == ("!d:x",)


def _sync(rooms: bytes) -> bytes:
    return b'{"rooms":' + rooms + b',"next_batch":"x"}'


def test_non_compact_rooms_keep_untouched_siblings_byte_identical() -> None:
    leave = b'{ "!l:x" : { "timeline" : { "events" : [ ] } } }'
    other_room = b'{"timeline":{"events":[' + OK_EV + b']} , "state" : {"events": []}}'
    join = (
        b'{"!a:x":{"timeline":{"events":['
        + SPAM_EV
        + b","
        + OK_EV
        + b']}},"!b:x":'
        + other_room
        + b"}"
    )
    for rooms in [
        b'{"join":' + join + b',"leave":' + leave + b"}",
        b'{"join":' + join + b', "leave":' + leave + b"}",
        b'{"leave":' + leave + b',"\\u006aoin":' + join + b"}",
    ]:
        out = rewrite_sync(_sync(rooms), CTX)
        assert out is not None and out.removed == 1
        assert leave in out.body and other_room in out.body and OK_EV in out.body
        assert SPAM_EV not in out.body


def test_room_sections_non_compact() -> None:
    state = b'{ "events" : [ ] }'
    room = b'{"timeline":{"events":[' + SPAM_EV + b']},"state":' + state + b"}"
    out = rewrite_sync(_sync(b'{"join":{"!a:x":' + room + b"}}"), CTX)
    assert out is not None
    assert state in out.body
    assert json.loads(out.body)["rooms"]["join"]["!a:x"]["timeline"]["events"] == []


def test_non_compact_event_arrays() -> None:
    pad = b" " * 300
    body = b'{"chunk":[' + pad + OK_EV + b",\n" + pad + SPAM_EV + pad + b"," + OK_EV + b" ]}"
    out = rewrite_messages(body, CTX)
    assert out is not None and out.removed == 1
    assert json.loads(out.body)["chunk"] == [json.loads(OK_EV)] * 2


def test_keys_with_lone_surrogates_can_be_written() -> None:
    rooms = b'{"join":{"!\\ud800:x":{"timeline":{"events":[' + SPAM_EV + b"]}}}}"
    out = rewrite_sync(_sync(rooms), CTX)
    assert out is not None
    assert json.loads(out.body)["rooms"]["join"] == {"!\ud800:x": {"timeline": {"events": []}}}


def test_sync_top_level_spliced_only_when_compact_and_known() -> None:
    """The top level is kept as it was only if it is compact with known members;
    otherwise it is re-encoded. Either way: same filtering."""
    room = b'{"timeline":{"events":[' + OK_EV + b"," + SPAM_EV + b"]}}"
    rooms = b'{"join":{"!a:x":' + room + b"}}"
    filtered = b'{"join":{"!a:x":{"timeline":{"events":[' + OK_EV + b"]}}}}"
    cases = {
        b'{"next_batch":"s1","rooms":' + rooms + b',"presence":{"events":[]}}': None,
        b'{"rooms":' + rooms + b',"org.matrix.msc2732.device_unused_fallback_key_types":[]}': None,
        b'{"next_batch":"s1", "rooms":' + rooms + b"}": b'{"next_batch":"s1","rooms":',
        b'{"unknown":1,"rooms":' + rooms + b"}": b'{"unknown":1,"rooms":',
        b'{"rooms":{"join":{}},"rooms":' + rooms + b"}": b'{"rooms":',
        b'{"r\\u006foms":' + rooms + b"}": b'{"rooms":',
        b'{"rooms":' + rooms + b',"next_batch":"s1","next_batch":"s2"}': b'{"rooms":',
    }
    for body, prefix in cases.items():
        assert prefix is not None or _split_top(body) is not None, body
        out = rewrite_sync(body, CTX)
        assert out is not None, body
        assert out.removed == 1
        assert SPAM_EV not in out.body
        if prefix is None:
            assert out.body == body.replace(rooms, filtered)
        else:
            assert out.body.startswith(prefix + filtered), out.body
    # a copy of rooms elsewhere in the body is left alone, the real one is filtered
    decoy = b'{"account_data":{"events":[{"content":{"rooms":' + rooms + b'}}]},"rooms":'
    out = rewrite_sync(decoy + rooms + b"}", CTX)
    assert out is not None and out.body == decoy + filtered + b"}"


def test_sync_rooms_that_do_not_render_back_are_split_level_by_level() -> None:
    """Split down to its events in one decode, ``rooms`` is re-rendered whole; that is
    kept only if the text was what rendering writes (checked by length), so what the
    filter did not touch keeps its bytes: spaces, duplicate keys, escapes, numbers."""
    spam_room = b'"!a:x":{"timeline":{"events":[' + OK_EV + b"," + SPAM_EV + b"]}}"
    for untouched in [
        b'"!b:x":{"timeline":{"events":[] }}',
        b'"!b:x":{"summary":{},"summary":{"m.joined_member_count":2}}',
        b'"!b:x":{"t\\u0069meline":{"events":[]}}',
        b'"!b:x":{"timeline":{"prev_batch":"p\\/1"}}',
        b'"!b:x":{"timeline":{"limited":1.50}}',
        b'"!b:x":{"x":{"y":1E2}}',
        b'"!b:x":{"unread_notifications":{"notification_count":-0}}',
    ]:
        body = b'{"next_batch":"s","rooms":{"join":{' + untouched + b"," + spam_room + b"}}}"
        out = rewrite_sync(body, CTX)
        assert out is not None and out.removed == 1, body
        assert untouched in out.body, out.body
        assert SPAM_EV not in out.body
    # the same room written compactly: rendered as it was, through the one decode
    body = b'{"next_batch":"s","rooms":{"join":{"!b:x":{},' + spam_room + b"}}}"
    out = rewrite_sync(body, CTX)
    assert out is not None and out.body == body.replace(b"," + SPAM_EV, b"")


def test_messages_that_do_not_render_back_are_split_level_by_level() -> None:
    """As for ``/sync``: the one decode's answer is kept only if the body was what it
    renders as; otherwise the members the filter did not touch keep their bytes."""
    chunk = b'"chunk":[' + OK_EV + b"," + SPAM_EV + b"]"
    for untouched in [
        b'"start":"\\u0073"',
        b'"unsigned":{"a":1, "b":2}',
        b'"state":[ ]',
        b'"count":1.50',
    ]:
        body = b"{" + chunk + b"," + untouched + b"}"
        out = rewrite_messages(body, CTX)
        assert out is not None and out.removed == 1, body
        assert untouched in out.body, out.body
    body = b"{" + chunk + b',"start":"s"}'
    out = rewrite_messages(body, CTX)
    assert out is not None and out.body == body.replace(b"," + SPAM_EV, b"")
