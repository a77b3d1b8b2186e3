"""The collector is paused while a big-body rewriter runs, and only then."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator

import pytest

from ignore_proxy.rewrite import nogc, rewrite_initial_sync, rewrite_sliding_sync, rewrite_sync
from ignore_proxy.rewrite.nogc import without_gc
from tests.rewrite.factories import CTX


@pytest.fixture(autouse=True)
def _gc_restored() -> Iterator[None]:
    was = gc.isenabled()
    yield
    (gc.enable if was else gc.disable)()


@pytest.mark.parametrize("rewriter", [rewrite_sync, rewrite_sliding_sync, rewrite_initial_sync])
def test_big_body_rewriters_run_without_the_collector(
    rewriter: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    real = gc.isenabled

    def decode_spy(*args: object) -> None:
        seen.append(real())
        raise ValueError("stop here")

    gc.enable()
    monkeypatch.setattr("ignore_proxy.rewrite.raw._stdlib_valid", decode_spy)
    with pytest.raises(ValueError, match="stop here"):
        rewriter(b"{not json", CTX)  # type: ignore[operator]
    assert seen == [False]
    assert gc.isenabled()  # back on, even after an exception


def test_pause_lasts_until_the_last_of_several_threads_returns() -> None:
    inside = threading.Barrier(2)
    release = threading.Event()
    order: list[str] = []

    @without_gc
    def slow() -> None:
        inside.wait()
        release.wait()

    @without_gc
    def quick() -> None:
        inside.wait()

    gc.enable()
    slow_thread = threading.Thread(target=slow)
    slow_thread.start()
    quick()
    order.append(f"quick returned, collector on: {gc.isenabled()}")
    release.set()
    slow_thread.join()
    order.append(f"slow returned, collector on: {gc.isenabled()}")
    assert order == [
        "quick returned, collector on: False",
        "slow returned, collector on: True",
    ]


def test_a_collector_turned_off_elsewhere_stays_off() -> None:
    gc.disable()
    without_gc(lambda: None)()
    assert not gc.isenabled()


def test_a_pause_ends_after_max_pause_while_rewriters_keep_overlapping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(nogc, "MAX_PAUSE", 0.3)
    entered, release = threading.Event(), threading.Event()

    @without_gc
    def long_running() -> None:
        entered.set()
        release.wait()

    gc.enable()
    holder = threading.Thread(target=long_running)
    holder.start()
    entered.wait()
    seen: list[bool] = []
    without_gc(lambda: seen.append(gc.isenabled()))()  # within the pause
    time.sleep(0.4)
    without_gc(lambda: seen.append(gc.isenabled()))()  # after it: collector back on
    collector_after = gc.isenabled()
    release.set()
    holder.join()
    assert seen == [False, True]
    assert collector_after and gc.isenabled()
