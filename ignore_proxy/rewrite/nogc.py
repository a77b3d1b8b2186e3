"""Running a rewriter with the cyclic garbage collector paused.

Split down to its events, a big body is tens of thousands of new dicts and lists, and
every 700 of them start a pass of the collector, some of which walk every tracked object
of the process, the more of them the more requests the proxy holds. The trees the
rewriters build hold only strings, numbers and raw bytes, so no cycle can form and
reference counting frees all of them. The collector is paused while any rewriter runs
(they may run in several threads at once) and resumes when the last one returns, unless
something else had turned it off. Rewriters that keep overlapping (a busy proxy) never
let the count fall to zero, and the rest of the process makes cyclic garbage too: a
pause ends after ``MAX_PAUSE`` seconds whatever is running, and the next starts once
none is.
"""

from __future__ import annotations

import functools
import gc
import threading
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

__all__ = ["without_gc"]

_P = ParamSpec("_P")
_R = TypeVar("_R")

MAX_PAUSE = 1.0

_lock = threading.Lock()
_running = 0
_paused = False
_paused_at = 0.0


def _enter() -> None:
    global _running, _paused, _paused_at
    with _lock:
        _running += 1
        if _running == 1 and gc.isenabled():
            gc.disable()
            _paused, _paused_at = True, time.monotonic()
        elif _paused and time.monotonic() - _paused_at > MAX_PAUSE:
            _paused = False
            gc.enable()


def _leave() -> None:
    global _running, _paused
    with _lock:
        _running -= 1
        if _paused and (_running == 0 or time.monotonic() - _paused_at > MAX_PAUSE):
            _paused = False
            gc.enable()


def without_gc(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        _enter()
        try:
            return fn(*args, **kwargs)
        finally:
            _leave()

    return run
