"""Assertions shared by the e2e tests."""

from __future__ import annotations

import httpx

SENDER_IGNORED = "M_SENDER_IGNORED"
# MSC4406's unstable code; the proxy can be configured to emit it instead.
SENDER_IGNORED_UNSTABLE = "UK.TIMEDOUT.MSC4406.SENDER_IGNORED"


def assert_sender_ignored(resp: httpx.Response, sender: str) -> None:
    """The MSC4406 answer: 404 M_SENDER_IGNORED naming the sender."""
    assert resp.status_code == 404, f"{resp.status_code} {resp.text}"
    body = resp.json()
    assert body.get("errcode") == SENDER_IGNORED, body
    assert body.get("sender") == sender, body
    assert isinstance(body.get("error"), str), body


def assert_hidden_by_stock_synapse(
    resp: httpx.Response, sender: str, synapse_status: set[int]
) -> None:
    """Stock Synapse hid the event itself and never tells who sent it.

    The proxy may pass Synapse's own error through or turn it into MSC4406's shape; it
    must not leak the event. If it names a sender, that must be the right one.
    """
    assert resp.status_code in synapse_status | {404}, f"{resp.status_code} {resp.text}"
    body = resp.json()
    assert "errcode" in body, body
    assert "event" not in body and "chunk" not in body, body
    if body["errcode"] in (SENDER_IGNORED, SENDER_IGNORED_UNSTABLE):
        assert resp.status_code == 404, body
        assert body.get("sender", sender) == sender, body
