"""The learning policy: each service's own keep-alive, learned from the idle gaps of its past,
and pre-wake ahead of calls its history predicts.

Owns: the learned state of one service (a histogram of its idle gaps; `LearnedState`), the
plan that state implies at a given aggressiveness (`Plan`: how long to stay loaded after a
call, and an optional pre-wake window later in the gap), and the verdict for a service at a
time (`decide`). The same functions run live (the policy loop) and offline (`policy replay`),
with the time passed in.

Must not: do I/O or read the clock. Callers feed observations (`LearnedState.observe`),
ask for a plan (`plan`) when the state changed, and decide with it as often as they like.

The rule. A gap is the idle time from the end of one burst of calls to the start of the
next (the idle a service has when its next call arrives). Staying loaded for `keep` seconds
after a call costs `min(gap, keep)` of loaded-idle time and a cold start when the gap is
`>= keep`. A pre-wake window `[a, b)` later in the gap (a > keep) adds `min(gap, b) - a`
of loaded-idle time when the gap reaches `a`, and saves the cold start when `a <= gap < b`.
With `price` = what one cold start is worth in loaded-idle seconds (the one setting a user
reads), the plan is the keep and window that minimise

    sum over past gaps of  loaded_idle(gap) + price * cold(gap)

over the service's own gaps, blended with the gaps of all services (the prior) while it
has few of its own. Gaps are kept in a fixed histogram of bins (count and sum of gaps per
bin), so a plan costs O(bins²) whatever the history's length, and the state's size is
bounded.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from policies.tiered import Activity, Decision, PolicySettings, format_duration
from torpor.call_stats import CallStats

__all__ = [
    "GAP_BINS",
    "LearnedState",
    "LearningSettings",
    "Plan",
    "decide",
    "plan",
    "pooled",
]

_M, _H, _D = 60.0, 3600.0, 86400.0

#: Lower edges of the gap histogram's bins (seconds). A gap g falls in bin j with
#: GAP_BINS[j] <= g < GAP_BINS[j + 1]; the edges are also the keep-alives and pre-wake
#: bounds a plan can choose (so a plan's cost is exact at its choices).
GAP_BINS: tuple[float, ...] = (
    0.0, 10.0, 20.0, 30.0, 45.0, 1 * _M, 2 * _M, 3 * _M, 5 * _M, 7 * _M, 10 * _M, 15 * _M,
    20 * _M, 30 * _M, 45 * _M, 1 * _H, 90 * _M, 2 * _H, 3 * _H, 4 * _H, 6 * _H, 8 * _H,
    12 * _H, 18 * _H, 1 * _D, 36 * _H, 2 * _D, 3 * _D, 4 * _D, 7 * _D, 14 * _D,
)

#: Bumped when the serialised form changes; from_dict refuses what it cannot read.
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LearningSettings:
    """The learning policy's settings.

    `cold_start_price`: what one cold start is worth in seconds of loaded-idle time (the
    aggressiveness: small → sleep early and pay cold starts, large → stay loaded). Keep-alives
    are chosen within [`min_keep`, `max_keep`]; `min_keep` is also the finest gap the policy
    can tell (live: the policy loop's period). `prior_weight` pseudo-gaps of
    `prior_share * cold_start_price` stand for "a gap longer than any seen so far may come":
    with few gaps of its own a service keeps that long, like a fixed timer. A pre-wake window
    needs at least `prewake_min_gaps` of the service's own gaps inside it.
    """

    cold_start_price: float = 2 * _H
    min_keep: float = 10.0
    max_keep: float = 7 * _D
    prewake: bool = True
    prior_weight: float = 1.0
    prior_share: float = 0.25
    prewake_min_gaps: float = 2.0

    def __post_init__(self) -> None:
        for name in ("cold_start_price", "min_keep", "max_keep", "prior_weight", "prior_share",
                     "prewake_min_gaps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, not {value!r}")
            if math.isnan(value) or value < 0 or math.isinf(value):
                raise ValueError(f"{name} must be a finite number ≥ 0, not {value!r}")
        if self.max_keep < self.min_keep:
            raise ValueError(f"max_keep {self.max_keep!r} is below min_keep {self.min_keep!r}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to do in the gap after a call: stay loaded while idle < `keep_alive`, and again
    while `prewake_from <= idle < prewake_until` (both None: no pre-wake)."""

    keep_alive: float
    prewake_from: float | None = None
    prewake_until: float | None = None

    def loaded_at(self, idle: float) -> bool:
        """Whether the plan has the service loaded when it has been idle `idle` seconds."""
        if idle < self.keep_alive:
            return True
        return self.prewake_from is not None and self.prewake_until is not None and (
            self.prewake_from <= idle < self.prewake_until)

    def in_prewake(self, idle: float) -> bool:
        """Idle time inside the pre-wake window (and past the keep-alive)."""
        return idle >= self.keep_alive and self.loaded_at(idle)

    def next_call(self, last_call: float | None) -> float | None:
        """The predicted time of the next call: the start of the pre-wake window."""
        if last_call is None or self.prewake_from is None:
            return None
        return last_call + self.prewake_from

    def loaded_windows(self, gap_windows: int, window: float) -> int:
        """How many of the `gap_windows` idle windows of a gap (idle (k-1)·window at the
        start of window k) the plan has loaded; equals counting `loaded_at` per window, in
        O(1), for the offline replay."""
        return _windows_below(self.keep_alive, gap_windows, window) + (
            0 if self.prewake_from is None or self.prewake_until is None else
            max(0, _windows_below(self.prewake_until, gap_windows, window)
                - _windows_below(self.prewake_from, gap_windows, window)
                - max(0, _windows_below(self.keep_alive, gap_windows, window)
                      - _windows_below(self.prewake_from, gap_windows, window))))


def _windows_below(limit: float, gap_windows: int, window: float) -> int:
    """#{k in 1..gap_windows : (k-1)·window < limit}."""
    if limit <= 0:
        return 0
    return min(gap_windows, math.ceil(limit / window))


@dataclasses.dataclass
class LearnedState:
    """What the policy learned about one service. Mutable: `observe` updates it.

    `counts[j]`/`sums[j]`: how many gaps fell in bin j of GAP_BINS and their total seconds.
    `last_call`: the end of the last observed burst (the start of the current gap).
    """

    counts: list[float] = dataclasses.field(default_factory=lambda: [0.0] * len(GAP_BINS))
    sums: list[float] = dataclasses.field(default_factory=lambda: [0.0] * len(GAP_BINS))
    last_call: float | None = None

    @property
    def gaps(self) -> float:
        return sum(self.counts)

    def observe(self, first: float, last: float) -> bool:
        """Calls happened from `first` to `last` (the earliest and latest call since the
        previous observation). Returns True when a gap was learned (re-plan then)."""
        if not (math.isfinite(first) and math.isfinite(last)):
            raise ValueError(f"call times must be finite, not {first!r}, {last!r}")
        first, last = min(first, last), max(first, last)
        learned = False
        if self.last_call is not None and last > self.last_call:
            self.add_gap(max(first - self.last_call, 0.0))
            learned = True
        if self.last_call is None or last > self.last_call:
            self.last_call = last
        return learned

    def add_gap(self, gap: float, weight: float = 1.0) -> None:
        j = bisect.bisect_right(GAP_BINS, gap) - 1
        self.counts[j] += weight
        self.sums[j] += gap * weight

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "counts": list(self.counts), "sums": list(self.sums),
                "last_call": self.last_call}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LearnedState:
        """Raises ValueError for a form this version cannot read."""
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"learned state format {data.get('format')!r} is not "
                             f"{FORMAT_VERSION}")
        counts = [float(x) for x in data["counts"]]
        sums = [float(x) for x in data["sums"]]
        if len(counts) != len(GAP_BINS) or len(sums) != len(GAP_BINS):
            raise ValueError("learned state has a histogram of another size")
        last = data.get("last_call")
        return cls(counts=counts, sums=sums, last_call=None if last is None else float(last))


def pooled(states: Iterable[LearnedState]) -> LearnedState:
    """All services' gaps in one histogram: the prior for services with few of their own."""
    total = LearnedState()
    for state in states:
        for j in range(len(GAP_BINS)):
            total.counts[j] += state.counts[j]
            total.sums[j] += state.sums[j]
    return total


def plan(state: LearnedState, prior: LearnedState | None, settings: LearningSettings) -> Plan:
    """The keep-alive (and pre-wake window) that minimises loaded-idle time + price * cold
    starts over the service's own gaps plus the pseudo-gap prior (see LearningSettings).
    `prior` (all services' gaps, `pooled`) stands in for the own gaps of a service that has
    none yet; blending it into services that have some measured worse on the traces (busy
    services' short gaps outnumber everything else and pull every keep-alive down)."""
    own = state if state.gaps > 0 or prior is None else prior
    counts, sums = list(own.counts), list(own.sums)
    if settings.prior_weight > 0:
        gap = min(settings.cold_start_price * settings.prior_share, settings.max_keep)
        j = bisect.bisect_right(GAP_BINS, gap) - 1
        counts[j] += settings.prior_weight
        sums[j] += gap * settings.prior_weight
    if sum(counts) <= 0:
        return Plan(keep_alive=min(max(settings.cold_start_price, settings.min_keep),
                                   settings.max_keep))
    return _cheapest(counts, sums, own.counts, settings)


def _cheapest(counts: Sequence[float], sums: Sequence[float], evidence: Sequence[float],
              settings: LearningSettings) -> Plan:
    """The keep-alive K and pre-wake window [a, b) (edges of GAP_BINS, K within
    [min_keep, max_keep], K <= a < b <= max_keep) minimising the expected cost over the
    histogram. Cost = A(K) + B(a, b), where A(K) is a keep-alive's cost when every gap from K
    on is a cold start, and B(a, b) (<= 0 when it pays) what a window changes: for gaps in
    [a, b) the cold start is saved and g - a is spent, for gaps >= b, b - a is spent.
    B does not depend on K, so the best window starting at or after each edge is a suffix
    minimum: O(bins²) in all. A window is only considered with `prewake_min_gaps` of the
    `evidence` (the service's own gap counts) inside it: one odd gap predicts nothing."""
    price = settings.cold_start_price
    n = len(GAP_BINS)
    # Prefix sums over bins: count and total of gaps below edge i.
    below_count = [0.0] * (n + 1)
    below_sum = [0.0] * (n + 1)
    seen = [0.0] * (n + 1)
    for j in range(n):
        below_count[j + 1] = below_count[j] + counts[j]
        below_sum[j + 1] = below_sum[j] + sums[j]
        seen[j + 1] = seen[j] + evidence[j]
    total = below_count[n]
    edges = [max(edge, settings.min_keep) for edge in GAP_BINS]
    usable = [settings.min_keep <= edge <= settings.max_keep or (j == 0 and edges[0]
              <= settings.max_keep) for j, edge in enumerate(GAP_BINS)]

    # best_window[i]: (B, a, b) of the cheapest window with a = edge >= i (B = 0: none).
    best_window: list[tuple[float, int, int]] = [(0.0, -1, -1)] * (n + 1)
    if settings.prewake and seen[n] >= settings.prewake_min_gaps:
        for i in range(n - 1, -1, -1):
            best = best_window[i + 1]
            # The first end with enough own gaps inside (`seen` never decreases).
            first = bisect.bisect_left(seen, seen[i] + settings.prewake_min_gaps, i + 1)
            if usable[i] and GAP_BINS[i] > 0:
                a = edges[i]
                for k in range(first, n):
                    if not usable[k]:
                        break
                    b = edges[k]
                    inside_count = below_count[k] - below_count[i]
                    inside_sum = below_sum[k] - below_sum[i]
                    value = (inside_sum - a * inside_count - price * inside_count
                             + (b - a) * (total - below_count[k]))
                    if value < best[0]:
                        best = (value, i, k)
            best_window[i] = best

    choice: tuple[float, int, tuple[float, int, int]] | None = None
    for j in range(n):
        if not usable[j]:
            continue
        keep = edges[j]
        cost_keep = below_sum[j] + (total - below_count[j]) * (keep + price)
        window = best_window[j + 1]
        cost = cost_keep + window[0]
        if choice is None or cost < choice[0]:
            choice = (cost, j, window)
    assert choice is not None
    _, j, (_, a, b) = choice
    if a < 0:
        return Plan(keep_alive=edges[j])
    return Plan(keep_alive=edges[j], prewake_from=edges[a], prewake_until=edges[b])


def decide(stats: CallStats, plan_: Plan, settings: PolicySettings, now: float,
           woken_at: float | None = None) -> Decision:
    """The verdict on a service at `now` under `plan_`: ACTIVE while its idle time is within
    the keep-alive (or the pre-wake window: then `prewake` is set, for a service that sleeps),
    DORMANT from `evict_after`, LOW otherwise. `never_sleep` and `creation_grace` first, as in
    the fixed policy."""
    if settings.never_sleep:
        return Decision(Activity.ACTIVE, "never_sleep")
    age = now - stats.created_at
    if age < settings.creation_grace:
        return Decision(Activity.ACTIVE, f"created {format_duration(max(age, 0.0))} ago "
                        f"(creation_grace {format_duration(settings.creation_grace)})",
                        keep_alive=plan_.keep_alive)
    since = stats.created_at
    if woken_at is not None and woken_at > since:
        since = woken_at
    if stats.last_call is not None and stats.last_call >= since:
        since = stats.last_call
    idle = max(now - since, 0.0)
    called = stats.last_call if stats.last_call is not None else since
    next_call = plan_.next_call(called)
    keep = format_duration(plan_.keep_alive)
    if idle < plan_.keep_alive:
        return Decision(Activity.ACTIVE, f"idle {format_duration(idle)} (learned keep-alive "
                        f"{keep})", keep_alive=plan_.keep_alive, next_call=next_call)
    if stats.last_call is not None and plan_.in_prewake(now - stats.last_call) and (
            now - stats.last_call) < settings.evict_after:
        return Decision(Activity.ACTIVE, f"call predicted at idle "
                        f"{format_duration(plan_.prewake_from or 0.0)}",
                        keep_alive=plan_.keep_alive, next_call=next_call, prewake=True)
    if idle >= settings.evict_after:
        return Decision(Activity.DORMANT, f"idle for {format_duration(idle)} "
                        f"(evict_after {format_duration(settings.evict_after)})",
                        keep_alive=plan_.keep_alive, next_call=next_call)
    return Decision(Activity.LOW, f"idle for {format_duration(idle)} (learned keep-alive "
                    f"{keep})", keep_alive=plan_.keep_alive, next_call=next_call)
