"""CallStats: window counts at their boundaries, bounded size, hour-of-week, serialised form."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torpor.call_stats import (
    FORMAT_VERSION,
    HOURS_PER_WEEK,
    CallStats,
    Window,
    hour_of_week,
)

MONDAY = datetime(2024, 1, 1, tzinfo=UTC).timestamp()  # Monday 2024-01-01 00:00 UTC
assert MONDAY == 1_704_067_200
DAY = 86400
# A "now" on a boundary of every bucket size (5 s, 1 min, 1 h, 1 day).
ALIGNED = MONDAY + 100 * DAY


def bucket_count(window: Window) -> int:
    return window.seconds // window.bucket


# --------------------------------------------------------------------------------------
# Windows at their boundaries (module docstring: a window covers W - size to W seconds)


@pytest.mark.parametrize("window", list(Window), ids=lambda w: w.key)
@pytest.mark.parametrize("phase", [0.0, 0.5], ids=["aligned", "mid-bucket"])
def test_window_boundaries(window: Window, phase: float) -> None:
    now = ALIGNED + phase * window.bucket
    oldest_counted_bucket_start = ALIGNED - window.seconds + window.bucket
    cases = {
        "now": (now, True),
        "start of the oldest counted bucket": (oldest_counted_bucket_start, True),
        "just before the oldest counted bucket": (oldest_counted_bucket_start - 0.001, False),
        "exactly one window before now": (now - window.seconds, False),
        "two windows before now": (now - 2 * window.seconds, False),
        "first instant of the next bucket": (ALIGNED + window.bucket, False),
    }
    for name, (at, counted) in cases.items():
        stats = CallStats(created_at=MONDAY)
        stats.record(at, 3)
        assert stats.calls_in(window, now) == (3 if counted else 0), name


def test_a_window_covers_at_least_w_minus_bucket_seconds() -> None:
    # now in the middle of a bucket: a call W - bucket seconds ago counts, one W ago not.
    now = ALIGNED + 2.5
    stats = CallStats(created_at=MONDAY)
    stats.record(now - 55)
    stats.record(now - 60)
    assert stats.calls_in(Window.MINUTE, now) == 1


def test_windows_count_independently() -> None:
    stats = CallStats(created_at=MONDAY)
    now = ALIGNED
    stats.record(now - 10)  # in every window
    stats.record(now - 2 * 60, 2)  # hour, day, long
    stats.record(now - 5 * 3600, 4)  # day, long
    stats.record(now - 3 * DAY, 8)  # long
    stats.record(now - 40 * DAY, 16)  # none
    assert stats.windows(now) == {"minute": 1, "hour": 3, "day": 7, "long": 15}
    assert stats.total == 31
    # Later, the calls age out of the windows.
    assert stats.windows(now + 2 * DAY) == {"minute": 0, "hour": 0, "day": 0, "long": 15}


@settings(deadline=None, max_examples=60)
@given(
    st.lists(
        st.tuples(st.floats(0, 40 * DAY, allow_nan=False), st.integers(1, 9)),
        max_size=40,
    ),
    st.floats(0, 3 * DAY, allow_nan=False),
)
def test_window_counts_match_a_brute_force_count(
    calls: list[tuple[float, int]], later: float
) -> None:
    # In any order (out-of-order log entries included), pruning never loses what a window
    # still covers.
    stats = CallStats(created_at=MONDAY)
    for offset, count in calls:
        stats.record(MONDAY + offset, count)
    newest = max((MONDAY + o for o, _ in calls), default=MONDAY)
    now = newest + later
    for window in Window:
        # The module's rule, in exact integer arithmetic: a call counts iff its bucket
        # floor(t / size) is in first..last.
        first = math.floor(now - window.seconds) // window.bucket + 1
        last = math.floor(now) // window.bucket
        expected = sum(
            n for o, n in calls if first <= math.floor(MONDAY + o) // window.bucket <= last
        )
        assert stats.calls_in(window, now) == expected, window


# --------------------------------------------------------------------------------------
# Bounded size


def assert_bounded(stats: CallStats) -> None:
    for window in Window:
        assert len(stats.buckets[window.key]) <= bucket_count(window), window
    assert len(stats.by_hour_of_week) == HOURS_PER_WEEK


def test_size_stays_bounded_over_a_long_period() -> None:
    rng = random.Random(7)
    stats = CallStats(created_at=MONDAY)
    at = MONDAY
    calls = 0
    end = MONDAY + 120 * DAY
    while at < end:
        at += rng.expovariate(1 / 400)  # a call every ~400 s for 120 days
        stats.record(at)
        calls += 1
        assert_bounded(stats)
    assert stats.total == calls
    assert sum(stats.by_hour_of_week) == calls
    assert stats.windows(at)["long"] > 0


def test_late_entries_arriving_oldest_last_do_not_grow_the_buckets() -> None:
    # A collector replaying a backlog newest-first: every entry is older than the last one.
    stats = CallStats(created_at=MONDAY)
    newest = MONDAY + 200 * DAY
    stats.record(newest)
    for k in range(1, 2000):
        stats.record(newest - k * 3601)
        assert_bounded(stats)
    assert stats.last_call == newest


# --------------------------------------------------------------------------------------
# Hour of the week


def test_hour_of_week_known_times() -> None:
    assert hour_of_week(MONDAY) == 0
    assert hour_of_week(MONDAY + 59 * 60) == 0
    assert hour_of_week(MONDAY + 3600) == 1
    sunday_2330 = datetime(2024, 1, 7, 23, 30, tzinfo=UTC).timestamp()
    assert hour_of_week(sunday_2330) == 167
    assert hour_of_week(sunday_2330 + 30 * 60) == 0  # the next Monday 00:00
    assert hour_of_week(0) == 3 * 24  # 1970-01-01 was a Thursday
    assert hour_of_week(-1) == 3 * 24 - 1  # Wednesday 23:59:59
    assert hour_of_week(-5e-324) == 3 * 24 - 1  # not rounded up into Thursday
    just_before_an_hour = math.nextafter(MONDAY + 3600, 0)
    assert hour_of_week(just_before_an_hour) == 0


@settings(deadline=None, max_examples=100)
@given(st.floats(min_value=-1e9, max_value=4e9, allow_nan=False))
def test_hour_of_week_agrees_with_datetime(at: float) -> None:
    moment = datetime.fromtimestamp(math.floor(at), tz=UTC)
    assert hour_of_week(at) == moment.weekday() * 24 + moment.hour


def test_record_counts_into_the_hour_of_the_week() -> None:
    stats = CallStats(created_at=MONDAY)
    stats.record(MONDAY + 30, 2)
    stats.record(MONDAY + 6 * DAY + 23.5 * 3600, 5)
    assert stats.by_hour_of_week[0] == 2
    assert stats.by_hour_of_week[167] == 5
    assert sum(stats.by_hour_of_week) == 7


# --------------------------------------------------------------------------------------
# last_call, touch, record


def test_touch_moves_last_call_without_counting() -> None:
    stats = CallStats(created_at=MONDAY)
    stats.touch(MONDAY + 100)
    assert stats.last_call == MONDAY + 100
    assert stats.total == 0
    assert stats.windows(MONDAY + 100) == {"minute": 0, "hour": 0, "day": 0, "long": 0}
    assert sum(stats.by_hour_of_week) == 0
    stats.touch(MONDAY + 50)  # older: ignored
    assert stats.last_call == MONDAY + 100


def test_an_older_record_counts_but_does_not_move_last_call_back() -> None:
    stats = CallStats(created_at=MONDAY)
    stats.record(MONDAY + 1000)
    stats.record(MONDAY + 400, 2)
    assert stats.last_call == MONDAY + 1000
    assert stats.total == 3
    assert stats.calls_in(Window.HOUR, MONDAY + 1000) == 3
    stats.record(MONDAY + 2000)
    assert stats.last_call == MONDAY + 2000


@pytest.mark.parametrize("count", [0, -3])
def test_record_ignores_non_positive_counts(count: int) -> None:
    stats = CallStats(created_at=MONDAY)
    stats.record(MONDAY + 10, count)
    assert stats == CallStats(created_at=MONDAY)


@pytest.mark.parametrize("at", [math.nan, math.inf, -math.inf])
def test_non_finite_times_are_refused_before_anything_changes(at: float) -> None:
    stats = CallStats(created_at=MONDAY)
    stats.record(MONDAY + 10)
    before = CallStats.from_dict(stats.to_dict())
    with pytest.raises(ValueError):
        stats.record(at)
    with pytest.raises(ValueError):
        stats.touch(at)
    assert stats == before


# --------------------------------------------------------------------------------------
# Serialised form

times = st.floats(min_value=0, max_value=4e9, allow_nan=False)


@st.composite
def call_stats(draw: st.DrawFn) -> CallStats:
    stats = CallStats(created_at=draw(times))
    for at, count in draw(st.lists(st.tuples(times, st.integers(1, 10**6)), max_size=12)):
        stats.record(at, count)
    if draw(st.booleans()):
        stats.touch(draw(times))
    return stats


@settings(deadline=None, max_examples=100)
@given(call_stats())
def test_round_trip_through_json(stats: CallStats) -> None:
    data = json.loads(json.dumps(stats.to_dict()))
    assert data["format"] == FORMAT_VERSION
    again = CallStats.from_dict(data)
    assert again == stats
    assert again.to_dict() == stats.to_dict()


def test_from_dict_copies_instead_of_sharing() -> None:
    stats = CallStats(created_at=MONDAY)
    data = stats.to_dict()
    again = CallStats.from_dict(data)
    again.record(MONDAY + 5)
    assert data["by_hour_of_week"] == [0] * HOURS_PER_WEEK
    assert stats.total == 0


@pytest.mark.parametrize("version", [None, 0, FORMAT_VERSION + 1, "1"])
def test_from_dict_refuses_unknown_format_versions(version: object) -> None:
    data = CallStats(created_at=MONDAY).to_dict()
    if version is None:
        del data["format"]
    else:
        data["format"] = version
    with pytest.raises(ValueError, match="format"):
        CallStats.from_dict(data)


def test_from_dict_refuses_a_week_of_the_wrong_length() -> None:
    data = CallStats(created_at=MONDAY).to_dict()
    data["by_hour_of_week"] = [0] * 24
    with pytest.raises(ValueError, match="by_hour_of_week"):
        CallStats.from_dict(data)
