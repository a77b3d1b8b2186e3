"""One handler per kind of route: what the proxy does before a request goes upstream
(`prepare`) and what it answers with (`respond`, a reply value; errors are raised as
`MatrixError`). The route table (`routes.py`) names a handler for each endpoint.

- `Handler`: relays the answer as it came (also every request outside the table).
- `Versions`: adds MSC4406 to `/versions`.
- `ForgetsIdentity`: logouts and the like; forgets cached identities that die.
- `IgnoreListWrite`: checks a new ignore list and applies it at once.
- `FilteredRead`: reads the whole answer and takes ignored users' events out.
- `SingleEvent`: a `FilteredRead` about one event (`SENDER_IGNORED`).
- `Relations`: a `SingleEvent` whose event is named in the path, looked up first.
- `TimestampToEvent`: answers the nearest event that is not an ignored user's.
- `PushRules`: (`ignore.suppress_push`) keeps the proxy's push rules out of clients' sight
  and reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote_to_bytes

import msgspec

from . import filters, lookups, rewrite
from .calls import Call, ListUnavailable, Services, lookup_failed
from .identity import IdentityUnavailable
from .ids import is_user_id
from .ignore_lists import PutRejection, validate_put_body
from .replies import Json, MatrixError, Relay, Reply, Rewritten
from .rewrite.raw import decode_value
from .upstream import UpstreamResponse

AccountDataReader = Callable[[bytes], frozenset[str] | None]
PushRulesReader = Callable[[bytes], rewrite.SeenRules | None]
FilterKind = Literal["query", "query_or_stored", "search_body"]

# Searched for like a user ID: escapes in the body can spell it too.
_IGNORE_LIST_TYPE = frozenset({"m.ignored_user_list"})
_PUSH_RULES_TYPE = frozenset({"m.push_rules"})
# How long an ignore-list write waits for the push rules to follow it before it answers
# (they follow later if need be): messages right after the write are then not counted.
_PUSH_RULES_WAIT = 5.0
_ERROR_BODY_LIMIT = 64 * 1024
_EVENT_ID = re.compile(rb'"event_id"')
_UNJUDGED_ERROR = "The homeserver's error answer held events the proxy could not judge"


def _succeeded(status: int) -> bool:
    return 200 <= status < 300


class _BodyTimeout(msgspec.Struct):
    timeout: int | None = None


def _timeout_in_body(body: bytes) -> int | None:
    """MSC4186's `timeout` member; a body the homeserver will refuse changes nothing."""
    try:
        found = msgspec.json.decode(body, type=_BodyTimeout).timeout
    except msgspec.MsgspecError:
        return None
    return found if found is not None and found >= 0 else None


class Handler:
    """Relays the homeserver's answer as it came."""

    # Read the request's credentials (refusing any a homeserver could read otherwise).
    needs_identity = False
    # Ask for the whole answer, uncompressed and unconditional: the proxy reads it.
    reads_answer = False

    async def prepare(self, svc: Services, call: Call) -> None:
        return None

    async def respond(self, svc: Services, call: Call, response: UpstreamResponse) -> Reply:
        return Relay(response)


RELAY = Handler()


class Versions(Handler):
    reads_answer = True

    async def respond(self, svc: Services, call: Call, response: UpstreamResponse) -> Reply:
        if response.status_code != 200:
            return Relay(response)
        body = await svc.read_answer(call, response)
        with contextlib.suppress(rewrite.InvalidBody):
            body = rewrite.add_msc4406_feature(body)
        return Rewritten(response, body)


class ForgetsIdentity(Handler):
    """A request after which a token (or all of a user's tokens) may be dead."""

    needs_identity = True

    def __init__(self, scope: Literal["token", "user"]) -> None:
        self.scope = scope

    async def prepare(self, svc: Services, call: Call) -> None:
        if self.scope == "user" and call.creds is not None:
            # Ask before forwarding: after a logout the token can no longer tell.
            with contextlib.suppress(IdentityUnavailable):
                call.user_to_evict = await svc.identity.resolve(call.creds)

    async def respond(self, svc: Services, call: Call, response: UpstreamResponse) -> Reply:
        if _succeeded(response.status_code) and call.creds is not None:
            svc.identity.forget_token(call.creds.access_token)
            if call.user_to_evict is not None:
                svc.identity.forget_user(call.user_to_evict)
        return Relay(response)


class IgnoreListWrite(Handler):
    """`PUT`/`DELETE .../account_data/m.ignored_user_list`: the new list is checked before
    it goes upstream and applied, for every client of the user, once it is stored."""

    needs_identity = True

    async def prepare(self, svc: Services, call: Call) -> None:
        limit = svc.settings.limits.max_json_body
        raw = b"" if call.body is None else await call.read_json_body(limit)
        if call.found.route.method == "PUT":
            checked = validate_put_body(raw, call.found.params["user_id"])
            if isinstance(checked, PutRejection):
                raise MatrixError(400, checked.errcode, checked.error)
            call.new_list = checked
        else:
            call.new_list = frozenset()  # MSC3391: deleting the event
        svc.start_user_and_list(call, load_list=False)

    async def respond(self, svc: Services, call: Call, response: UpstreamResponse) -> Reply:
        if _succeeded(response.status_code) and call.user_lookup is not None:
            assert call.new_list is not None
            try:
                user_id = await call.user_lookup
            except ListUnavailable:
                # Stored, but for whom is unknown: the path's user most likely. Their
                # list is read again, here and in every other worker and instance.
                path_user = call.found.params["user_id"]
                if is_user_id(path_user):
                    svc.ignore_lists.invalidate(path_user)
                    await svc.ignore_lists.shared(path_user)
                return Relay(response)
            # Only ever under the authenticated user's own key. A homeserver that took a
            # write under another user's path (Conduit stores the sender's, whatever the
            # path says) may have changed the sender's list: read it again.
            if user_id == call.found.params["user_id"]:
                svc.ignore_lists.set(user_id, call.new_list)
                keeping = svc.keep_push_rules(call, user_id)
                if keeping is not None:
                    await asyncio.wait({keeping}, timeout=_PUSH_RULES_WAIT)
            else:
                svc.ignore_lists.invalidate(user_id)
            await svc.ignore_lists.shared(user_id)  # other instances hear it first
        return Relay(response)


class FilteredRead(Handler):
    """An endpoint that returns events: the answer is read whole and the ignored users'
    events are taken out by `rewriter` (and, after it, the guard)."""

    needs_identity = True
    reads_answer = True

    def __init__(
        self,
        rewriter: rewrite.Rewriter | None,
        *,
        account_data: AccountDataReader | None = None,
        filter: FilterKind | None = None,
        timeout_in_body: bool = False,
        push_rules: PushRulesReader | None = None,
    ) -> None:
        self.rewriter = rewriter
        # Learns the ignore list from the account data the answer carries (sync).
        self.account_data = account_data
        # Where the request carries a filter whose `event_fields` the proxy takes out.
        self.filter = filter
        # MSC4186 sends `timeout` (a long-poll's milliseconds) in the request body.
        self.timeout_in_body = timeout_in_body
        # Takes the proxy's push rules out of the `m.push_rules` account data it carries.
        self.push_rules = push_rules

    async def prepare(self, svc: Services, call: Call) -> None:
        if self.filter is not None:
            await svc.take_out_event_fields(call, self.filter)
        if self.timeout_in_body and call.body is not None:
            body = await call.read_json_body(svc.settings.limits.max_json_body)
            call.poll_ms = _timeout_in_body(body)
        svc.start_user_and_list(call, load_list=True)

    async def respond(self, svc: Services, call: Call, response: UpstreamResponse) -> Reply:
        status = response.status_code
        if call.user_lookup is None:
            return Relay(response)  # no credentials: nobody's list applies
        if 300 <= status < 400:
            # A filtered endpoint never redirects; clients may read a 3xx body as data.
            raise MatrixError(502, "M_UNKNOWN", "The homeserver answered with a redirect")
        if not _succeeded(status):
            return await self.respond_error(svc, call, response)
        if status == 204:
            return Relay(response)  # nothing at all
        # Every success is data to a client (fetch's `ok`, ruma reads below 400): 201,
        # 203, 206 and 299 are filtered exactly as 200 is.
        try:
            user_id = await call.user_lookup
            ignored = await svc.list_now(call, user_id)
            hidden = await self.hidden_path_event(svc, call, user_id)
        except ListUnavailable:
            return self.list_unavailable(svc, response)
        if hidden is not None:
            return hidden
        hides_rules = self.push_rules is not None and svc.push_rule_keeper is not None
        parses_anyway = self.account_data is not None or hides_rules
        if not parses_anyway and not ignored and call.event_fields is None:
            return Relay(response)  # nobody ignored: stream it, never parse it
        body = await svc.read_answer(call, response)
        if self.account_data is not None and rewrite.mentions_any(body, _IGNORE_LIST_TYPE):
            with contextlib.suppress(rewrite.InvalidBody):
                seen = self.account_data(body)
                if seen is not None:
                    svc.ignore_lists.set(user_id, seen, asked_at=call.asked_at)
        if hides_rules:
            # Even for a user ignoring nobody: rules the proxy could not delete remain.
            body = self.hide_push_rules(svc, call, user_id, body)
        try:
            ignored = await svc.list_now(call, user_id)
        except ListUnavailable:
            return self.list_unavailable(svc, response, body)
        return await self.answer(svc, call, response, body, user_id, ignored)

    def hide_push_rules(self, svc: Services, call: Call, user_id: str, body: bytes) -> bytes:
        """`body` without the proxy's push rules; what it held of them is reported."""
        assert self.push_rules is not None
        if not rewrite.mentions_any(body, _PUSH_RULES_TYPE):
            return body
        try:
            seen = self.push_rules(body)
        except rewrite.InvalidBody:
            raise MatrixError(502, "M_UNKNOWN", "The homeserver sent a malformed answer") from None
        if seen is None:
            return body
        svc.push_rules_seen(call, user_id, seen.owned)
        return body if seen.body is None else seen.body

    async def respond_error(self, svc: Services, call: Call, response: UpstreamResponse) -> Reply:
        body = await svc.read_answer(call, response, _ERROR_BODY_LIMIT, empty_ok=True)
        return await self.judged_error(svc, call, response, body)

    async def judged_error(
        self, svc: Services, call: Call, response: UpstreamResponse, body: bytes
    ) -> Reply:
        """An error answer, read: errors carry no events, and one that holds an ignored
        user's is not relayed as it came (the guard takes it out, or the answer is
        refused)."""
        assert call.user_lookup is not None
        try:
            user_id = await call.user_lookup
            ignored = await svc.list_now(call, user_id)
        except ListUnavailable:
            # Whose list applies is unknown (a dead token's 401, say): no event passes.
            if _EVENT_ID.search(body) is not None or b"\\u" in body:
                raise MatrixError(502, "M_UNKNOWN", _UNJUDGED_ERROR) from None
            return Rewritten(response, body)
        if ignored and rewrite.mentions_any(body, ignored):
            ctx = rewrite.IgnoreContext(ignored, user_id, svc.settings.ignore.filter_ephemeral)
            try:
                guarded = rewrite.guard_body(body, ctx)
            except rewrite.IgnoredEventLeft:
                raise MatrixError(502, "M_UNKNOWN", _UNJUDGED_ERROR) from None
            if guarded is not None:
                body = guarded.body
        return Rewritten(response, body)

    async def hidden_path_event(self, svc: Services, call: Call, user_id: str) -> Reply | None:
        """The answer to give instead, if the request is about an event the user may not
        see although the answer does not show it (see `Relations`)."""
        return None

    def list_unavailable(
        self, svc: Services, response: UpstreamResponse, body: bytes | None = None
    ) -> Reply:
        """`body`: the answer's, when it was read already."""
        refusal = svc.list_unavailable()
        if svc.settings.ignore.on_unavailable != "pass":
            return refusal
        return Relay(response) if body is None else Rewritten(response, body)

    async def answer(
        self,
        svc: Services,
        call: Call,
        response: UpstreamResponse,
        body: bytes,
        user_id: str,
        ignored: frozenset[str],
    ) -> Reply:
        """The answer once read, filtered for `ignored`."""
        if ignored and rewrite.mentions_any(body, ignored):
            assert self.rewriter is not None
            ctx = rewrite.IgnoreContext(ignored, user_id, svc.settings.ignore.filter_ephemeral)
            try:
                rewritten = await svc.rewrite_answer(call, self.rewriter, body, ctx)
                if rewritten is not None and rewritten.stale_threads and call.creds is not None:
                    # Thread summaries whose latest reply is hidden: learn the visible one.
                    summaries = await svc.thread_summaries(
                        call.creds, rewritten.stale_threads, ignored
                    )
                    ctx = rewrite.IgnoreContext(ignored, user_id, ctx.filter_ephemeral, summaries)
                    rewritten = await svc.rewrite_answer(call, self.rewriter, body, ctx)
            except rewrite.SenderIgnored as exc:
                svc.metrics.events_removed.labels(call.route_name).inc()
                return svc.sender_ignored(exc.sender)
            if rewritten is not None:
                if rewritten.hidden_invites and call.creds is not None:
                    svc.reject_invites(user_id, call.creds, rewritten.hidden_invites)
                svc.metrics.events_removed.labels(call.route_name).inc(rewritten.removed)
                body = rewritten.body
        if ignored and call.creds is not None:
            body = await svc.corrected_thread_counts(call.creds, body, ignored)
        if call.event_fields is not None:
            # Now that no ignored sender's event is left to judge.
            body = filters.project_sync_body(body, call.event_fields)
        return Rewritten(response, body)


class SingleEvent(FilteredRead):
    """An endpoint about one event: an ignored sender's becomes `SENDER_IGNORED`, and a
    homeserver's own "sender ignored" error is normalised to the same shape."""

    async def respond_error(self, svc: Services, call: Call, response: UpstreamResponse) -> Reply:
        body = await svc.read_answer(call, response, _ERROR_BODY_LIMIT, empty_ok=True)
        own_answer = rewrite.normalise_sender_ignored(response.status_code, body)
        if own_answer is None:
            return await self.judged_error(svc, call, response, body)
        return svc.sender_ignored(own_answer.sender)


class Relations(SingleEvent):
    """`/relations/{eventId}`: the parent is looked up alongside the request, since the
    answer need not show it."""

    async def prepare(self, svc: Services, call: Call) -> None:
        await super().prepare(svc, call)
        if call.creds is not None:
            room_id, event_id = call.found.params["room_id"], call.found.params["event_id"]
            call.path_event = asyncio.create_task(
                lookups.fetch_event_head(svc.client, call.creds, room_id, event_id)
            )

    async def hidden_path_event(self, svc: Services, call: Call, user_id: str) -> Reply | None:
        assert call.path_event is not None
        try:
            head = await call.path_event
        except lookups.LookupFailed as exc:
            raise lookup_failed(exc) from None
        if head.sender is None or head.is_state:
            return None
        if head.sender not in await svc.list_now(call, user_id):
            return None
        return svc.sender_ignored(head.sender)


class TimestampToEvent(FilteredRead):
    """`timestamp_to_event` names an event but not its sender: the nearest one that is
    not an ignored user's is looked up."""

    def __init__(self) -> None:
        super().__init__(None)

    async def answer(
        self,
        svc: Services,
        call: Call,
        response: UpstreamResponse,
        body: bytes,
        user_id: str,
        ignored: frozenset[str],
    ) -> Reply:
        if not ignored:
            return Rewritten(response, body)
        assert call.creds is not None
        query = dict(parse_qsl(call.query.decode("latin-1")))
        try:
            found = await lookups.nearest_unignored_event(
                svc.client, call.creds, call.found.params["room_id"], query, body, ignored
            )
        except lookups.LookupFailed as exc:
            raise lookup_failed(exc) from None
        if found is None:
            raise MatrixError(404, "M_NOT_FOUND", "Unable to find an event in the direction given")
        return Rewritten(response, found)


_RESERVED = "Push rule IDs starting with org.ignore_proxy. are reserved for the ignore proxy"


class PushRules(Handler):
    """`/pushrules/...` and the `m.push_rules` account data (`ignore.suppress_push`):
    every answer is read whole and the proxy's rules are taken out wherever they are a
    list's item; a request naming one of them (`names_rules`: its path or query holds
    the namespace, in any spelling) is refused: a read with 404, a write with 400."""

    needs_identity = True
    reads_answer = True

    def __init__(self, *, names_rules: bool) -> None:
        self.names_rules = names_rules

    async def prepare(self, svc: Services, call: Call) -> None:
        if self.names_rules and rewrite.names_owned(
            _decoded(call.raw_path) + "?" + _decoded(call.query.replace(b"+", b" "))
        ):
            if call.found.route.method == "GET":
                raise MatrixError(404, "M_NOT_FOUND", "Unknown push rule")
            raise MatrixError(400, "M_INVALID_PARAM", _RESERVED)
        if call.found.route.method == "GET":
            svc.start_user_and_list(call, load_list=True)

    async def respond(self, svc: Services, call: Call, response: UpstreamResponse) -> Reply:
        status = response.status_code
        if call.found.route.method != "GET":
            return Relay(response)  # `{}`: it cannot have touched the proxy's rules
        if 300 <= status < 400:
            raise MatrixError(502, "M_UNKNOWN", "The homeserver answered with a redirect")
        body = await svc.read_answer(
            call, response, _ERROR_BODY_LIMIT if status >= 400 else None,
            empty_ok=status >= 400 or status == 204, array_ok=True,
        )  # fmt: skip
        if not body.strip(b" \t\r\n"):
            return Rewritten(response, body)
        decoded: Any = decode_value(body)
        if decoded is None:
            raise MatrixError(502, "M_UNKNOWN", "The homeserver sent a malformed answer")
        try:
            hidden, removed = rewrite.hide_owned(decoded)
            new_body = msgspec.json.encode(hidden) if removed else body
        except (rewrite.OwnedRuleLeft, UnicodeEncodeError, msgspec.EncodeError):
            raise MatrixError(502, "M_UNKNOWN", "The homeserver's push rules could not be "
                              "read") from None  # fmt: skip
        whole = _succeeded(status) and isinstance(decoded, dict) and "global" in decoded
        if whole and call.user_lookup is not None:
            # The whole ruleset: the proxy's rules as the homeserver holds them.
            with contextlib.suppress(ListUnavailable):
                user_id = await call.user_lookup
                svc.push_rules_seen(call, user_id, rewrite.owned_overrides(decoded))
        return Rewritten(response, new_body)


def _decoded(raw: bytes) -> str:
    return unquote_to_bytes(raw).decode("utf-8", "replace")


__all__ = [
    "RELAY",
    "FilteredRead",
    "ForgetsIdentity",
    "Handler",
    "IgnoreListWrite",
    "Json",
    "PushRules",
    "Relations",
    "SingleEvent",
    "TimestampToEvent",
    "Versions",
]
