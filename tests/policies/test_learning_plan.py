"""The learning policy's plan and its offline replay.

`plan` must be the cheapest plan over its histogram (checked against trying every keep-alive
and window), pre-wake only on the service's own evidence, and the replay must count what a
window-by-window walk through the same plans counts.
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from policies.learning import GAP_BINS, LearnedState, LearningSettings, Plan, plan
from policies.replay import REPLAN_GROWTH, Trace, replay_fixed, replay_learned

BINS = len(GAP_BINS)


def expected_cost(plan_: Plan, counts: list[float], sums: list[float], price: float) -> float:
    """Loaded-idle time + price per cold start over a histogram whose gaps in bin j all have
    the bin's mean length (exact for the plan's edges: they are bin edges)."""
    cost = 0.0
    for count, total in zip(counts, sums, strict=True):
        if count <= 0:
            continue
        gap = total / count
        loaded = min(gap, plan_.keep_alive)
        if plan_.prewake_from is not None and plan_.prewake_until is not None:
            loaded += max(0.0, min(gap, plan_.prewake_until) - plan_.prewake_from)
        cost += count * (loaded + (0.0 if plan_.loaded_at(gap) else price))
    return cost


def every_plan(settings_: LearningSettings) -> list[Plan]:
    edges = sorted({max(edge, settings_.min_keep) for edge in GAP_BINS
                    if edge <= settings_.max_keep})
    plans = [Plan(keep) for keep in edges]
    if settings_.prewake:
        plans += [Plan(keep, a, b) for keep in edges for a in edges for b in edges
                  if keep < a < b and a > 0]
    return plans


@st.composite
def histograms(draw: st.DrawFn) -> tuple[LearnedState, list[float], list[float]]:
    """A state whose gaps sit at bin edges (so the brute force's per-bin mean is exact)."""
    state = LearnedState()
    for j in draw(st.lists(st.integers(min_value=0, max_value=BINS - 1), max_size=12)):
        state.add_gap(GAP_BINS[j], draw(st.integers(min_value=1, max_value=5)))
    return state, list(state.counts), list(state.sums)


@settings(max_examples=60, deadline=None)
@given(histograms(), st.sampled_from([60.0, 600.0, 3600.0, 86400.0]), st.booleans())
def test_the_plan_is_the_cheapest_over_the_histogram(
        drawn: tuple[LearnedState, list[float], list[float]], price: float,
        prewake: bool) -> None:
    state, counts, sums = drawn
    # No prior and no evidence threshold: the plan must be the plain optimum.
    learning = LearningSettings(cold_start_price=price, min_keep=0.0, max_keep=7 * 86400.0,
                                prewake=prewake, prior_weight=0.0, prewake_min_gaps=0.0)
    chosen = plan(state, None, learning)
    if state.gaps == 0:
        return
    best = min(expected_cost(p, counts, sums, price) for p in every_plan(learning))
    assert math.isclose(expected_cost(chosen, counts, sums, price), best, rel_tol=1e-9,
                        abs_tol=1e-6), chosen


def test_a_pre_wake_window_needs_two_of_the_services_own_gaps() -> None:
    learning = LearningSettings(cold_start_price=3600.0, min_keep=10.0)
    state = LearnedState()
    state.add_gap(600.0)
    assert plan(state, None, learning).prewake_from is None  # one gap predicts nothing
    state.add_gap(600.0)
    made = plan(state, None, learning)
    assert made.prewake_from is not None and made.prewake_until is not None
    assert made.keep_alive < made.prewake_from <= 600.0 < made.prewake_until


def test_with_no_gaps_of_its_own_a_service_keeps_about_a_quarter_of_the_price() -> None:
    made = plan(LearnedState(), None, LearningSettings(cold_start_price=4 * 3600.0))
    assert made.keep_alive > 3600.0 and made.prewake_from is None


def test_the_prior_stands_in_only_for_a_service_without_gaps() -> None:
    learning = LearningSettings(cold_start_price=3600.0, min_keep=10.0, prewake=False)
    days = LearnedState()
    days.add_gap(86400.0, 50)  # every service's gaps are a day long: keeping pays nothing
    busy = LearnedState()
    busy.add_gap(5.0, 500)
    assert plan(LearnedState(), days, learning).keep_alive == learning.min_keep
    assert plan(LearnedState(), None, learning).keep_alive >= 900.0  # price / 4
    assert plan(busy, days, learning) == plan(busy, None, learning)


def walk(series: list[bool], window: float, learning: LearningSettings) -> tuple[int, int]:
    """Cold starts and loaded-idle windows of one service, window by window, re-planning
    as the replay does (when the gaps grew by REPLAN_GROWTH)."""
    state, current, last, cold, idle, planned = LearnedState(), Plan(0.0), None, 0, 0, -1.0
    for t, called in enumerate(series):
        loaded = last is not None and current.loaded_at((t - last - 1) * window)
        if called:
            cold += not loaded
            state.observe(t * window, (t + 1) * window)
            if planned < 0 or state.gaps >= planned * (1 + REPLAN_GROWTH) + 1 or (
                    state.gaps and not planned):
                current, planned = plan(state, None, learning), state.gaps
            last = t
        elif loaded:
            idle += 1
    return cold, idle


def test_a_periodic_service_is_pre_woken_and_the_replay_counts_as_a_walk_does() -> None:
    window = 600.0
    series = [t % 12 == 0 for t in range(12 * 20)]  # a call every 2 h, one window each
    trace = Trace("periodic", window, {"p": series})
    calls = sum(series)
    with_prewake = LearningSettings(cold_start_price=4 * 3600.0, min_keep=0.0)
    without = LearningSettings(cold_start_price=600.0, min_keep=0.0, prewake=False)

    learned = replay_learned(trace, with_prewake, "x")
    cold, idle = walk(series, window, with_prewake)
    assert (learned.cold_starts, round(learned.loaded_idle_hours * 3600 / window)) == (
        cold, idle)
    # The first call and the first gaps (one gap is no pattern) are cold; then none.
    assert learned.cold_starts <= 3
    assert learned.loaded_idle_hours < replay_fixed(trace, 2 * 3600.0, "2h").loaded_idle_hours

    asleep = replay_learned(trace, without, "y")
    assert asleep.cold_starts == calls  # a cheap cold start: never kept, never pre-woken
    # Kept one window after each of its first calls (the prior), none once it has learned.
    assert asleep.loaded_idle_hours <= 3 * window / 3600
