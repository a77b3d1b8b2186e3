from __future__ import annotations

import pytest

from ignore_proxy.rewrite import (
    InvalidBody,
    UpstreamSenderIgnored,
    add_msc4406_feature,
    ignored_users_from_sliding_sync,
    ignored_users_from_sync,
    mentions_any,
    normalise_sender_ignored,
)
from ignore_proxy.rewrite.scan import Mentions
from tests.rewrite.factories import SPAM, TROLL, dumps, loads

# --- mentions_any ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"sender":"@spam:evil.example"}',
        b'{"sender":"\\u0040spam:evil.example"}',
        b'{"sender":"@spam:evil\\u002Eexample"}',
        b'{"sender":"@spam:evil\\u002eexample"}',
        b'{"x":{"@spam:evil.example":{}}}',
    ],
)
def test_mentions_any_finds_ids_in_any_spelling(body: bytes) -> None:
    assert mentions_any(body, [SPAM])


def test_mentions_any_negative_cases() -> None:
    assert not mentions_any(b'{"sender":"@alice:example.org"}', [SPAM, TROLL])
    # escapes of characters that occur in no ignored ID cannot hide one
    assert not mentions_any(b'{"body":"caf\\u00e9 \\ud83d\\ude00 \\n \\" \\\\"}', [SPAM])
    assert not mentions_any(b"{}", [])
    assert not mentions_any(b'{"sender":"@spam:evil.exampl"}', [SPAM])
    # strings are decoded whole: an escape of an ID character is no mention by itself
    assert not mentions_any(b'{"sender":"\\u0040SPAM"}', [SPAM])
    assert not mentions_any(b'{"sender":"@spam:evil.exampl\\u0065x"}', [SPAM])
    # only whole strings count: an ID inside a text is no event, receipt or key of it
    assert not mentions_any(b'{"body":"@spam:evil.example is rude"}', [SPAM])
    assert not mentions_any(b'{"body":"hi @spam:evil.example"}', [SPAM])
    assert not mentions_any(b'{"body":"x\\"@spam:evil.example\\""}', [SPAM])


def test_mentions_any_slash_quote_backslash_and_non_bmp() -> None:
    slash = "@a/b:x"
    assert mentions_any(b'{"s":"@a\\/b:x"}', [slash])
    assert mentions_any(b'{"s":"@a/b:x"}', [slash])
    assert not mentions_any(b'{"s":"\\/"}', [SPAM])  # no "/" in the ID
    quote = '@a"b:x'
    assert mentions_any(b'{"s":"@a\\"b:x"}', [quote])
    assert mentions_any(b'{"s":"@a\\u0022b:x"}', [quote])
    backslash = "@a\\b:x"
    assert mentions_any(b'{"s":"@a\\\\b:x"}', [backslash])
    assert mentions_any(b'{"s":"@a\\u005cb:x"}', [backslash])
    emoji = "@\U0001f600:x"
    assert mentions_any('{"s":"@\U0001f600:x"}'.encode(), [emoji])
    assert mentions_any(b'{"s":"@\\ud83d\\ude00:x"}', [emoji])
    control = "@a\nb:x"
    assert mentions_any(b'{"s":"@a\\nb:x"}', [control])
    assert mentions_any(b'{"s":"@a\\u000Ab:x"}', [control])
    lone = "@\ud800:x"  # a lone surrogate: no UTF-8 spelling, only the escaped one
    assert mentions_any(b'{"s":"@\\ud800:x"}', [lone])
    assert not mentions_any(b'{"s":"@\\ud801:x"}', [lone])
    assert mentions_any(b'{"s":"\\u0040\\ud800:x"}', [lone])


def test_mentions_any_where_the_bytes_cannot_decide() -> None:
    # the body ends inside a string that may still be an ID: not JSON, left to the rewriter
    assert mentions_any(b'{"s":"@spam:evil\\u0065', [SPAM])
    # no JSON escape: the strings' lookup sends it to the rewriter; a short list's search
    # sees no escape of an ID's character, so no spelling of one (as the old search did)
    assert Mentions([SPAM]).found_by_strings(b'{"s":"@spam:evil\\x"}').always
    assert not mentions_any(b'{"s":"@spam:evil\\x"}', [SPAM])
    # longer than any spelling of an ID: none of them, however it ends
    assert not mentions_any(b'{"s":"@spam:evil\\u0065' + b"x" * 300, [SPAM])


# --- account data -----------------------------------------------------------------------


def test_ignored_users_from_sync() -> None:
    def body(content: object) -> bytes:
        return dumps(
            {"account_data": {"events": [{"type": "m.ignored_user_list", "content": content}]}}
        )

    assert ignored_users_from_sync(body({"ignored_users": {SPAM: {}, TROLL: {}}})) == frozenset(
        {SPAM, TROLL}
    )
    assert ignored_users_from_sync(body({"ignored_users": {}})) == frozenset()
    assert ignored_users_from_sync(body({"ignored_users": [SPAM]})) == frozenset()
    assert ignored_users_from_sync(body({})) == frozenset()
    assert ignored_users_from_sync(body("x")) == frozenset()
    assert ignored_users_from_sync(
        body({"ignored_users": {"nope": {}, "": {}, SPAM: 1}})
    ) == frozenset({SPAM})
    assert ignored_users_from_sync(dumps({"account_data": {"events": []}})) is None
    assert ignored_users_from_sync(dumps({"next_batch": "x"})) is None
    assert ignored_users_from_sync(dumps({"account_data": {"events": "x"}})) is None
    assert ignored_users_from_sync(b"garbage") is None
    # escaped keys are decoded
    raw = (
        b'{"account_data":{"events":[{"type":"m.ignored_user_list",'
        b'"content":{"ignored_users":{"\\u0040spam:evil.example":{}}}}]}}'
    )
    assert ignored_users_from_sync(raw) == frozenset({SPAM})


def test_ignored_users_from_sliding_sync() -> None:
    event = {"type": "m.ignored_user_list", "content": {"ignored_users": {SPAM: {}}}}
    body = dumps({"extensions": {"account_data": {"global": [event], "rooms": {}}}})
    assert ignored_users_from_sliding_sync(body) == frozenset({SPAM})
    assert (
        ignored_users_from_sliding_sync(dumps({"extensions": {"account_data": {"global": []}}}))
        is None
    )
    assert ignored_users_from_sliding_sync(dumps({"extensions": {}})) is None
    assert ignored_users_from_sliding_sync(dumps({"pos": "1"})) is None


# --- upstream SenderIgnored ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (
            404,
            {"errcode": "M_SENDER_IGNORED", "error": "x", "sender": SPAM},
            UpstreamSenderIgnored(SPAM),
        ),
        (
            400,
            {"errcode": "UK.TIMEDOUT.MSC4406.SENDER_IGNORED", "sender": SPAM},
            UpstreamSenderIgnored(SPAM),
        ),
        (400, {"errcode": "uk.timedout.msc4406.sender_ignored"}, UpstreamSenderIgnored(None)),
        (403, {"errcode": "m_sender_ignored", "sender": 5}, UpstreamSenderIgnored(None)),
        (404, {"errcode": "M_NOT_FOUND", "error": "x"}, None),
        (403, {"errcode": "M_FORBIDDEN"}, None),
        (200, {"errcode": "M_SENDER_IGNORED"}, None),
        (404, ["M_SENDER_IGNORED"], None),
        (404, {"errcode": 1}, None),
    ],
)
def test_normalise_sender_ignored(status: int, body: object, expected: object) -> None:
    assert normalise_sender_ignored(status, dumps(body)) == expected


def test_normalise_sender_ignored_garbage() -> None:
    assert normalise_sender_ignored(502, b"<html>bad gateway</html>") is None
    assert normalise_sender_ignored(404, b"") is None


# --- /versions -----------------------------------------------------------------------------


def test_add_msc4406_feature() -> None:
    body = b'{"versions":["v1.11","v1.12"],"unstable_features":{"org.matrix.msc3575":true}}'
    parsed = loads(add_msc4406_feature(body))
    assert parsed["unstable_features"] == {"org.matrix.msc3575": True, "uk.timedout.msc4406": True}
    assert parsed["versions"] == ["v1.11", "v1.12"]
    assert loads(add_msc4406_feature(b'{"versions":[]}'))["unstable_features"] == {
        "uk.timedout.msc4406": True
    }
    flagged = b'{"versions":[],"unstable_features":{"uk.timedout.msc4406":true}}'
    assert add_msc4406_feature(flagged) is flagged
    off = b'{"unstable_features":{"uk.timedout.msc4406":false}}'
    assert loads(add_msc4406_feature(off))["unstable_features"]["uk.timedout.msc4406"] is True
    weird = b'{"unstable_features":[]}'
    assert add_msc4406_feature(weird) == weird
    with pytest.raises(InvalidBody):
        add_msc4406_feature(b"[]")
    with pytest.raises(InvalidBody):
        add_msc4406_feature(b"nope")


def test_found_finds_each_id_whatever_the_order() -> None:
    from ignore_proxy.rewrite.scan import mentions_for

    both = frozenset({SPAM, TROLL})
    mentions = mentions_for(both)
    spam, troll = dumps(SPAM), dumps(TROLL)
    assert mentions.found(b"[" + spam + b"," + spam + b"," + troll + b"]").ids == both
    assert mentions.found(b"[" + troll + b"," + spam + b"]").ids == both
    assert mentions.found(b"[" + spam + b"," + spam + b"]").ids == frozenset({SPAM})
    assert mentions.found(b"[]").ids == frozenset()
