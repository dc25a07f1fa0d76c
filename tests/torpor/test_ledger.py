"""The savings ledger with injected times: records built from history, no clock, no store."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from torpor.ledger import (
    DAY,
    HOUR,
    HOURLY_FOR,
    KEEP_FOR,
    Ledger,
    Savings,
    state_segments,
    total,
)
from torpor.model import ServiceRecord, ServiceState

S = ServiceState
T0 = 1_700_000_000.0 - 1_700_000_000.0 % DAY  # a midnight, so hour buckets are easy to read


def record(name: str = "echo", replicas: int = 2, at: float = T0) -> ServiceRecord:
    return ServiceRecord.new(name, replicas=replicas, now=at)


def moved(rec: ServiceRecord, *steps: tuple[float, S, str]) -> ServiceRecord:
    """`rec` after each (time, state, reason) step, as the lifecycle writes them."""
    for at, to, reason in steps:
        rec = rec.with_state(to, at, reason)
        if to is S.HIBERNATED:
            rec = dataclasses.replace(rec, desired_replicas=0)
        elif to is S.ACTIVE:
            rec = dataclasses.replace(rec, desired_replicas=rec.recorded_replicas)
    return rec


def slept(rec: ServiceRecord, at: float) -> ServiceRecord:
    return moved(rec, (at, S.HIBERNATING, "idle"), (at, S.HIBERNATED, "scaled to 0"))


def woke(rec: ServiceRecord, at: float, took: float, reason: str = "first request",
         ) -> ServiceRecord:
    return moved(rec, (at, S.WAKING, reason), (at + took, S.ACTIVE, f"{reason}; 1 ready"))


def no_calls(name: str) -> float | None:
    return None


def row(ledger: Ledger, now: float, since: float | None = None, name: str = "echo") -> Savings:
    return dict(ledger.report(now, since))[name]


def test_sleep_saves_asleep_time_times_recorded_replicas_and_a_wake_is_one_cold_start() -> None:
    ledger = Ledger(T0)
    rec = slept(record(replicas=2), T0 + 100)
    ledger.tick(T0 + 200, [rec], no_calls)
    assert row(ledger, T0 + 200).replica_seconds_saved == pytest.approx(100 * 2)

    rec = woke(rec, T0 + 400, took=3.5)
    ledger.observe(rec)  # the store listener: the cold start counts at once
    savings = row(ledger, T0 + 400)
    assert (savings.cold_starts, savings.cold_start_seconds) == (1, pytest.approx(3.5))
    ledger.tick(T0 + 500, [rec], no_calls)
    savings = row(ledger, T0 + 500)
    # Asleep from 100 until WAKING at 400, whoever ticked when.
    assert savings.replica_seconds_saved == pytest.approx(300 * 2)
    # Loaded and never called: ACTIVE before the sleep, and after the wake.
    assert savings.replica_seconds_idle == pytest.approx((100 + (500 - 403.5)) * 2)
    assert (savings.cold_starts, savings.prewakes, savings.prewakes_wasted) == (1, 0, 0)


def test_counting_is_idempotent_by_transition_time_across_a_restart() -> None:
    rec = woke(slept(record(), T0 + 10), T0 + 70, took=2.0)
    first = Ledger(T0)
    for _ in range(3):  # every write of the record is seen, and ticks see it again
        first.observe(rec)
        first.tick(T0 + 100, [rec], no_calls)
    before = row(first, T0 + 100)
    assert before.cold_starts == 1 and before.replica_seconds_saved == pytest.approx(60 * 2)

    # A restart (or a new leader): the stored documents, then the same records again.
    stored = json.loads(json.dumps(first.take_dirty()))
    second = Ledger.from_documents(stored, now=T0 + 150)
    second.observe(rec)
    second.tick(T0 + 100, [rec], no_calls)  # nothing new up to where the first one counted
    assert row(second, T0 + 100) == before
    second.tick(T0 + 200, [rec], no_calls)
    after = row(second, T0 + 200)
    assert after.cold_starts == 1
    assert after.replica_seconds_idle == pytest.approx(before.replica_seconds_idle + 100 * 2)


def test_a_tick_interval_with_a_call_is_not_idle() -> None:
    ledger = Ledger(T0)
    rec = record(replicas=3)
    calls: dict[str, float] = {}
    ledger.tick(T0 + 10, [rec], calls.get)  # no call in (0, 10]: idle
    calls["echo"] = T0 + 15.0
    ledger.tick(T0 + 20, [rec], calls.get)  # a call at 15: not idle
    ledger.tick(T0 + 30, [rec], calls.get)  # none in (20, 30]: idle
    assert row(ledger, T0 + 30).replica_seconds_idle == pytest.approx(20 * 3)


def test_a_long_tick_counts_idle_only_for_its_last_part_but_sleep_whole() -> None:
    ledger = Ledger(T0, idle_window_limit=30)
    awake, asleep = record("awake", 1), slept(record("asleep", 1), T0)
    ledger.tick(T0 + 1000, [awake, asleep], no_calls)  # e.g. the control plane was down
    assert row(ledger, T0 + 1000, name="awake").replica_seconds_idle == pytest.approx(30)
    assert row(ledger, T0 + 1000, name="asleep").replica_seconds_saved == pytest.approx(1000)


def test_prewakes_are_not_cold_starts_and_are_useful_or_wasted() -> None:
    ledger = Ledger(T0)
    calls: dict[str, float] = {}
    useful = woke(slept(record("useful"), T0 + 10), T0 + 100, 5.0, "pre-wake: call expected")
    wasted = woke(slept(record("wasted"), T0 + 10), T0 + 100, 5.0, "pre-wake: call expected")
    shifted = woke(slept(record("shifted"), T0 + 10), T0 + 100, 5.0, "version shift: v2")
    ledger.tick(T0 + 110, [useful, wasted, shifted], calls.get)
    for name in ("useful", "wasted", "shifted"):
        assert row(ledger, T0 + 110, name=name).cold_starts == 0
    assert [row(ledger, T0 + 110, name=n).prewakes for n in ("useful", "wasted")] == [1, 1]

    calls["useful"] = T0 + 120  # the predicted call came
    wasted = slept(wasted, T0 + 200)  # back to sleep without a call
    ledger.tick(T0 + 210, [useful, wasted, shifted], calls.get)
    assert row(ledger, T0 + 210, name="useful").prewakes_wasted == 0
    assert row(ledger, T0 + 210, name="wasted").prewakes_wasted == 1
    assert ledger.account("useful").pending is None  # type: ignore[union-attr]
    # Settled once: later ticks change nothing.
    ledger.tick(T0 + 220, [useful, wasted, shifted], calls.get)
    assert row(ledger, T0 + 220, name="wasted").prewakes_wasted == 1
    assert total(ledger.report(T0 + 220)).prewakes == 2


def test_a_late_call_does_not_make_a_prewake_useful() -> None:
    ledger = Ledger(T0)
    rec = woke(slept(record(), T0 + 10), T0 + 100, 1.0, "pre-wake: x")
    ledger.tick(T0 + 105, [rec], no_calls)
    rec = slept(rec, T0 + 200)
    ledger.tick(T0 + 300, [rec], {"echo": T0 + 250}.get)  # after it slept again
    assert row(ledger, T0 + 300).prewakes_wasted == 1


def test_amounts_spread_over_hour_buckets_and_since_cuts_whole_buckets() -> None:
    ledger = Ledger(T0)
    rec = slept(record(replicas=1), T0)
    now = T0 + 3 * HOUR + 1800  # 3.5 h asleep
    ledger.tick(now, [rec], no_calls)
    account = ledger.account("echo")
    assert account is not None
    assert sorted(account.buckets) == [int(T0 + h * HOUR) for h in range(4)]
    assert account.buckets[int(T0 + 3 * HOUR)].replica_seconds_saved == pytest.approx(1800)
    assert row(ledger, now).replica_seconds_saved == pytest.approx(3.5 * HOUR)
    assert row(ledger, now, since=600).replica_seconds_saved == pytest.approx(1800)
    assert row(ledger, now, since=HOUR).replica_seconds_saved == pytest.approx(HOUR + 1800)


def test_old_hours_merge_into_days_and_old_days_are_dropped_but_totals_stay() -> None:
    ledger = Ledger(T0)
    rec = slept(record(replicas=1), T0)
    now = T0 + 40 * DAY
    ledger.tick(now, [rec], no_calls)
    account = ledger.account("echo")
    assert account is not None
    days = [s for s in account.buckets if s < now - HOURLY_FOR]
    hours = [s for s in account.buckets if s >= now - HOURLY_FOR]
    assert all(s % DAY == 0 for s in days) and len(days) <= KEEP_FOR // DAY + 1
    assert len(hours) == HOURLY_FOR // HOUR
    assert min(account.buckets) >= now - KEEP_FOR - DAY
    assert row(ledger, now).replica_seconds_saved == pytest.approx(40 * DAY)  # lifetime
    week = row(ledger, now, since=7 * DAY).replica_seconds_saved
    assert 7 * DAY <= week <= 8 * DAY  # whole days beyond two days


def test_documents_round_trip_and_unreadable_ones_are_skipped(
        caplog: pytest.LogCaptureFixture) -> None:
    ledger = Ledger(T0)
    rec = woke(slept(record(), T0 + 10), T0 + 70, 2.0)
    ledger.tick(T0 + 100, [rec], no_calls)
    docs = ledger.take_dirty()
    assert ledger.take_dirty() == {}  # nothing changed since
    docs["torn"] = {"format": 1, "totals": [1, 2]}
    docs["future"] = {"format": 99}
    with caplog.at_level(logging.WARNING, logger="torpor.ledger"):
        again = Ledger.from_documents(json.loads(json.dumps(docs)), now=T0 + 100)
    assert again.names() == ["echo"]
    assert again.report(T0 + 100) == ledger.report(T0 + 100)
    assert sorted(r.__dict__["service"] for r in caplog.records
                  if r.getMessage() == "ledger.document_unreadable") == ["future", "torn"]


def test_report_rows_use_the_contract_names() -> None:
    assert Savings(1.0, 2.0, 3, 4.0, 5, 6).to_json("echo") == {
        "name": "echo", "replica_seconds_saved": 1.0, "replica_seconds_idle": 2.0,
        "cold_starts": 3, "cold_start_seconds": 4.0, "prewakes": 5, "prewakes_wasted": 6}


def test_state_segments_read_the_history() -> None:
    rec = woke(slept(record(), T0 + 10), T0 + 50, 5.0)
    assert state_segments(rec, T0, T0 + 100) == [
        (S.ACTIVE, T0, T0 + 10), (S.HIBERNATED, T0 + 10, T0 + 50),
        (S.WAKING, T0 + 50, T0 + 55), (S.ACTIVE, T0 + 55, T0 + 100)]
    assert state_segments(rec, T0 + 20, T0 + 30) == [(S.HIBERNATED, T0 + 20, T0 + 30)]
    # A history that lost its first entries: before them, the first kept entry's from_state.
    cut = dataclasses.replace(rec, history=rec.history[-2:])
    assert state_segments(cut, T0 + 40, T0 + 52) == [
        (S.HIBERNATED, T0 + 40, T0 + 50), (S.WAKING, T0 + 50, T0 + 52)]
