"""Does a service's own keep-alive carry over from some days to others? A held-out check.

    python bench/policy_holdout.py PATH --format servegen|azure-functions

`torpor policy replay` compares online policies with fixed timers. This asks what the best
possible per-service keep-alive is worth, two ways, at each cold-start price:

  hindsight  each service gets the keep-alive that is cheapest over its whole trace
             (loaded-idle time + price per cold start): the figure per-service learning is
             often quoted with, and out of reach of any policy that only sees the past;
  held out   the keep-alive is chosen on the gaps that end on odd days and counted on those
             that end on even days, and the other way round: what a service's history says
             about days it has not seen.

When "held out" is no better than the fixed timers, a service's keep-alive does not carry
over from one day to another, and no per-service learner can reach the hindsight figure.
The replay semantics are those of `policies/replay.py` (a gap of g idle windows costs
min(g, ceil(K / window)) loaded-idle windows and is a cold start when g · window >= K).
It prints figures; it checks nothing.
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Sequence

from assembly.traces import read_trace
from policies.learning import GAP_BINS
from policies.replay import FIXED_TIMERS, Trace, duration_label, replay_fixed

PRICES = tuple(600.0 * 2 ** i for i in range(10))

#: One gap: idle windows before the next call, and the parity of that call's day.
Gap = tuple[int, int]


def gaps_of(series: Sequence[bool], per_day: int) -> tuple[int, list[Gap], Gap | None]:
    """Calls, gaps, and the idle tail after the last call (counted on its day's parity)."""
    calls = [t for t, busy in enumerate(series) if busy]
    gaps = [(b - a - 1, (b // per_day) % 2) for a, b in itertools.pairwise(calls)]
    tail = (len(series) - calls[-1] - 1, (calls[-1] // per_day) % 2) if calls else None
    return len(calls), gaps, tail


def cost(gaps: Sequence[Gap], tail: Gap | None, keep: float, window: float) -> tuple[int, int]:
    """Cold starts and loaded-idle windows of keep-alive `keep` over `gaps` (and `tail`)."""
    kept = math.ceil(keep / window) if keep > 0 else 0
    cold = sum(1 for g, _ in gaps if g * window >= keep)
    idle = sum(min(g, kept) for g, _ in gaps) + (min(tail[0], kept) if tail else 0)
    return cold, idle


def evaluate(trace: Trace, price: float, held_out: bool) -> tuple[float, float]:
    """Cold-start share and loaded-idle hours of the best per-service keep-alive."""
    per_day = max(1, round(86400 / trace.window))
    calls = cold = idle = 0
    for series in trace.services.values():
        count, gaps, tail = gaps_of(series, per_day)
        if not count:
            continue
        calls, cold = calls + count, cold + 1
        for part in (0, 1):
            train = [g for g in gaps if g[1] != part] if held_out else gaps
            test = [g for g in gaps if g[1] == part]
            test_tail = tail if tail is not None and tail[1] == part else None
            keep = min(GAP_BINS, key=lambda k: _priced(cost(train, None, k, trace.window),
                                                       price, trace.window))
            c, i = cost(test, test_tail, keep, trace.window)
            cold, idle = cold + c, idle + i
    return cold / calls, idle * trace.window / 3600


def _priced(counts: tuple[int, int], price: float, window: float) -> float:
    return counts[1] * window + counts[0] * price


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("--format", required=True, choices=("servegen", "azure-functions"))
    args = parser.parse_args(argv)
    trace = read_trace(args.path, args.format).trace
    print(f"{trace.name}: {len(trace.services)} services, {trace.windows} windows of "
          f"{duration_label(trace.window)}")
    print("fixed timers:")
    for timer in FIXED_TIMERS:
        row = replay_fixed(trace, timer, duration_label(timer))
        print(f"  {row.setting:>4}  {100 * row.cold_start_share:6.3f} %  "
              f"{row.loaded_idle_hours:9.0f} h")
    print("best per-service keep-alive, at each cold-start price:")
    print(f"  {'price':>5}  {'hindsight':>20}  {'held out':>20}")
    for price in PRICES:
        seen = evaluate(trace, price, held_out=False)
        held = evaluate(trace, price, held_out=True)
        print(f"  {duration_label(price):>5}  {100 * seen[0]:6.3f} % {seen[1]:9.0f} h  "
              f"{100 * held[0]:6.3f} % {held[1]:9.0f} h")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
