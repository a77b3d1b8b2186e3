"""Pure rewriters of homeserver responses: from raw JSON bytes and an IgnoreContext to a
new body with ignored users' events removed, or None when nothing needs to change.

No I/O. Only the outer levels and each event's head are decoded; everything that is not
changed is spliced back byte for byte.
"""

from __future__ import annotations

from .account_data import (
    ignored_users_from_content,
    ignored_users_from_sliding_sync,
    ignored_users_from_sync,
)
from .errors import SENDER_IGNORED_CODES, UpstreamSenderIgnored, normalise_sender_ignored
from .guard import Guarded, IgnoredEventLeft, guard_body, remove_ignored_events, rewrite_guarded
from .notifications import rewrite_notifications
from .push_rules import (
    OwnedRuleLeft,
    SeenRules,
    hide_in_initial_sync,
    hide_in_sliding_sync,
    hide_in_sync,
    hide_owned,
    names_owned,
    owned_overrides,
)
from .rooms import (
    rewrite_context,
    rewrite_event_relationships,
    rewrite_events_stream,
    rewrite_initial_sync,
    rewrite_messages,
    rewrite_relations,
    rewrite_room_initial_sync,
    rewrite_single_event,
    rewrite_threads,
)
from .scan import mentions_any
from .search import rewrite_search
from .sliding import rewrite_sliding_sync
from .sync import rewrite_sync
from .threads import ThreadCount, apply_thread_counts, find_thread_counts, latest_and_count
from .types import IgnoreContext, InvalidBody, Rewriter, Rewritten, SenderIgnored, StaleThread
from .versions import MSC4406_FEATURE, add_msc4406_feature

__all__ = [
    "MSC4406_FEATURE",
    "SENDER_IGNORED_CODES",
    "Guarded",
    "IgnoreContext",
    "IgnoredEventLeft",
    "InvalidBody",
    "OwnedRuleLeft",
    "Rewriter",
    "Rewritten",
    "SeenRules",
    "SenderIgnored",
    "StaleThread",
    "ThreadCount",
    "UpstreamSenderIgnored",
    "add_msc4406_feature",
    "apply_thread_counts",
    "find_thread_counts",
    "guard_body",
    "hide_in_initial_sync",
    "hide_in_sliding_sync",
    "hide_in_sync",
    "hide_owned",
    "ignored_users_from_content",
    "ignored_users_from_sliding_sync",
    "ignored_users_from_sync",
    "latest_and_count",
    "mentions_any",
    "names_owned",
    "normalise_sender_ignored",
    "owned_overrides",
    "remove_ignored_events",
    "rewrite_context",
    "rewrite_event_relationships",
    "rewrite_events_stream",
    "rewrite_guarded",
    "rewrite_initial_sync",
    "rewrite_messages",
    "rewrite_notifications",
    "rewrite_relations",
    "rewrite_room_initial_sync",
    "rewrite_search",
    "rewrite_single_event",
    "rewrite_sliding_sync",
    "rewrite_sync",
    "rewrite_threads",
]
