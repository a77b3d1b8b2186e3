"""The guard on the 8 MB `/sync`, in-process: the rewrite alone, the guard alone (on the
rewritten body, where the ignored user's state events still mention them) and the two in
a row, measured in the same run so the ratios compare like with like.

    python -m benchmarks.guard_speed [--repeat N]
"""

from __future__ import annotations

import argparse
import gc
import statistics

from ignore_proxy import rewrite

from .bodies import IGNORED, USER, sync_body
from .rewrite_speed import _time


def measure(body: bytes, repeat: int = 25) -> dict[str, float]:
    ctx = rewrite.IgnoreContext(frozenset({IGNORED}), USER, True)
    result = rewrite.rewrite_sync(body, ctx)
    assert result is not None and result.removed > 0
    rewritten = result.body
    assert rewrite.mentions_any(rewritten, ctx.ignored)  # the proxy would run the guard
    assert rewrite.guard_body(rewritten, ctx) is None  # the rewriter left nothing behind

    def both() -> None:
        out = rewrite.rewrite_sync(body, ctx)
        assert out is not None
        rewrite.guard_body(out.body, ctx)

    gc.collect()
    times = {
        "rewrite": _time(lambda: rewrite.rewrite_sync(body, ctx), repeat),
        "guard": _time(lambda: rewrite.guard_body(rewritten, ctx), repeat),
        "both": _time(both, repeat),
    }
    medians = {name: statistics.median(t) for name, t in times.items()}
    out = {f"{name}_ms": m * 1000 for name, m in medians.items()}
    out |= {f"{name}_min_ms": min(t) * 1000 for name, t in times.items()}
    out["guard_ratio"] = medians["guard"] / medians["rewrite"]
    out["both_ratio"] = medians["both"] / medians["rewrite"]
    out["both_mb_s"] = len(body) / 1e6 / medians["both"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.guard_speed")
    parser.add_argument("--repeat", type=int, default=25)
    args = parser.parse_args()
    body = sync_body(8_000_000, 8)
    figures = measure(body, args.repeat)
    print(f"body {len(body) / 1e6:.1f} MB, medians of {args.repeat}, CPU time")
    for name in ("rewrite", "guard", "both"):
        print(f"  {name:8s} {figures[f'{name}_ms']:6.1f} ms (min {figures[f'{name}_min_ms']:.1f})")
    print(f"  guard / rewrite {figures['guard_ratio']:.2f}")
    print(f"  both / rewrite  {figures['both_ratio']:.2f} ({figures['both_mb_s']:.0f} MB/s)")


if __name__ == "__main__":
    main()
