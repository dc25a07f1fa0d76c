"""Invariants of the learning policy, the loop's pre-wake mapping and the fixed timer, as
property tests: whatever the learned gaps, settings and times."""

from __future__ import annotations

import math

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from policies import Activity, Decision, PolicySettings
from policies import decide as fixed_decide
from policies.learning import GAP_BINS, LearnedState, LearningSettings, Plan, decide, plan
from torpor.call_stats import CallStats
from torpor.model import ServiceState
from xds_server.policy_loop import prewake_wanted

NOW = 1_700_000_000.0

gaps = st.lists(st.floats(min_value=0.0, max_value=30 * 86400.0), max_size=40)
durations = st.floats(min_value=0.0, max_value=10 * 86400.0)


@st.composite
def learned_plans(draw: st.DrawFn) -> Plan:
    state = LearnedState()
    for gap in draw(gaps):
        state.add_gap(gap)
    prior = LearnedState()
    for gap in draw(gaps):
        prior.add_gap(gap)
    learning = LearningSettings(
        cold_start_price=draw(st.floats(min_value=0.0, max_value=86400.0)),
        min_keep=draw(st.sampled_from([0.25, 1.0, 10.0, 30.0])),
        prewake=draw(st.booleans()))
    return plan(state, draw(st.none() | st.just(prior)), learning)


@st.composite
def policy_settings(draw: st.DrawFn, never_sleep: bool | None = None) -> PolicySettings:
    return PolicySettings(
        idle_after=draw(durations), evict_after=draw(durations | st.just(math.inf)),
        creation_grace=draw(durations),
        never_sleep=draw(st.booleans()) if never_sleep is None else never_sleep)


@settings(max_examples=300)
@given(learned_plans(), policy_settings(never_sleep=False),
       st.floats(min_value=0.0, max_value=1.0), st.floats(min_value=0.0, max_value=30 * 86400.0),
       st.none() | st.floats(min_value=0.0, max_value=1.0))
def test_called_within_the_keep_alive_is_never_hibernated(
        plan_: Plan, policy: PolicySettings, within: float, age: float,
        woken: float | None) -> None:
    last_call = NOW - within * plan_.keep_alive
    assume(NOW - last_call < plan_.keep_alive)  # within, as the policy computes it
    stats = CallStats(created_at=min(last_call, NOW - age))
    stats.record(last_call)
    woken_at = None if woken is None else last_call - woken * 3600
    verdict = decide(stats, plan_, policy, NOW, woken_at)
    assert verdict.activity is Activity.ACTIVE


@settings(max_examples=300)
@given(learned_plans(), policy_settings(never_sleep=False),
       st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
       st.none() | st.floats(min_value=0.0, max_value=30 * 86400.0))
def test_younger_than_creation_grace_is_never_hibernated(
        plan_: Plan, policy: PolicySettings, young: float, ago: float | None) -> None:
    assume(policy.creation_grace > 0)
    created = NOW - young * policy.creation_grace
    assume(NOW - created < policy.creation_grace)  # younger, as the policy computes it
    stats = CallStats(created_at=created)
    if ago is not None:
        stats.touch(min(created, NOW - ago))  # a last call before it was even registered
    assert decide(stats, plan_, policy, NOW).activity is Activity.ACTIVE
    assert fixed_decide(stats, policy, NOW).activity is Activity.ACTIVE


@settings(max_examples=300)
@given(learned_plans(), policy_settings(never_sleep=True),
       st.floats(min_value=0.0, max_value=60 * 86400.0),
       st.none() | st.floats(min_value=0.0, max_value=60 * 86400.0))
def test_never_sleep_wins(plan_: Plan, policy: PolicySettings, age: float,
                          ago: float | None) -> None:
    stats = CallStats(created_at=NOW - age)
    if ago is not None:
        stats.touch(NOW - min(ago, age))
    for verdict in (decide(stats, plan_, policy, NOW), fixed_decide(stats, policy, NOW)):
        assert verdict.activity is Activity.ACTIVE
        for state in ServiceState:
            assert not prewake_wanted(state, verdict, never_sleep=True)


@given(st.sampled_from(list(ServiceState)), st.sampled_from(list(Activity)), st.booleans(),
       st.booleans(), st.booleans())
def test_prewake_only_for_a_hibernated_service_that_may_sleep(
        state: ServiceState, activity: Activity, prewake: bool, never_sleep: bool,
        enabled: bool) -> None:
    verdict = Decision(activity, "x", keep_alive=1.0, next_call=NOW, prewake=prewake)
    wanted = prewake_wanted(state, verdict, never_sleep, enabled)
    if state is ServiceState.EVICTED or never_sleep or not enabled or not prewake:
        assert not wanted
    assert wanted == (state is ServiceState.HIBERNATED and prewake and not never_sleep
                      and enabled)


edges = st.sampled_from(GAP_BINS) | st.integers(min_value=0, max_value=40 * 86400).map(float)


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    keep = draw(edges)
    if draw(st.booleans()):
        return Plan(keep_alive=keep)
    start = draw(edges)
    end = draw(edges)
    return Plan(keep_alive=keep, prewake_from=min(start, end), prewake_until=max(start, end))


@settings(max_examples=500)
@given(plans(), st.integers(min_value=0, max_value=5000),
       st.sampled_from([1, 5, 10, 60, 300, 600, 3600, 86400]))
def test_loaded_windows_counts_loaded_at_each_window(plan_: Plan, gap_windows: int,
                                                     window: int) -> None:
    counted = sum(1 for k in range(1, gap_windows + 1) if plan_.loaded_at((k - 1) * window))
    assert plan_.loaded_windows(gap_windows, window) == counted


@settings(max_examples=500)
@given(policy_settings(never_sleep=False), st.floats(min_value=0.0, max_value=60 * 86400.0),
       st.none() | st.floats(min_value=0.0, max_value=1.0))
def test_fixed_timer_is_a_plan_with_keep_alive_idle_after(
        policy: PolicySettings, idle: float, called: float | None) -> None:
    # Old enough for the grace not to matter; the latest sign of life `idle` seconds ago.
    since = NOW - idle
    idle = NOW - since  # as the policy computes it (floating point)
    if called is not None:
        stats = CallStats(created_at=since - policy.creation_grace - 1.0)
        stats.touch(since)
    else:  # never called: the creation is the sign of life
        stats = CallStats(created_at=since)
        assume(idle >= policy.creation_grace)
    verdict = fixed_decide(stats, policy, NOW)
    assert (verdict.activity is Activity.ACTIVE) == Plan(
        keep_alive=policy.idle_after).loaded_at(idle)
