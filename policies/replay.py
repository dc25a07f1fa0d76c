"""Offline replay: a policy over a recorded trace → its cold-start share and loaded-idle hours.

Owns: the replay semantics (fixed, so figures compare across tools) and the sweep that
`torpor policy replay` prints. Must not read files (the CLI parses traces into `Trace`) nor
have its own copy of a policy's rule: it runs the policies' own `Plan`s, the same the live
policy loop decides with.

Semantics. Time is the trace's windows. Before window t a policy sees only windows < t; the
service is loaded or not during t; a window with calls that finds it unloaded is a cold
start (it is then loaded for that window); a loaded window without calls is loaded-idle.
Cold-start share = cold starts ÷ windows with calls; loaded-idle hours = loaded-idle
windows * window length. The calls of a window count as made at its end, so at the start of
window t a service last called in window c has been idle (t - c - 1) windows; every service
starts unloaded (its first call is a cold start).

Between two calls a policy's decision depends only on the idle time, through its Plan (the
fixed timer is `Plan(keep_alive=idle_after)`), so a gap is counted in O(1) with
`Plan.loaded_windows` instead of deciding window by window.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Iterable, Mapping, Sequence

from policies.learning import LearnedState, LearningSettings, Plan, plan
from policies.tiered import format_duration

__all__ = ["FIXED_TIMERS", "PRICES", "Row", "Trace", "duration_label", "learned_sweep",
           "replay_fixed", "replay_learned", "sweep"]

_M, _H = 60.0, 3600.0

#: The fixed timers every replay prints (seconds).
FIXED_TIMERS: tuple[float, ...] = (10 * _M, 30 * _M, 1 * _H, 2 * _H, 6 * _H, 12 * _H, 24 * _H)


@dataclasses.dataclass(frozen=True)
class Trace:
    """Services' activity per window: `services[name][t]` is True when window t had calls."""

    name: str
    window: float
    services: Mapping[str, Sequence[bool]]

    @property
    def windows(self) -> int:
        return max((len(s) for s in self.services.values()), default=0)


@dataclasses.dataclass(frozen=True)
class Row:
    """One policy setting's figures over a trace."""

    policy: str
    setting: str
    cold_start_share: float
    loaded_idle_hours: float
    windows_with_calls: int
    cold_starts: int

    def as_json(self) -> dict[str, object]:
        return {"policy": self.policy, "setting": self.setting,
                "cold_start_share": self.cold_start_share,
                "loaded_idle_hours": self.loaded_idle_hours,
                "windows_with_calls": self.windows_with_calls}


def _calls(series: Sequence[bool]) -> list[int]:
    return [t for t, busy in enumerate(series) if busy]


class _Tally:
    """Counts of one replay."""

    def __init__(self) -> None:
        self.calls = self.cold = self.idle_windows = 0

    def row(self, policy: str, setting: str, window: float) -> Row:
        share = self.cold / self.calls if self.calls else 0.0
        return Row(policy, setting, share, self.idle_windows * window / _H, self.calls, self.cold)


def replay_fixed(trace: Trace, timer: float, setting: str) -> Row:
    """The fixed timer `timer` (the tiered policy's idle_after) over `trace`."""
    keep = Plan(keep_alive=timer)
    tally = _Tally()
    for series in trace.services.values():
        calls = _calls(series)
        if not calls:
            continue
        tally.calls += len(calls)
        tally.cold += 1
        for before, after in itertools.pairwise(calls):
            _count_gap(tally, keep, after - before - 1, trace.window)
        tally.idle_windows += keep.loaded_windows(len(series) - calls[-1] - 1, trace.window)
    return tally.row("fixed", setting, trace.window)


def _count_gap(tally: _Tally, plan_: Plan, gap_windows: int, window: float) -> None:
    """A gap of `gap_windows` idle windows, then a window with calls."""
    tally.idle_windows += plan_.loaded_windows(gap_windows, window)
    if not plan_.loaded_at(gap_windows * window):
        tally.cold += 1


#: A service's plan is made again once its gaps grew by this share (and at least one gap):
#: a plan costs O(bins²), and a busy service learns a gap at nearly every call, while one
#: more gap among hundreds does not move the cheapest keep-alive.
REPLAN_GROWTH = 0.05


def replay_learned(trace: Trace, settings: LearningSettings, setting: str) -> Row:
    """The learning policy over `trace`: each service learns from its own past windows; a
    service with no gaps of its own yet plans with every service's past ones (all services
    advance through time together, so none learns from another's future)."""
    window = trace.window
    tally = _Tally()
    prior = LearnedState()
    states: dict[str, LearnedState] = {}
    plans: dict[str, tuple[Plan, float]] = {}
    # Events in time order: (window index, service); a service's next event is its next call.
    calls = {name: _calls(series) for name, series in trace.services.items()}
    heap = [(c[0], name, 0) for name, c in calls.items() if c]
    heapq.heapify(heap)
    tally.calls = sum(len(c) for c in calls.values())
    tally.cold = len(heap)  # every service's first call
    while heap:
        t, name, i = heapq.heappop(heap)
        state = states.setdefault(name, LearnedState())
        before = state.last_call
        if state.observe(t * window, (t + 1) * window) and before is not None:
            prior.add_gap(max(t * window - before, 0.0))
        own = calls[name]
        following = own[i + 1] - t - 1 if i + 1 < len(own) else len(trace.services[name]) - t - 1
        if following > 0:
            current = _current_plan(plans, name, state, prior, settings)
            tally.idle_windows += current.loaded_windows(following, window)
            if i + 1 < len(own) and not current.loaded_at(following * window):
                tally.cold += 1
        if i + 1 < len(own):
            heapq.heappush(heap, (own[i + 1], name, i + 1))
    return tally.row("learned", setting, window)


def _current_plan(plans: dict[str, tuple[Plan, float]], name: str, state: LearnedState,
                  prior: LearnedState, settings: LearningSettings) -> Plan:
    """The service's plan, made again when its gaps grew by REPLAN_GROWTH."""
    gaps = state.gaps
    made = plans.get(name)
    if made is None or gaps >= made[1] * (1 + REPLAN_GROWTH) + 1 or (gaps and not made[1]):
        made = (plan(state, prior, settings), gaps)
        plans[name] = made
    return made[0]


def learned_sweep(trace: Trace, prices: Iterable[float],
                  prewake: Iterable[bool] = (False, True)) -> list[Row]:
    """The learning policy at each cold-start price (seconds), with pre-wake off and on.
    The shortest keep-alive is 0: unloaded right after its window of calls (live, the
    shortest is one policy pass)."""
    return [replay_learned(trace, LearningSettings(cold_start_price=p, min_keep=0.0,
                                                   prewake=wake),
                           f"price={duration_label(p)}" + (",prewake" if wake else ""))
            for wake in prewake for p in prices]


def duration_label(seconds: float) -> str:
    """"10m", "1h", "24h", "2d3h": whole hours up to a day are written in hours (the
    fixed timers are named so), other durations as format_duration does."""
    if seconds <= 86400 and seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    return format_duration(seconds)


#: The learning policy's sweep: cold-start prices from 1 minute to about 10 days, x1.25 a
#: step (the frontier is jagged: a coarser grid misses settings that beat a fixed timer).
PRICES: tuple[float, ...] = tuple(_M * 1.25 ** i for i in range(0, 44))


def sweep(trace: Trace) -> list[Row]:
    """Every row `torpor policy replay` prints for `trace`: the fixed timers, then the
    learning policy's sweep."""
    rows = [replay_fixed(trace, timer, duration_label(timer)) for timer in FIXED_TIMERS]
    return rows + learned_sweep(trace, PRICES)
