"""Red team: the ID search (``rewrite.scan``) and the guard's fast path
(``rewrite.sender_scan``) against bodies built to make them say "not mentioned" / "holds
no ignored event" while a client's JSON reader sees an ignored user's event, invite,
typing entry or receipt.

Each body goes through what the proxy runs (the UTF-8 check of ``Services.read_answer``,
then ``rewrite_guarded``: a route's rewriter, then the guard) and the answer is judged
by a naive reference over ``json.loads`` of it: no ignored sender's non-state event
outside event content (a redaction stub in ``redacted_because`` allowed), no ignored
user in ``m.typing``, no receipt keyed by one, no room the user was invited to by one,
no presence of one. A refusal (``InvalidBody``, ``IgnoredEventLeft``, ``SenderIgnored``)
is a correct answer.

Bodies are spelled with every JSON choice (escapes of any character, either hex case,
``\\/``, surrogate pairs, whitespace), with user IDs that are lenient (quotes,
backslashes, control characters, non-BMP, U+2028, IDs that begin others) and with
duplicate keys, and in encodings a lenient reader accepts (UTF-16, encoded surrogates,
invalid UTF-8 a browser reads as U+FFFD), which the proxy refuses before any rewriter.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ignore_proxy.answer_body import NotUtf8Json, check_utf8_json
from ignore_proxy.rewrite import (
    IgnoreContext,
    IgnoredEventLeft,
    InvalidBody,
    SenderIgnored,
    mentions_any,
    rewrite_guarded,
    rewrite_messages,
    rewrite_sliding_sync,
    rewrite_sync,
)
from ignore_proxy.rewrite.guard import guard_body_exact
from ignore_proxy.rewrite.scan import Mentions
from ignore_proxy.rewrite.sender_scan import holds_no_ignored_event
from tests.rewrite import substring_scan
from tests.rewrite.test_properties import SETTINGS
from tests.rewrite.test_sender_scan import Obj, Writer

ME = "@me:example.org"
ALICE = "@alice:example.org"
ROOM = "!room:example.org"

# Lenient IDs (``ids.is_user_id`` accepts them): each needs an escape, or is spelled
# raw in ways a writer may escape, or begins / ends another one.
EVIL = "@evil:x"
LENIENT = [
    EVIL, EVIL + ".org", "@evil:", "@evil", '@a"b:x', "@a\\b:x", "@a/b:x", "@caf\u00e9:x",
    "@\U0001f600:x", "@a\nb:x", "@a\u2028b:x", "@\x7f:x", "@@:x", "@a:b:c", "@A:X",
    "@\ud800:x", "@a\\u0040:x", '@a\\":x', "@\u0000:x", "@ :x", "@a\tb:x",
]  # fmt: skip

Rewriter = Callable[[bytes, IgnoreContext], Any]
_EVENT_IDS = itertools.count()


# --- the naive reference -------------------------------------------------------------


def _is_event(node: dict[str, Any]) -> bool:
    return all(isinstance(node.get(key), str) for key in ("event_id", "sender", "type"))


def _is_stub(node: dict[str, Any]) -> bool:
    keys = {"type", "event_id", "origin_server_ts", "redacts", "sender", "room_id", "content"}
    content = node.get("content", {})
    return set(node) <= keys and isinstance(content, dict) and set(content) <= {"redacts"}


def leaks(value: Any, ignored: frozenset[str]) -> list[str]:
    """What a client reading ``value`` would see of the ignored users (JSON pointers)."""
    found: list[str] = []
    stack: list[tuple[Any, str, str]] = [(value, "", "")]
    while stack:
        node, path, key = stack.pop()
        if isinstance(node, dict):
            event = _is_event(node)
            hidden = event and node["sender"] in ignored and "state_key" not in node
            if hidden and not (key == "redacted_because" and _is_stub(node)):
                found.append(path)
                continue
            content = node.get("content")
            if node.get("type") == "m.typing" and isinstance(content, dict):
                users = content.get("user_ids")
                if isinstance(users, list) and ignored & {u for u in users if isinstance(u, str)}:
                    found.append(path + "/content/user_ids")
            if node.get("type") == "m.receipt" and isinstance(content, dict):
                for per_event in content.values():
                    if not isinstance(per_event, dict):
                        continue
                    for per_type in per_event.values():
                        if isinstance(per_type, dict) and ignored & set(per_type):
                            found.append(path + "/content")
            if node.get("type") == "m.presence" and node.get("sender") in ignored:
                found.append(path)
            for k, child in node.items():
                if event and k == "content":
                    continue
                stack.append((child, f"{path}/{k}", k))
        elif isinstance(node, list):
            stack.extend((child, f"{path}/{i}", str(i)) for i, child in enumerate(node))
    rooms = value.get("rooms") if isinstance(value, dict) else None
    invites = rooms.get("invite") if isinstance(rooms, dict) else None
    for room_id, room in (invites or {}).items() if isinstance(invites, dict) else ():
        events = (room.get("invite_state") or {}).get("events") if isinstance(room, dict) else None
        for ev in events if isinstance(events, list) else ():
            if (
                isinstance(ev, dict)
                and ev.get("type") == "m.room.member"
                and ev.get("state_key") == ME
                and ev.get("sender") in ignored
                and isinstance(ev.get("content"), dict)
                and ev["content"].get("membership") == "invite"
            ):
                found.append(f"/rooms/invite/{room_id}")
    # sliding sync: a room whose stripped state's last membership of the user is an
    # invite by an ignored user
    for room_id, room in rooms.items() if isinstance(rooms, dict) else ():
        if not isinstance(room, dict):
            continue
        for key in ("stripped_state", "invite_state"):
            events = room.get(key)
            members = [
                e
                for e in (events if isinstance(events, list) else [])
                if isinstance(e, dict)
                and e.get("type") == "m.room.member"
                and e.get("state_key") == ME
            ]
            last = members[-1] if members else None
            if (
                last is not None
                and last.get("sender") in ignored
                and isinstance(last.get("content"), dict)
                and last["content"].get("membership") == "invite"
            ):
                found.append(f"/rooms/{room_id}/{key}")
    return found


def served(rewriter: Rewriter, body: bytes, ignored: frozenset[str]) -> bytes | None:
    """What the proxy sends for ``body`` (None: it refuses)."""
    ctx = IgnoreContext(ignored, ME)
    try:
        check_utf8_json([(b"content-type", b"application/json")], body)  # Services.read_answer
    except NotUtf8Json:
        return None
    if not mentions_any(body, ignored):
        return body  # relayed as it came (handlers.answer)
    try:
        guarded = rewrite_guarded(rewriter, body, ctx)
    except (InvalidBody, IgnoredEventLeft, SenderIgnored):
        return None
    return body if guarded.rewritten is None else guarded.rewritten.body


def assert_no_leak(rewriter: Rewriter, body: bytes, ignored: frozenset[str]) -> None:
    out = served(rewriter, body, ignored)
    if out is None:
        return
    try:
        value = json.loads(out)
    except ValueError:
        return  # no client reads it
    assert leaks(value, ignored) == [], (body, out)


# --- bodies --------------------------------------------------------------------------


def ev(sender: Any, *, state_key: Any = None, type: str = "m.room.message", **kw: Any) -> Obj:
    pairs: list[tuple[str, Any]] = [
        ("type", type), ("sender", sender), ("event_id", f"$e{next(_EVENT_IDS)}"),
        ("origin_server_ts", 1), ("content", Obj([("body", "hi")])),
    ]  # fmt: skip
    if state_key is not None:
        pairs.append(("state_key", state_key))
    pairs.extend(kw.items())
    return Obj(pairs)


def sync(
    timeline: list[Any],
    ephemeral: list[Any] | None = None,
    invite: list[Any] | None = None,
    presence: list[Any] | None = None,
) -> Obj:
    room = Obj([
        ("timeline", Obj([("events", timeline), ("limited", False)])),
        ("state", Obj([("events", [])])),
        ("ephemeral", Obj([("events", ephemeral or [])])),
    ])  # fmt: skip
    rooms = Obj([
        ("join", Obj([(ROOM, room)])),
        ("invite", Obj([("!inv:x", Obj([("invite_state", Obj([("events", invite or [])]))]))])),
        ("leave", Obj([])),
    ])  # fmt: skip
    return Obj([
        ("next_batch", "s1"), ("rooms", rooms),
        ("presence", Obj([("events", presence or [])])),
    ])  # fmt: skip


def typing(*users: Any) -> Obj:
    return Obj([("type", "m.typing"), ("content", Obj([("user_ids", list(users))]))])


def receipt(user: str) -> Obj:
    per_user = Obj([(user, Obj([("ts", 1)]))])
    return Obj([("type", "m.receipt"), ("content", Obj([("$x", Obj([("m.read", per_user)]))]))])


def invite(sender: str) -> list[Obj]:
    return [
        Obj([("type", "m.room.name"), ("sender", ALICE), ("state_key", ""),
             ("content", Obj([("name", "hi")]))]),
        Obj([("type", "m.room.member"), ("sender", sender), ("state_key", ME),
             ("content", Obj([("membership", "invite")]))]),
    ]  # fmt: skip


def presence(sender: str) -> Obj:
    return Obj([("type", "m.presence"), ("sender", sender), ("content", Obj([("presence", "x")]))])


def thread_root(latest_sender: str) -> Obj:
    thread = Obj([("latest_event", ev(latest_sender)), ("count", 2)])
    unsigned = Obj([("m.relations", Obj([("m.thread", thread)]))])
    return ev(ALICE, unsigned=unsigned)


def sliding(
    timeline: list[Any],
    ephemeral: list[Any] | None = None,
    invite: list[Any] | None = None,
    presence: list[Any] | None = None,
) -> Obj:
    """The same acts in a sliding sync answer (presence has no place there: dropped)."""
    extensions: list[tuple[str, Any]] = []
    for kind, name in (("m.typing", "typing"), ("m.receipt", "receipts")):
        events = [e for e in ephemeral or [] if dict(e.pairs)["type"] == kind]
        if events:
            extensions.append((name, Obj([("rooms", Obj([(ROOM, events[-1])]))])))
    room = Obj([("timeline", timeline), ("required_state", []), ("num_live", len(timeline))])
    rooms = [(ROOM, room)]
    if invite:
        rooms.append(("!inv:x", Obj([("stripped_state", invite)])))
    return Obj([("pos", "1"), ("rooms", Obj(rooms)), ("extensions", Obj(extensions))])


def write(tree: Any, seed: int, escapes: bool) -> bytes:
    return Writer(random.Random(seed), escapes).write(tree).encode("utf-8", "surrogatepass")


# --- generated: every place an ID matters, every spelling ---------------------------

_chars = st.characters(blacklist_categories=["Cs"])
_local = st.text(st.characters(blacklist_characters=":", blacklist_categories=["Cs"]),
                 min_size=1, max_size=4)  # fmt: skip
_server = st.text(_chars, min_size=1, max_size=4)
_generated = st.builds(lambda local, server: f"@{local}:{server}", _local, _server)
_id = st.sampled_from(LENIENT) | _generated


@st.composite
def attacks(draw: st.DrawFn) -> tuple[frozenset[str], Obj]:
    """An ignore list and a /sync body in which one of its IDs acts in one place."""
    ignored = draw(st.frozensets(_id, min_size=1, max_size=4))
    evil = draw(st.sampled_from(sorted(ignored)))
    other = draw(_id.filter(lambda uid: uid not in ignored))
    noise = draw(st.lists(st.sampled_from([other, ALICE, evil + "x", "x" + evil, evil[:-1]]),
                          max_size=3))  # fmt: skip
    timeline: list[Any] = [ev(ALICE, content=Obj([("body", n)])) for n in noise]
    ephemeral: list[Any] = []
    invites: list[Any] = []
    presences: list[Any] = []
    place = draw(st.sampled_from(["timeline", "dup_sender", "typing", "receipt", "invite",
                                  "presence", "thread", "state_then_event"]))  # fmt: skip
    if place == "timeline":
        timeline.append(ev(evil))
    elif place == "dup_sender":  # the last of duplicate keys counts for json.loads
        timeline.append(Obj([*ev(other).pairs, ("sender", evil)]))
    elif place == "typing":
        ephemeral.append(typing(*noise, evil))
    elif place == "receipt":
        ephemeral.append(receipt(evil))
    elif place == "invite":
        invites.extend(invite(evil))
    elif place == "presence":
        presences.append(presence(evil))
    elif place == "thread":
        timeline.append(thread_root(evil))
    else:
        timeline.append(ev(evil, state_key=""))
        timeline.append(ev(evil))
    draw(st.randoms(use_true_random=False)).shuffle(timeline)
    shape = sliding if draw(st.integers(0, 3)) == 0 else sync
    if shape is sliding and place == "presence":
        place, timeline = "timeline", [*timeline, ev(evil)]
    return ignored, shape(timeline, ephemeral, invites, presences)


@SETTINGS
@given(case=attacks(), seed=st.integers(0, 2**32), escapes=st.booleans())
def test_no_ignored_user_leaks_through_sync_in_any_spelling(
    case: tuple[frozenset[str], Obj], seed: int, escapes: bool
) -> None:
    ignored, tree = case
    body = write(tree, seed, escapes)
    assert leaks(json.loads(body), ignored)  # the attack is there to be caught
    is_sliding = tree.pairs[0][0] == "pos"
    assert_no_leak(rewrite_sliding_sync if is_sliding else rewrite_sync, body, ignored)
    # the search itself: every ignored ID the body holds as a string is found, and
    # never one the old search ruled out
    truth = _strings(body) & ignored
    assert mentions_any(body, ignored) or not truth
    assert substring_scan.mentions_any(body, ignored) or not mentions_any(body, ignored)
    if hasattr(Mentions, "found"):  # (not on main, whose search answers yes or no)
        found = Mentions(ignored).found(body)
        assert found.always or truth <= found.ids


@SETTINGS
@given(case=attacks(), seed=st.integers(0, 2**32), escapes=st.booleans())
def test_the_guard_fast_path_never_clears_a_body_the_exact_walk_changes(
    case: tuple[frozenset[str], Obj], seed: int, escapes: bool
) -> None:
    ignored, tree = case
    chunk = Obj([("chunk", [p for p in _all_events(tree)])])
    body = write(chunk, seed, escapes)
    if holds_no_ignored_event(body, ignored):
        assert guard_body_exact(body, IgnoreContext(ignored, ME)) is None
        assert leaks(json.loads(body), ignored) == [] or _only_ephemeral(body, ignored)
    assert_no_leak(rewrite_messages, body, ignored)


def _all_events(tree: Any) -> list[Any]:
    out: list[Any] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, Obj):
            if dict(node.pairs).get("event_id") is not None:
                out.append(node)
            stack.extend(v for _, v in node.pairs)
        elif isinstance(node, list):
            stack.extend(node)
    return out


def _only_ephemeral(body: bytes, ignored: frozenset[str]) -> bool:
    """Leaks the guard does not look for (it judges events only)."""
    value = json.loads(body)
    return all(not p.endswith("/chunk") and "/chunk/" in p and _is_non_event(value, p)
               for p in leaks(value, ignored))  # fmt: skip


def _is_non_event(value: Any, pointer: str) -> bool:
    node = value
    for step in pointer.strip("/").split("/"):
        node = node[int(step)] if isinstance(node, list) else node[step]
    return not (isinstance(node, dict) and _is_event(node) and "state_key" not in node)


def _strings(data: bytes) -> set[str]:
    found: set[str] = set()

    def pairs(items: list[tuple[str, Any]]) -> list[Any]:
        found.update(k for k, _ in items)
        return [v for _, v in items]

    stack = [json.loads(data, object_pairs_hook=pairs)]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str):
            found.add(node)
    return found


class _Slot(int):
    """A place in a generated tree for one of the drawn ignored IDs (by index)."""


def _fill(node: Any, ids: list[str]) -> Any:
    if isinstance(node, _Slot):
        return ids[node % len(ids)]
    if isinstance(node, Obj):
        return Obj([(_fill(k, ids), _fill(v, ids)) for k, v in node.pairs])
    if isinstance(node, list):
        return [_fill(v, ids) for v in node]
    return node


_NAMES = [ALICE, "sender", "state_key", "content", "unsigned", "redacted_because", "{", '"']
_slot = st.integers(0, 2).map(_Slot)
_tree_strings: st.SearchStrategy[Any] = (
    _slot | st.sampled_from(_NAMES + LENIENT) | st.text(max_size=3)
)
_tree_senders = _slot | st.just(ALICE)


def _tree_event(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Obj]:
    def make(sender: Any, state: bool, extra: list[tuple[str, Any]], dup: Any) -> Obj:
        pairs = [("event_id", "$e"), ("type", "t"), ("sender", sender), *extra]
        if state:
            pairs.append(("state_key", ""))
        if dup is not None:
            pairs.append(("sender", dup))
        return Obj(pairs)

    keys = st.sampled_from(["unsigned", "content", "redacted_because", "x"])
    extra = st.lists(st.tuples(keys, children), max_size=2)
    return st.builds(make, _tree_senders, st.booleans(), extra, st.none() | _tree_senders)


def _tree_extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    objects = st.lists(st.tuples(_tree_strings, children), max_size=3).map(Obj)
    return st.lists(children, max_size=3) | objects | _tree_event(children)


_tree_leaves = st.none() | st.integers(-3, 3) | _tree_strings
_tree_shapes = st.recursive(_tree_leaves | _tree_event(_tree_leaves), _tree_extend, max_leaves=20)


@st.composite
def _trees(draw: st.DrawFn) -> tuple[frozenset[str], Any]:
    """Any JSON tree: lenient IDs as keys and values, events (state or not, duplicate
    senders, nested in content, unsigned and redacted_because) anywhere."""
    ids = draw(st.lists(_id, min_size=1, max_size=3, unique=True))
    return frozenset(ids), _fill(draw(_tree_shapes), ids)


@SETTINGS
@given(case=_trees(), seed=st.integers(0, 2**32), escapes=st.booleans())
def test_any_tree_of_events_in_any_spelling(
    case: tuple[frozenset[str], Any], seed: int, escapes: bool
) -> None:
    ignored, tree = case
    body = write(Obj([("chunk", [tree])]), seed, escapes)
    assert_no_leak(rewrite_messages, body, ignored)
    if holds_no_ignored_event(body, ignored):
        assert guard_body_exact(body, IgnoreContext(ignored, ME)) is None
    truth = _strings(body) & ignored
    assert mentions_any(body, ignored) or not truth


# --- targeted bodies -----------------------------------------------------------------

_EV_TAIL = b',"type":"m.room.message","event_id":"$1","content":{"body":"hi"}}'


def _chunk(*events: bytes) -> bytes:
    return b'{"chunk":[' + b",".join(events) + b"]}"


def _sync_raw(timeline: bytes = b"", ephemeral: bytes = b"", invite: bytes = b"") -> bytes:
    return (
        b'{"next_batch":"s","rooms":{"join":{"!r:x":{"timeline":{"events":[' + timeline
        + b']},"ephemeral":{"events":[' + ephemeral + b']}}},"invite":{"!i:x":'
        b'{"invite_state":{"events":[' + invite + b"]}}}}}"
    )  # fmt: skip


TARGETED: list[tuple[str, frozenset[str], Rewriter, bytes]] = [
    # `@` as \u0040, other characters escaped, \/ and upper-case hex
    ("u0040 sender", frozenset({EVIL}), rewrite_messages,
     _chunk(b'{"sender":"\\u0040evil:x"' + _EV_TAIL)),
    ("upper hex", frozenset({EVIL}), rewrite_messages,
     _chunk(b'{"sender":"@\\u0045VIL:x"' + _EV_TAIL.replace(b"$1", b"$2"))),
    ("escaped middle", frozenset({EVIL}), rewrite_messages,
     _chunk(b'{"sender":"@ev\\u0069l:x"' + _EV_TAIL)),
    ("solidus", frozenset({"@a/b:x"}), rewrite_messages,
     _chunk(b'{"sender":"@a\\/b:x"' + _EV_TAIL)),
    ("all escaped", frozenset({EVIL}), rewrite_messages,
     _chunk(b'{"sender":"' + b"".join(b"\\u%04X" % ord(c) for c in EVIL) + b'"' + _EV_TAIL)),
    # a string ending in an escaped backslash right before the sender's opening quote
    ("backslash before", frozenset({EVIL}), rewrite_messages,
     _chunk(b'{"x":"\\\\","sender":"@evil:x"' + _EV_TAIL)),
    ("backslash-quote key", frozenset({EVIL}), rewrite_messages,
     _chunk(b'{"a\\"":"\\\\\\"@evil:x","sender":"@evil:x"' + _EV_TAIL)),
    # `"sender"` spelled with an escape; and whitespace everywhere
    ("escaped key", frozenset({EVIL}), rewrite_messages,
     _chunk(b'{"s\\u0065nder":"@evil:x"' + _EV_TAIL)),
    ("whitespace", frozenset({EVIL}), rewrite_messages,
     _chunk(b'{ "sender" \t\r\n : \n "@evil:x" ,"type":"m.room.message","event_id":"$1"}')),
    # duplicate keys: the last counts for json.loads and msgspec
    ("dup sender last", frozenset({EVIL}), rewrite_messages,
     _chunk(b'{"sender":"@ok:x","sender":"\\u0040evil:x"' + _EV_TAIL)),
    ("dup state_key", frozenset({EVIL}), rewrite_messages,
     _chunk(b'{"sender":"@evil:x","state_key":"","state_key":""' + _EV_TAIL)),
    # a fake event in a string, then the real one
    ("event in string", frozenset({EVIL}), rewrite_messages,
     _chunk(b'{"sender":"@ok:x","event_id":"$0","type":"t","content":{"b":"{\\"sender\\":\\"'
            b'@evil:x\\",\\"state_key\\":\\"\\"}"}}', b'{"sender":"@evil:x"' + _EV_TAIL)),
    ("brace string", frozenset({EVIL}), rewrite_messages,
     _chunk(b'{"a":"{","{\\"state_key\\":1,":1,"sender":"@evil:x"' + _EV_TAIL)),
    ("brace string 2", frozenset({EVIL}), rewrite_messages,
     _chunk(b'{"a":"{",":{":"state_key","sender":"@evil:x"' + _EV_TAIL)),
    # IDs needing escapes
    ("quote in id", frozenset({'@a"b:x'}), rewrite_messages,
     _chunk(b'{"sender":"@a\\"b:x"' + _EV_TAIL)),
    ("quote in id as u", frozenset({'@a"b:x'}), rewrite_messages,
     _chunk(b'{"sender":"@a\\u0022b:x"' + _EV_TAIL)),
    ("backslash id", frozenset({"@a\\b:x"}), rewrite_messages,
     _chunk(b'{"sender":"@a\\\\b:x"' + _EV_TAIL)),
    ("newline id", frozenset({"@a\nb:x"}), rewrite_messages,
     _chunk(b'{"sender":"@a\\u000Ab:x"' + _EV_TAIL)),
    ("lone surrogate id", frozenset({"@\ud800:x"}), rewrite_messages,
     _chunk(b'{"sender":"@\\uD800:x"' + _EV_TAIL)),
    ("non-bmp as pair", frozenset({"@\U0001f600:x"}), rewrite_messages,
     _chunk(b'{"sender":"\\u0040\\ud83d\\uDE00:x"' + _EV_TAIL)),
    ("u2028 raw", frozenset({"@a\u2028b:x"}), rewrite_messages,
     _chunk(b'{"sender":"@a\xe2\x80\xa8b:x"' + _EV_TAIL)),
    ("del raw", frozenset({"@\x7f:x"}), rewrite_messages,
     _chunk(b'{"sender":"@\x7f:x"' + _EV_TAIL)),
    # one ID begins another; the found one is not the ignored one
    ("prefix ids", frozenset({EVIL, EVIL + ".org"}), rewrite_messages,
     _chunk(b'{"sender":"@evil:x.org"' + _EV_TAIL)),
    ("prefix escaped", frozenset({EVIL + ".org"}), rewrite_messages,
     _chunk(b'{"sender":"@evil:x"' + _EV_TAIL, b'{"sender":"@evil:x\\u002eorg"' + _EV_TAIL)),
    # the longest spelling: every character a surrogate pair, padded to the bound
    ("longest", frozenset({"@" + "\U0001f600" * 60 + ":x"}), rewrite_messages,
     _chunk(b'{"sender":"\\u0040' + b"\\ud83d\\ude00" * 60 + b'\\u003a\\u0078"' + _EV_TAIL)),
    # a long string before (bounded decode) and an ignored sender after it
    ("long escaped string", frozenset({EVIL}), rewrite_messages,
     _chunk(b'{"x":"@' + b"\\u0061" * 5000 + b'","sender":"@evil:\\u0078"' + _EV_TAIL)),
    # ephemeral and invites: only the search guards them (the guard judges events)
    ("typing u0040", frozenset({EVIL}), rewrite_sync,
     _sync_raw(ephemeral=b'{"type":"m.typing","content":{"user_ids":["\\u0040evil:x"]}}')),
    ("typing escaped", frozenset({EVIL}), rewrite_sync,
     _sync_raw(ephemeral=b'{"type":"m.typing","content":{"user_ids":["@evil\\u003ax"]}}')),
    ("receipt key u0040", frozenset({EVIL}), rewrite_sync,
     _sync_raw(ephemeral=b'{"type":"m.receipt","content":{"$e":{"m.read":'
                         b'{"\\u0040evil:x":{"ts":1}}}}}')),
    ("receipt key solidus", frozenset({"@a/b:x"}), rewrite_sync,
     _sync_raw(ephemeral=b'{"type":"m.receipt","content":{"$e":{"m.read":'
                         b'{"@a\\/b:x":{"ts":1}}}}}')),
    ("invite escaped", frozenset({EVIL}), rewrite_sync,
     _sync_raw(invite=b'{"type":"m.room.member","sender":"@evil:\\u0078","state_key":'
                      b'"@me:example.org","content":{"membership":"invite"}}')),
    ("invite dup sender", frozenset({EVIL}), rewrite_sync,
     _sync_raw(invite=b'{"type":"m.room.member","sender":"@ok:x","state_key":'
                      b'"@me:example.org","content":{"membership":"invite"},'
                      b'"sender":"\\u0040evil:x"}')),
    ("receipt dup key", frozenset({EVIL}), rewrite_sync,
     _sync_raw(ephemeral=b'{"type":"m.receipt","content":{"$e":{"m.read":'
                         b'{"@ok:x":{"ts":1},"\\u0040evil:x":{"ts":1}}}}}')),
]  # fmt: skip


@pytest.mark.parametrize(("name", "ignored", "rewriter", "body"), TARGETED,
                         ids=[t[0] for t in TARGETED])  # fmt: skip
def test_targeted_bodies_leak_nothing(
    name: str, ignored: frozenset[str], rewriter: Rewriter, body: bytes
) -> None:
    value = json.loads(body)
    assert_no_leak(rewriter, body, ignored)
    # each body holds the ignored ID as a string: the search finds it
    if _strings(body) & ignored:
        assert mentions_any(body, ignored), name
    if leaks(value, ignored) and rewriter is rewrite_messages:
        # an ignored user's event that json.loads sees: the fast path never clears it
        assert not holds_no_ignored_event(body, ignored), name


@pytest.mark.parametrize("ignored", [frozenset({EVIL}), frozenset(LENIENT)])
def test_many_ids_and_few_agree(ignored: frozenset[str]) -> None:
    """The set lookup (many keys) and the byte search (few) decide parts alike."""
    crowd = frozenset(f"@u{i}:s{i}.example" for i in range(40))
    for _, listed, rewriter, body in TARGETED:
        assert_no_leak(rewriter, body, listed | crowd)
        assert_no_leak(rewriter, body, listed | ignored)


# --- readers that differ from every decoder here: refused before any rewriter --------


def test_utf8_encoded_surrogate_in_sender() -> None:
    ignored = frozenset({"@\ud800:x"})
    body = _chunk(b'{"sender":"@\xed\xa0\x80:x"' + _EV_TAIL)
    assert json.loads(body)["chunk"][0]["sender"] == "@\ud800:x"
    assert_no_leak(rewrite_messages, body, ignored)


def test_utf16_body() -> None:
    ignored = frozenset({EVIL})
    body = _chunk(b'{"sender":"@evil:x"' + _EV_TAIL).decode().encode("utf-16-le")
    assert_no_leak(rewrite_messages, body, ignored)


def test_utf8_bom_body() -> None:
    ignored = frozenset({EVIL})
    body = b"\xef\xbb\xbf" + _chunk(b'{"sender":"@evil:x"' + _EV_TAIL)
    assert_no_leak(rewrite_messages, body, ignored)


def test_non_json_bodies_mentioning_an_id_are_not_relayed_readable() -> None:
    ignored = frozenset({EVIL})
    event = b'{"sender":"@evil:x"' + _EV_TAIL
    for body in [
        _chunk(event) + b"x",
        _chunk(event).replace(b'"hi"', b"NaN"),
        _chunk(event).replace(b'"hi"', b'"h\ni"'),
        b"[" + event + b",]",
    ]:
        assert_no_leak(rewrite_messages, body, ignored)


def test_msgspec_and_stdlib_read_the_same_strings() -> None:
    """The search decodes with the stdlib, the rewriters with msgspec."""
    for spelling in [b'"\\u0040evil:x"', b'"@\\/a"', b'"\\uD83D\\uDE00"', b'"\\u00e9"',
                     b'"\xe2\x80\xa8"', b'"\\u0000"']:  # fmt: skip
        assert msgspec.json.decode(spelling) == json.loads(spelling)


def test_invalid_utf8_read_as_replacement_character() -> None:
    ignored = frozenset({"@a\ufffd:x"})
    body = _chunk(b'{"sender":"@a\xff:x"' + _EV_TAIL)
    out = served(rewrite_messages, body, ignored)
    assert out is None or leaks(json.loads(out.decode("utf-8", "replace")), ignored) == []
