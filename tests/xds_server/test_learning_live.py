"""The learning policy live: each pass's observation, plans, the stored state (load, save
of what changed, a new leader), and the pre-wake the loop raises — with a manual clock,
sqlite, and simulated workloads."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from policies import Activity, Decision
from policies.learning import LearnedState
from tests.support.configs import model_service, write_config
from tests.support.workloads import SimulatedWorkloads
from torpor.call_stats import CallStats
from torpor.catalog import ServiceCatalog
from torpor.clock import ManualClock
from torpor.config import Config, load_config
from torpor.lifecycle.hibernation import Hibernation
from torpor.lifecycle.transitions import Event
from torpor.locks import LocalLocks
from torpor.model import Endpoint, ServiceRecord, ServiceState
from torpor.store.sqlite import SqliteStore
from xds_server import policy_loop
from xds_server.collector import CallCollector
from xds_server.learning_state import DOCUMENT_KIND, LearnedStates, first_call_since
from xds_server.policy_loop import Outlook, PolicyLoop, learning_settings, prewake_reason

S = ServiceState
T0 = 1_700_000_000.0


# --- first_call_since ------------------------------------------------------------------


def stats_with(*calls: float) -> CallStats:
    stats = CallStats(created_at=T0 - 1000)
    for at in calls:
        stats.record(at)
    return stats


def test_first_call_is_the_previous_pass_within_the_first_new_bucket() -> None:
    stats = stats_with(T0, T0 + 22.0, T0 + 23.0)
    # Previous pass at T0 + 21.5 (before the calls): the first call is after it.
    assert first_call_since(T0, stats, T0 + 21.5) == T0 + 21.5
    # A pass long before: the first new 5 s bucket (T0+20..T0+25) bounds it from below.
    assert first_call_since(T0, stats, T0 + 3.0) == T0 + 20.0
    # A pass after the calls (their access log came late): bounded by the bucket's end.
    assert first_call_since(T0, stats, T0 + 40.0) == T0 + 23.0
    # No previous pass (just loaded): the bucket's start.
    assert first_call_since(T0, stats, None) == T0 + 20.0


def test_first_call_without_buckets_uses_the_pass_time() -> None:
    stats = stats_with(T0)
    stats.touch(T0 + 30.0)  # a held request: last_call moves, no bucket yet
    assert first_call_since(T0, stats, T0 + 28.0) == T0 + 28.0
    assert first_call_since(T0, stats, None) == T0 + 30.0  # unknown: the whole gap
    assert first_call_since(None, stats, T0 + 28.0) == T0 + 30.0  # nothing before: no gap


# --- LearnedStates ---------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = SqliteStore(tmp_path / "state.db")
    await opened.open()
    yield opened
    await opened.close()


async def test_observe_learns_gaps_and_saves_only_what_changed(store: SqliteStore) -> None:
    states = LearnedStates(store)
    await states.load()
    a, b = stats_with(T0), stats_with(T0)
    assert states.observe("a", a, T0 + 1) is False  # a first call: nothing to learn from
    states.observe("b", b, T0 + 1)
    assert await states.save() == 2
    a.record(T0 + 31)
    assert states.observe("a", a, T0 + 32) is True
    assert states.observe("b", b, T0 + 32) is False  # not called: unchanged
    assert states.unsaved() == {"a"}
    assert await states.save() == 1
    assert await states.save() == 0
    stored = await store.load_documents(DOCUMENT_KIND)
    learned = LearnedState.from_dict(stored["a"])
    assert learned.gaps == 1 and learned.last_call == T0 + 31
    # The gap: from the last call to the previous pass (T0 + 1), the first-call estimate.
    assert sum(learned.sums) == pytest.approx(30.0, abs=5.0)


async def test_a_new_leader_loads_what_the_previous_one_saved(store: SqliteStore) -> None:
    old = LearnedStates(store)
    await old.load()
    stats = stats_with(T0)
    old.observe("a", stats, T0 + 1)
    for k in range(1, 4):
        stats.record(T0 + 25 * k)
        old.observe("a", stats, T0 + 25 * k + 0.5)
    await old.save()
    settings = learning_settings_for(cold_start_price=10.0, check_every=0.5)
    before = old.plan_for("a", settings, no_history_keep=600.0)

    new = LearnedStates(store)
    assert not new.loaded
    assert await new.load() == 1
    state = new.state("a")
    assert state is not None and state.gaps == 3 and state.last_call == T0 + 75
    new.refresh_prior(T0 + 100)
    old.refresh_prior(T0 + 100)
    assert new.plan_for("a", settings, no_history_keep=600.0) == old.plan_for(
        "a", settings, no_history_keep=600.0)
    assert before.keep_alive < 25.0  # regular gaps of 25 s: kept less than a gap


async def test_unreadable_document_is_skipped(store: SqliteStore) -> None:
    await store.save_documents(DOCUMENT_KIND, {"bad": {"format": 99}, "good": LearnedState(
        last_call=T0).to_dict()})
    states = LearnedStates(store)
    assert await states.load() == 1
    assert states.state("good") is not None and states.state("bad") is None


def test_without_history_the_keep_alive_is_idle_after() -> None:
    states = LearnedStates(None)
    settings = learning_settings_for(cold_start_price=7200.0, check_every=10.0)
    assert states.plan_for("a", settings, no_history_keep=600.0).keep_alive == 600.0
    assert states.plan_for("a", settings, no_history_keep=1.0).keep_alive == 10.0  # min_keep


def learning_settings_for(cold_start_price: float, check_every: float) -> Any:
    from policies.learning import LearningSettings

    return LearningSettings(cold_start_price=cold_start_price, min_keep=check_every)


# --- the loop: pre-wake ----------------------------------------------------------------


class RecordingWaker:
    """Records pre-wakes; each waits until released (a wake takes a while)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Event]] = []
        self.release = asyncio.Event()

    async def wake(self, name: str, reason: str, cause: Event = Event.WAKE
                   ) -> tuple[Endpoint, ...]:
        self.calls.append((name, reason, cause))
        await self.release.wait()
        return ()


class Records:
    def __init__(self) -> None:
        self.records: dict[str, ServiceRecord] = {}

    def apply(self, record: ServiceRecord) -> None:
        self.records[record.name] = record

    async def push(self) -> bool:
        return True


@dataclasses.dataclass
class Loop:
    loop: PolicyLoop
    records: Records
    waker: RecordingWaker
    clock: ManualClock
    collector: CallCollector
    config: Config


@pytest.fixture
async def loop(tmp_path: Path, store: SqliteStore) -> AsyncIterator[Loop]:
    services = "".join(model_service(n, 1) for n in ("h", "e", "a")) + model_service(
        "n", 1) + "    never_sleep: true\n"
    config = load_config(write_config(
        tmp_path, services, "policy: {creation_grace: 0s, check_every: 1s, "
        "cold_start_price: 10s}"))
    clock = ManualClock(start=T0)
    workloads = SimulatedWorkloads({n: 0.0 for n in "hean"})
    records = Records()
    collector = CallCollector(clock)
    for name, state in (("h", S.HIBERNATED), ("e", S.EVICTED), ("a", S.ACTIVE),
                        ("n", S.HIBERNATED)):
        record = ServiceRecord.new(name, 1, T0 - 100)
        if state is not S.ACTIVE:
            record = record.with_state(S.HIBERNATING, T0 - 99, "t").with_state(
                S.HIBERNATED, T0 - 99, "t")
        if state is S.EVICTED:
            record = record.with_state(S.EVICTED, T0 - 98, "t")
        records.apply(await store.put(record))
        collector.ensure(name, T0 - 100).record(T0 - 50)
    hibernation = Hibernation(store, workloads, LocalLocks(), records, collector, clock,
                              lock_wait=1.0, on_record=records.apply)
    waker = RecordingWaker()
    made = PolicyLoop(config, ServiceCatalog(config.services), lambda: records.records,
                      collector, hibernation, clock, waker=waker, store=store)
    yield Loop(made, records, waker, clock, collector, config)
    waker.release.set()
    await made.close()


async def test_prewake_only_for_hibernated_services(loop: Loop,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    predicted = T0 + 20

    def always_prewake(*args: Any, **kwargs: Any) -> Decision:
        return Decision(Activity.ACTIVE, "call predicted", keep_alive=5.0, next_call=predicted,
                        prewake=True)

    monkeypatch.setattr(policy_loop.learning, "decide", always_prewake)
    await loop.loop.check()
    await asyncio.sleep(0)  # the pre-wake task starts
    # Only "h": not the EVICTED "e", the ACTIVE "a", nor the never_sleep "n".
    assert loop.waker.calls == [("h", prewake_reason(predicted), Event.PREWAKE)]
    assert loop.waker.calls[0][1].startswith("pre-wake")
    assert loop.loop.prewaking("h")
    # A pass while the pre-wake runs does not start another one.
    loop.clock.advance(1)
    await loop.loop.check()
    await asyncio.sleep(0)
    assert len(loop.waker.calls) == 1
    loop.waker.release.set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert not loop.loop.prewaking("h")


async def test_prewake_off_in_the_config_raises_none(loop: Loop,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy_loop.learning, "decide", lambda *a, **k: Decision(
        Activity.ACTIVE, "call predicted", next_call=T0 + 20, prewake=True))
    off = dataclasses.replace(loop.config.policy, prewake=False)
    loop.loop._config = dataclasses.replace(loop.config, policy=off)
    assert learning_settings(loop.loop._config, loop.config.services[0]).prewake is False
    await loop.loop.check()
    await asyncio.sleep(0)
    assert loop.waker.calls == []


async def test_loop_learns_saves_and_shows_the_outlook(loop: Loop, store: SqliteStore) -> None:
    await loop.loop.check()  # loads (nothing stored), observes the first calls
    assert loop.loop.learned.loaded
    stats = loop.collector.ensure("a", T0 - 100)
    for _ in range(3):
        loop.clock.advance(25)
        stats.record(loop.clock.now())
        loop.clock.advance(0.5)
        await loop.loop.check()
    outlook = loop.loop.outlook("a")
    assert outlook.keep_alive is not None and outlook.keep_alive < 25
    assert loop.loop.outlook("n").keep_alive is None  # never_sleep: never hibernated
    await loop.loop.close()  # saves what changed
    stored = await store.load_documents(DOCUMENT_KIND)
    assert LearnedState.from_dict(stored["a"]).gaps >= 2


async def test_fixed_kind_shows_idle_after(tmp_path: Path, store: SqliteStore) -> None:
    config = load_config(write_config(tmp_path, model_service("f", 1) +
                                      "    policy: {kind: fixed}\n", "policy: {idle_after: 90s}"))
    assert config.services[0].policy.kind == "fixed" and config.policy.kind == "learned"
    clock = ManualClock(start=T0)
    collector = CallCollector(clock)
    records = Records()
    records.apply(ServiceRecord.new("f", 1, T0))
    collector.ensure("f", T0)
    workloads = SimulatedWorkloads({"f": 0.0})
    made = PolicyLoop(config, ServiceCatalog(config.services), lambda: records.records,
                      collector, Hibernation(store, workloads, LocalLocks(), records,
                                             collector, clock, lock_wait=1.0), clock)
    await made.check()
    assert made.outlook("f") == Outlook(keep_alive=90.0, next_call=None)
