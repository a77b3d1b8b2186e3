"""Events hidden in less obvious places: ``original_event`` of ``/relations``,
``unsigned.redacted_because``, ``/threads`` roots, MSC4354 sticky events, sliding sync
``stripped_state``, MSC2836 ``/event_relationships``."""

from __future__ import annotations

import pytest

from ignore_proxy.rewrite import SenderIgnored, rewrite_relations
from tests.rewrite.factories import ALICE, CTX, SPAM, dumps, event, loads, state, thread_unsigned

# --- /relations: original_event ----------------------------------------------------------


@pytest.mark.parametrize("spaced", [False, True])
def test_relations_original_event_of_ignored_sender(spaced: bool) -> None:
    body = dumps({"chunk": [event(ALICE)], "original_event": event(SPAM), "next_batch": "n"})
    if spaced:  # not compact: the level-by-level path
        body = body.replace(b'"chunk":', b'"chunk": ', 1)
    with pytest.raises(SenderIgnored) as info:
        rewrite_relations(body, CTX)
    assert info.value.sender == SPAM


def test_relations_original_event_state_or_unignored_is_kept() -> None:
    for parent in (state(SPAM), event(ALICE)):
        body_obj = {"chunk": [event(SPAM), event(ALICE)], "original_event": parent}
        out = rewrite_relations(dumps(body_obj), CTX)
        assert out is not None and out.removed == 1
        assert loads(out.body)["original_event"] == parent


@pytest.mark.parametrize("spaced", [False, True])
def test_relations_original_event_thread_summary_fixed(spaced: bool) -> None:
    parent = event(ALICE, unsigned=thread_unsigned(SPAM))
    body = dumps({"chunk": [], "original_event": parent, "next_batch": "n"})
    if spaced:
        body = body.replace(b'"chunk":', b'"chunk": ', 1)
    out = rewrite_relations(body, CTX)
    assert out is not None and out.removed == 1
    assert loads(out.body) == {
        "chunk": [],
        "original_event": {**parent, "unsigned": {"age": 1234}},
        "next_batch": "n",
    }
