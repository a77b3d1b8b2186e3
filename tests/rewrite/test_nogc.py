"""The collector is paused while a big-body rewriter runs, and only then."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from ignore_proxy.rewrite import rewrite_initial_sync, rewrite_sliding_sync, rewrite_sync
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
