"""The tiered idle policy: readable example cases, then the invariants as property tests."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from policies import Activity, Decision, PolicySettings, decide, format_duration
from torpor.call_stats import CallStats

S = 1
M = 60
H = 3600
D = 86400
NOW = 1_700_000_000.0

DEFAULT = PolicySettings(idle_after=10 * M, evict_after=24 * H, creation_grace=5 * M)


# --------------------------------------------------------------------------------------
# Examples


@dataclass(frozen=True)
class Case:
    name: str
    created_ago: float
    called_ago: float | None
    expected: Activity
    reason: str
    woken_ago: float | None = None
    policy: PolicySettings = DEFAULT


CASES = [
    Case("new, never called", 2 * M, None, Activity.ACTIVE,
         "created 2m ago (creation_grace 5m)"),
    Case("called during the grace period", 4 * M, 3 * M, Activity.ACTIVE,
         "created 4m ago (creation_grace 5m)"),
    Case("grace over, never called, not idle long enough", 7 * M, None, Activity.ACTIVE,
         "created 7m ago, never called (idle_after 10m)"),
    Case("never called since creation 12m ago", 12 * M, None, Activity.LOW,
         "idle for 12m (idle_after 10m)"),
    Case("called 30s ago", 30 * D, 30 * S, Activity.ACTIVE, "called 30s ago (idle_after 10m)"),
    Case("called just under idle_after ago", 30 * D, 10 * M - 1, Activity.ACTIVE,
         "called 9m59s ago (idle_after 10m)"),
    Case("called exactly idle_after ago", 30 * D, 10 * M, Activity.LOW,
         "idle for 10m (idle_after 10m)"),
    Case("idle for 12m", 30 * D, 12 * M, Activity.LOW, "idle for 12m (idle_after 10m)"),
    Case("idle just under evict_after", 30 * D, 24 * H - 1, Activity.LOW,
         "idle for 23h59m (idle_after 10m)"),
    Case("idle exactly evict_after", 30 * D, 24 * H, Activity.DORMANT,
         "idle for 1d (evict_after 1d)"),
    Case("idle for 3 days", 30 * D, 3 * D + 2 * H, Activity.DORMANT,
         "idle for 3d2h (evict_after 1d)"),
    Case("woken a minute ago after days of silence", 30 * D, 3 * D, Activity.ACTIVE,
         "woken 1m ago (idle_after 10m)", woken_ago=1 * M),
    Case("woken long ago, called later", 30 * D, 20 * M, Activity.LOW,
         "idle for 20m (idle_after 10m)", woken_ago=2 * H),
    Case("call stamped in the future (clock skew)", 30 * D, -30 * S, Activity.ACTIVE,
         "called 0s ago (idle_after 10m)"),
    Case("created in the future (clock skew)", -1 * M, None, Activity.ACTIVE,
         "created 0s ago (creation_grace 5m)"),
    Case("never_sleep, silent for a month", 30 * D, 30 * D, Activity.ACTIVE, "never_sleep",
         policy=PolicySettings(10 * M, 24 * H, 5 * M, never_sleep=True)),
    Case("never_sleep, brand new", 0, None, Activity.ACTIVE, "never_sleep",
         policy=PolicySettings(10 * M, 24 * H, 5 * M, never_sleep=True)),
    Case("evict_after < idle_after: still active before idle_after", 30 * D, 30 * M,
         Activity.ACTIVE, "called 30m ago (idle_after 1h)",
         policy=PolicySettings(idle_after=1 * H, evict_after=10 * M, creation_grace=0)),
    Case("evict_after < idle_after: dormant at idle_after, no low tier", 30 * D, 1 * H,
         Activity.DORMANT, "idle for 1h (evict_after 10m)",
         policy=PolicySettings(idle_after=1 * H, evict_after=10 * M, creation_grace=0)),
    Case("evict_after = idle_after: dormant at once", 30 * D, 10 * M, Activity.DORMANT,
         "idle for 10m (evict_after 10m)",
         policy=PolicySettings(idle_after=10 * M, evict_after=10 * M, creation_grace=0)),
    Case("evict_after infinite: low forever", 400 * D, 365 * D, Activity.LOW,
         "idle for 365d (idle_after 10m)",
         policy=PolicySettings(idle_after=10 * M, evict_after=math.inf, creation_grace=0)),
    Case("idle_after 0: hibernate as soon as grace is over", 1 * H, 0, Activity.LOW,
         "idle for 0s (idle_after 0s)",
         policy=PolicySettings(idle_after=0, evict_after=24 * H, creation_grace=0)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_examples(case: Case) -> None:
    stats = CallStats(created_at=NOW - case.created_ago)
    if case.called_ago is not None:
        stats.record(NOW - case.called_ago)
    woken_at = None if case.woken_ago is None else NOW - case.woken_ago
    assert decide(stats, case.policy, NOW, woken_at) == Decision(case.expected, case.reason)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.9, "0s"),
        (1, "1s"),
        (59.99, "59s"),
        (60, "1m"),
        (750, "12m30s"),
        (3600, "1h"),
        (2 * H + 5 * M + 7, "2h5m"),
        (D, "1d"),
        (D + 30, "1d"),  # the zero hours still count as one of the two units
        (D + H, "1d1h"),
        (365 * D, "365d"),
        (math.inf, "never"),
        (-90, "-1m30s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_activity_order_is_explicit() -> None:
    assert Activity.ACTIVE > Activity.LOW > Activity.DORMANT
    assert Activity.DORMANT < Activity.LOW <= Activity.LOW < Activity.ACTIVE
    assert sorted(Activity) == [Activity.DORMANT, Activity.LOW, Activity.ACTIVE]
    assert [a.rank for a in (Activity.DORMANT, Activity.LOW, Activity.ACTIVE)] == [0, 1, 2]
    assert Activity.ACTIVE.more_active_than(Activity.LOW)
    assert not Activity.LOW.more_active_than(Activity.LOW)
    with pytest.raises(TypeError):
        _ = Activity.ACTIVE < 1


def test_activity_meanings() -> None:
    assert [(a.hibernates, a.keeps_route) for a in Activity] == [
        (False, True),  # ACTIVE
        (True, True),  # LOW: scaled to zero, route kept (points at the activator)
        (True, False),  # DORMANT: scaled to zero, route dropped
    ]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"idle_after": -1},
        {"evict_after": -0.5},
        {"creation_grace": -60},
        {"idle_after": math.nan},
        {"creation_grace": True},
        {"evict_after": "24h"},
    ],
)
def test_settings_refuse_bad_durations(kwargs: dict[str, object]) -> None:
    values: dict[str, object] = {"idle_after": 600, "evict_after": 86400, "creation_grace": 300}
    values.update(kwargs)
    with pytest.raises(ValueError):
        PolicySettings(**values)  # type: ignore[arg-type]


def test_settings_allow_zero_and_infinity() -> None:
    PolicySettings(idle_after=0, evict_after=math.inf, creation_grace=0)


# --------------------------------------------------------------------------------------
# Invariants

# Times are offsets (seconds) from a fixed origin so that thresholds, calls and `now` land
# near each other often; integers hit the boundaries exactly, floats the rest.
ORIGIN = 1_700_000_000.0
offsets = st.one_of(
    st.integers(min_value=-2 * H, max_value=60 * D),
    st.floats(min_value=-2 * H, max_value=60 * D, allow_nan=False),
)
durations = st.one_of(
    st.sampled_from([0, 1, 5 * M, 10 * M, H, D]),
    st.integers(min_value=0, max_value=40 * D),
    st.floats(min_value=0, max_value=40 * D, allow_nan=False),
)
policies = st.builds(
    PolicySettings,
    idle_after=durations,
    evict_after=st.one_of(durations, st.just(math.inf)),
    creation_grace=durations,
    never_sleep=st.booleans(),
)
sleepy_policies = st.builds(
    PolicySettings,
    idle_after=durations,
    evict_after=st.one_of(durations, st.just(math.inf)),
    creation_grace=durations,
)
times = offsets.map(lambda o: ORIGIN + o)
maybe_times = st.none() | times


@st.composite
def call_stats(draw: st.DrawFn) -> CallStats:
    stats = CallStats(created_at=draw(times))
    for at, count in draw(st.lists(st.tuples(times, st.integers(1, 5)), max_size=6)):
        stats.record(at, count)
    if draw(st.booleans()):
        stats.touch(draw(times))
    return stats


def idle_of(stats: CallStats, now: float, woken_at: float | None) -> float:
    known = [t for t in (stats.created_at, stats.last_call, woken_at) if t is not None]
    return max(now - max(known), 0.0)


FAST = settings(deadline=None, max_examples=100)


@FAST
@given(call_stats(), policies, times, maybe_times)
def test_never_sleep_is_always_active(
    stats: CallStats, policy: PolicySettings, now: float, woken_at: float | None
) -> None:
    always = PolicySettings(policy.idle_after, policy.evict_after, policy.creation_grace, True)
    assert decide(stats, always, now, woken_at).activity is Activity.ACTIVE


@FAST
@given(call_stats(), policies, times, maybe_times)
def test_younger_than_creation_grace_is_active(
    stats: CallStats, policy: PolicySettings, now: float, woken_at: float | None
) -> None:
    assume(now - stats.created_at < policy.creation_grace)
    assert decide(stats, policy, now, woken_at).activity is Activity.ACTIVE


fractions = st.floats(min_value=0, max_value=1, exclude_max=True)


@FAST
@given(call_stats(), policies, maybe_times, times, fractions)
def test_called_within_idle_after_is_active(
    stats: CallStats, policy: PolicySettings, woken_at: float | None, at: float, fraction: float
) -> None:
    # (A call stamped after `now` is a call "right now": see the clock-skew test.)
    stats.touch(at)
    assert stats.last_call is not None
    now = stats.last_call + fraction * policy.idle_after
    assume(0 <= now - stats.last_call < policy.idle_after)
    assert decide(stats, policy, now, woken_at).activity is Activity.ACTIVE


@FAST
@given(call_stats(), policies, times, fractions)
def test_woken_within_idle_after_is_active(
    stats: CallStats, policy: PolicySettings, woken_at: float, fraction: float
) -> None:
    now = woken_at + fraction * policy.idle_after
    assume(0 <= now - woken_at < policy.idle_after)
    assert decide(stats, policy, now, woken_at).activity is Activity.ACTIVE


@FAST
@given(call_stats(), policies, times, maybe_times, st.floats(0.001, 2 * H))
def test_a_call_stamped_after_now_counts_as_a_call_right_now(
    stats: CallStats, policy: PolicySettings, now: float, woken_at: float | None, ahead: float
) -> None:
    skewed = CallStats(created_at=stats.created_at, last_call=now + ahead)
    right_now = CallStats(created_at=stats.created_at, last_call=now)
    assert (
        decide(skewed, policy, now, woken_at).activity
        is decide(right_now, policy, now, woken_at).activity
    )
    # The same for a wake stamped after `now`.
    assert (
        decide(stats, policy, now, now + ahead).activity
        is decide(stats, policy, now, now).activity
    )


@FAST
@given(call_stats(), policies, times, maybe_times, times, st.integers(1, 1000))
def test_another_call_never_makes_it_less_active(
    stats: CallStats,
    policy: PolicySettings,
    now: float,
    woken_at: float | None,
    at: float,
    count: int,
) -> None:
    before = decide(stats, policy, now, woken_at).activity
    stats.record(at, count)
    assert decide(stats, policy, now, woken_at).activity >= before


@FAST
@given(call_stats(), policies, times, maybe_times, times, times)
def test_later_last_call_is_never_less_active(
    stats: CallStats,
    policy: PolicySettings,
    now: float,
    woken_at: float | None,
    a: float,
    b: float,
) -> None:
    earlier, later = sorted((a, b))
    first = decide(CallStats(stats.created_at, last_call=earlier), policy, now, woken_at)
    second = decide(CallStats(stats.created_at, last_call=later), policy, now, woken_at)
    assert second.activity >= first.activity


@FAST
@given(call_stats(), policies, times, times, times)
def test_a_wake_never_makes_it_less_active(
    stats: CallStats, policy: PolicySettings, now: float, a: float, b: float
) -> None:
    earlier, later = sorted((a, b))
    unknown = decide(stats, policy, now).activity
    first = decide(stats, policy, now, earlier).activity
    second = decide(stats, policy, now, later).activity
    assert unknown <= first <= second


@FAST
@given(call_stats(), policies, maybe_times, times, times)
def test_time_passing_never_makes_it_more_active(
    stats: CallStats, policy: PolicySettings, woken_at: float | None, a: float, b: float
) -> None:
    earlier, later = sorted((a, b))
    assert decide(stats, policy, later, woken_at).activity <= decide(
        stats, policy, earlier, woken_at
    ).activity


@FAST
@given(call_stats(), sleepy_policies, times, maybe_times)
def test_tier_follows_idle_time_once_grace_is_over(
    stats: CallStats, policy: PolicySettings, now: float, woken_at: float | None
) -> None:
    assume(now - stats.created_at >= policy.creation_grace)
    idle = idle_of(stats, now, woken_at)
    activity = decide(stats, policy, now, woken_at).activity
    assert (activity is Activity.ACTIVE) == (idle < policy.idle_after)
    assert (activity is Activity.DORMANT) == (idle >= max(policy.idle_after, policy.evict_after))


@FAST
@given(call_stats(), sleepy_policies, times, maybe_times)
def test_no_low_tier_when_evict_after_is_not_after_idle_after(
    stats: CallStats, policy: PolicySettings, now: float, woken_at: float | None
) -> None:
    assume(policy.evict_after <= policy.idle_after)
    assert decide(stats, policy, now, woken_at).activity is not Activity.LOW


@FAST
@given(call_stats(), policies, times, maybe_times, st.integers(1, 10_000))
def test_only_the_last_call_time_matters_not_the_counts(
    stats: CallStats, policy: PolicySettings, now: float, woken_at: float | None, count: int
) -> None:
    # The same created_at/last_call, reached by a touch, or by one big call, decides alike.
    touched = CallStats(created_at=stats.created_at)
    counted = CallStats(created_at=stats.created_at)
    if stats.last_call is not None:
        touched.touch(stats.last_call)
        counted.record(stats.last_call, count)
    expected = decide(stats, policy, now, woken_at)
    assert decide(touched, policy, now, woken_at) == expected
    assert decide(counted, policy, now, woken_at) == expected


@FAST
@given(call_stats(), policies, times, maybe_times)
def test_decide_does_not_change_the_statistics_and_always_explains(
    stats: CallStats, policy: PolicySettings, now: float, woken_at: float | None
) -> None:
    before = copy.deepcopy(stats)
    decision = decide(stats, policy, now, woken_at)
    assert stats == before
    assert decision.reason
    if decision.activity is not Activity.ACTIVE:
        assert decision.reason.startswith("idle for ")
