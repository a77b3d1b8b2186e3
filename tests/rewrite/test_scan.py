"""The ID search (``ignore_proxy.rewrite.scan``) on generated bodies and lists: against
the decoded body (which strings are IDs: exactly those it finds) and against the byte
search it replaced (``tests/rewrite/substring_scan.py``: it never finds an ID that one
ruled out). Bodies are written with any spelling a JSON writer may choose (escapes of
any character, either hex case, surrogate pairs, whitespace)."""

from __future__ import annotations

import json
import random
from typing import Any

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from ignore_proxy.rewrite.guard import IgnoredEventLeft, guard_body, guard_body_exact
from ignore_proxy.rewrite.raw import split_array, split_object
from ignore_proxy.rewrite.scan import Mentions, mentions_any
from ignore_proxy.rewrite.sender_scan import holds_no_ignored_event
from ignore_proxy.rewrite.types import IgnoreContext
from tests.rewrite import substring_scan
from tests.rewrite.factories import ALICE, ME, SPAM, TROLL
from tests.rewrite.test_properties import SETTINGS
from tests.rewrite.test_sender_scan import Obj, Writer

# IDs whose spellings need escapes, or that begin or end another one
_TRICKY = [
    SPAM, TROLL, SPAM + ".org", "@spam:evil.exampl", '@a"b:x', "@a\\b:x", "@a/b:x",
    "@caf\u00e9:x", "@\U0001f600:x", "@a\nb:x", "@\ud800:x", "@a\u2028:x", "@@:x", "@a:b:c",
]  # fmt: skip
_local = st.text(st.characters(blacklist_characters=":"), min_size=1, max_size=5)
_generated = st.builds(
    lambda local, server: f"@{local}:{server}", _local, st.text(min_size=1, max_size=5)
)
_ids = st.frozensets(st.sampled_from(_TRICKY) | _generated, min_size=1, max_size=6)

_DISTRACTORS = frozenset(f"@u{i}x{random.Random(i).getrandbits(40):x}:s{i % 97}.example"
                         for i in range(3000))  # fmt: skip
"""A long list's other entries: the answer for the IDs a body holds does not change."""


@st.composite
def _strings(draw: st.DrawFn, ids: frozenset[str]) -> str:
    """An ID, something close to one (inside a text, cut, extended), or any text."""
    uid = draw(st.sampled_from(sorted(ids)))
    near = [uid, uid, uid + "x", uid[:-1], "x" + uid, "hi " + uid, uid + " is rude", "@"]
    return draw(st.sampled_from(near) | st.sampled_from(_TRICKY) | st.text(max_size=6))


def _trees(ids: frozenset[str]) -> st.SearchStrategy[Any]:
    strings = _strings(ids)
    leaves = st.none() | st.integers(-5, 5) | strings

    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        objects = st.lists(st.tuples(strings | st.just("sender"), children), max_size=4)
        return st.lists(children, max_size=4) | objects.map(Obj)

    return st.recursive(leaves, extend, max_leaves=25)


@st.composite
def _cases(draw: st.DrawFn) -> tuple[frozenset[str], bytes]:
    ids = draw(_ids)
    tree = draw(_trees(ids))
    writer = Writer(draw(st.randoms(use_true_random=False)), draw(st.booleans()))
    text = writer.ws() + writer.write(tree) + writer.ws()
    return ids, text.encode("utf-8")


class _Strings(list[tuple[str, Any]]):
    pass


def _strings_in(data: bytes | msgspec.Raw) -> set[str]:
    """Every string of a JSON text, keys included (duplicate keys too)."""
    found: set[str] = set()
    stack = [json.loads(bytes(memoryview(data)), object_pairs_hook=_Strings)]
    while stack:
        node = stack.pop()
        if isinstance(node, _Strings):
            found.update(key for key, _ in node)
            stack.extend(value for _, value in node)
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str):
            found.add(node)
    return found


def _parts(data: bytes) -> list[msgspec.Raw]:
    """Every value of a JSON text as the raw bytes a rewriter splits it into."""
    out: list[msgspec.Raw] = []
    stack = [msgspec.Raw(data)]
    while stack:
        raw = stack.pop()
        out.append(raw)
        members = split_object(raw)
        if members is not None:
            stack.extend(members.values())
            continue
        items = split_array(raw)
        if items is not None:
            stack.extend(items)
    return out


@SETTINGS
@given(case=_cases())
def test_found_is_exactly_the_ids_the_body_holds_as_strings(
    case: tuple[frozenset[str], bytes],
) -> None:
    ids, data = case
    truth = _strings_in(data) & ids
    mentions = Mentions(ids)
    found = mentions.found(data)  # a short list: one regex, unless escapes may spell an ID
    assert not found.always  # JSON: always decided
    assert found.ids == truth
    assert mentions.found_by_strings(data).ids == truth  # as for a long list
    assert mentions_any(data, ids) == bool(truth)
    # never an ID the old search ruled out (asked one ID at a time: its `present` misses
    # an ID that an ID listed before it begins, which its `in_bytes` still finds)
    old = {uid for uid in ids if substring_scan.Mentions([uid]).in_bytes(data)}
    assert found.ids <= old
    assert substring_scan.Mentions(ids).in_bytes(data) or not found.ids
    # a long list holding the same IDs: the same answer
    assert Mentions(ids | _DISTRACTORS).found(data).ids == truth


@SETTINGS
@given(case=_cases())
def test_every_part_holding_a_found_id_is_relevant(case: tuple[frozenset[str], bytes]) -> None:
    ids, data = case
    found = Mentions(ids).found(data)
    parts = _parts(data)
    for part in parts:
        holds = bool(_strings_in(part) & ids)
        if holds:
            assert found.relevant(part)
            try:
                again = msgspec.json.encode(msgspec.json.decode(part))
            except (msgspec.DecodeError, msgspec.EncodeError, UnicodeEncodeError):
                continue  # msgspec cannot write it (a lone surrogate): no rewriter does
            if _strings_in(again) & ids:  # (not if a duplicate key held it)
                assert found.relevant(again)  # as a rewriter writes it anew
    expected = [index for index, part in enumerate(parts) if found.relevant(part)]
    assert found.relevant_indexes(parts) == expected
    # many IDs found: the parts are looked up string by string (not one regex)
    many = Mentions(ids | _DISTRACTORS)
    crowd = b"[" + b",".join(msgspec.json.encode(uid) for uid in sorted(_DISTRACTORS)[:40])
    wide = many.found(crowd + b"," + data + b"]")
    for part in parts:
        if _strings_in(part) & ids:
            assert wide.relevant(part)
    assert wide.relevant_indexes(parts) == [i for i, p in enumerate(parts) if wide.relevant(p)]


def _outcome(fn: Any, body: bytes, ctx: IgnoreContext) -> tuple[str, Any]:
    try:
        result = fn(body, ctx)
    except IgnoredEventLeft as left:
        return "left", left.path
    return "ok", None if result is None else (result.body, result.removed)


_SENDERS = [SPAM, TROLL, ALICE, '@a"b:x', "@caf\u00e9:x", "@\U0001f600:x", "@\ud800:x"]


@st.composite
def _events_body(draw: st.DrawFn) -> tuple[frozenset[str], bytes]:
    ignored = draw(st.frozensets(st.sampled_from(_SENDERS), min_size=1))
    event = st.builds(
        lambda sender, state: Obj([("event_id", "$e"), ("sender", sender), ("type", "t")]
                                  + ([("state_key", "")] if state else [])),
        st.sampled_from(_SENDERS), st.booleans(),
    )  # fmt: skip
    tree = Obj([("chunk", draw(st.lists(event, max_size=5)))])
    writer = Writer(draw(st.randoms(use_true_random=False)), draw(st.booleans()))
    return ignored, writer.write(tree).encode()


@SETTINGS
@given(case=_events_body())
def test_the_guard_fast_path_with_escaped_senders_and_a_long_list(
    case: tuple[frozenset[str], bytes],
) -> None:
    ignored, data = case
    ctx = IgnoreContext(ignored, ME)
    hidden = any(
        isinstance(e, dict) and e["sender"] in ignored and "state_key" not in e
        for e in json.loads(data)["chunk"]
    )
    for listed in (ignored, ignored | _DISTRACTORS):
        shown = holds_no_ignored_event(data, listed)
        if shown:
            assert not hidden
        if b"\\u00" not in data:  # no escape that could spell "sender": decided here
            assert shown == (not hidden)
    assert _outcome(guard_body, data, ctx) == _outcome(guard_body_exact, data, ctx)
