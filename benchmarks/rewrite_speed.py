"""Rewriting the 8 MB `/sync` body alone, in-process: the proxy's rewriter against an
orjson loads + filter + dumps of the same body."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

from ignore_proxy import rewrite

from .bodies import IGNORED, USER


def orjson_filter(body: bytes, ignored: frozenset[str]) -> bytes:
    """What a straightforward proxy does: parse all, drop ignored senders, serialise all."""
    import orjson

    data = orjson.loads(body)
    for section in ("join", "leave"):
        for room in data.get("rooms", {}).get(section, {}).values():
            timeline = room.get("timeline")
            if timeline and "events" in timeline:
                timeline["events"] = [
                    ev for ev in timeline["events"]
                    if ev.get("sender") not in ignored or "state_key" in ev
                ]  # fmt: skip
            for eph in room.get("ephemeral", {}).get("events", []):
                if eph.get("type") == "m.typing":
                    ids = eph["content"].get("user_ids", [])
                    eph["content"]["user_ids"] = [u for u in ids if u not in ignored]
    return orjson.dumps(data)


def _time(fns: tuple[Callable[[], object], ...], repeat: int) -> list[list[float]]:
    """CPU time of each function, `repeat` times, taking turns: both see the same machine."""
    for fn in fns:
        fn()  # warm up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, taken in zip(fns, times, strict=True):
            # CPU time of this thread: steadier than wall time on a shared 2-core machine.
            started = time.thread_time()
            fn()
            taken.append(time.thread_time() - started)
    return times


def measure(body: bytes, repeat: int = 15) -> dict[str, float]:
    ignored = frozenset({IGNORED})
    ctx = rewrite.IgnoreContext(ignored, USER, True)
    result = rewrite.rewrite_sync(body, ctx)
    assert result is not None and result.removed > 0
    gc.collect()
    ours, theirs = _time(
        (lambda: rewrite.rewrite_sync(body, ctx), lambda: orjson_filter(body, ignored)), repeat
    )
    mb = len(body) / 1e6
    return {
        "size_mb": mb,
        "removed": float(result.removed),
        "ours_ms": statistics.median(ours) * 1000,
        "ours_min_ms": min(ours) * 1000,
        "ours_max_ms": max(ours) * 1000,
        "orjson_ms": statistics.median(theirs) * 1000,
        "orjson_min_ms": min(theirs) * 1000,
        "orjson_max_ms": max(theirs) * 1000,
        "ours_mb_s": mb / statistics.median(ours),
        "speedup": statistics.median(theirs) / statistics.median(ours),
    }
