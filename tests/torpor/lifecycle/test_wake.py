"""The waker against a real sqlite store and simulated replicas: one wake however many
ask, the recorded count restored, failures leave the service HIBERNATED."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.support.net import wait_until
from tests.support.workloads import SimulatedWorkloads
from torpor.errors import UnknownServiceError, WakeFailedError
from torpor.lifecycle.transitions import Event
from torpor.lifecycle.wake import Waker, reason_for
from torpor.locks import LocalLocks, lock_key
from torpor.model import ServiceRecord, ServiceState
from torpor.store.sqlite import SqliteStore
from torpor.wake_settings import WakeSettings

S = ServiceState


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "state.db")
    await s.open()
    yield s
    await s.close()


async def sleeping(store: SqliteStore, name: str, recorded: int,
                   state: ServiceState = S.HIBERNATED) -> ServiceRecord:
    record = ServiceRecord.new(name, recorded, 1000.0)
    record = record.with_state(S.HIBERNATING, 1001.0, "test")
    record = dataclasses.replace(record.with_state(S.HIBERNATED, 1002.0, "test"),
                                 recorded_replicas=recorded)
    if state is S.EVICTED:
        record = record.with_state(S.EVICTED, 1003.0, "test")
    return await store.put(record)


async def test_many_requests_one_wake_restores_recorded_count(store: SqliteStore) -> None:
    await sleeping(store, "m", recorded=3)
    workloads = SimulatedWorkloads({"m": 0.2})
    waker = Waker(store, workloads, LocalLocks(), wake_timeout=5)
    results = await asyncio.gather(*(waker.wake("m", "first request") for _ in range(50)))
    assert workloads.calls == [("m", 3)]
    assert all(len(r) == 3 for r in results)
    record = await store.get("m")
    assert record is not None and record.state is S.ACTIVE
    assert record.desired_replicas == 3
    assert [t.to_state for t in record.history][-2:] == [S.WAKING, S.ACTIVE]
    assert not waker.waking("m")
    # Awake: a later call returns the endpoints without another wake.
    assert len(await waker.wake("m", "again")) == 3
    assert workloads.calls == [("m", 3)]


async def test_evicted_service_wakes_through_waking(store: SqliteStore) -> None:
    await sleeping(store, "e", recorded=1, state=S.EVICTED)
    waker = Waker(store, SimulatedWorkloads({"e": 0.0}), LocalLocks(), wake_timeout=5)
    await waker.wake("e", "first request")
    record = await store.get("e")
    assert record is not None
    assert [t.to_state for t in record.history][-3:] == [S.EVICTED, S.WAKING, S.ACTIVE]


async def test_first_ready_vs_all_ready(store: SqliteStore) -> None:
    await sleeping(store, "f", recorded=2)
    workloads = SimulatedWorkloads({"f": 0.05})
    ready = await Waker(store, workloads, LocalLocks(), wake_timeout=5,
                        flip_when="all_ready").wake("f", "x")
    assert len(ready) == 2


async def test_never_ready_times_out_back_to_hibernated_and_retries(store: SqliteStore) -> None:
    await sleeping(store, "n", recorded=2)
    workloads = SimulatedWorkloads({"n": None})
    waker = Waker(store, workloads, LocalLocks(), wake_timeout=0.3)
    results = await asyncio.gather(*(waker.wake("n", "r") for _ in range(5)),
                                   return_exceptions=True)
    assert all(isinstance(r, WakeFailedError) and r.outcome == "timeout" for r in results)
    record = await store.get("n")
    assert record is not None and record.state is S.HIBERNATED
    assert workloads.calls == [("n", 2), ("n", 0)]
    with pytest.raises(WakeFailedError):
        await waker.wake("n", "later request")
    assert workloads.calls == [("n", 2), ("n", 0), ("n", 2), ("n", 0)]


async def test_a_caller_that_gives_up_does_not_cancel_the_wake(store: SqliteStore) -> None:
    await sleeping(store, "c", recorded=1)
    waker = Waker(store, SimulatedWorkloads({"c": 0.3}), LocalLocks(), wake_timeout=5)
    impatient = asyncio.create_task(waker.wake("c", "r"))
    await asyncio.sleep(0)  # let it start the wake
    patient = asyncio.create_task(waker.wake("c", "r"))
    impatient.cancel()
    assert len(await asyncio.wait_for(patient, 5)) == 1
    assert impatient.cancelled()


async def test_wake_waits_for_the_service_lock(store: SqliteStore) -> None:
    await sleeping(store, "l", recorded=1)
    locks = LocalLocks()
    waker = Waker(store, SimulatedWorkloads({"l": 0.0}), locks, wake_timeout=5)
    async with locks.hold(lock_key("l"), 1):
        task = asyncio.create_task(waker.wake("l", "r"))
        await asyncio.sleep(0.05)
        assert not task.done()
        record = await store.get("l")
        assert record is not None and record.state is S.HIBERNATED
    assert len(await asyncio.wait_for(task, 5)) == 1


async def test_lock_not_free_in_time_fails_cleanly(store: SqliteStore) -> None:
    await sleeping(store, "t", recorded=1)
    locks = LocalLocks()
    waker = Waker(store, SimulatedWorkloads({"t": 0.0}), locks, wake_timeout=0.2)
    async with locks.hold(lock_key("t"), 1):
        with pytest.raises(WakeFailedError) as failed:
            await waker.wake("t", "r")
    assert failed.value.outcome == "failed"
    record = await store.get("t")
    assert record is not None and record.state is S.HIBERNATED


async def test_unknown_service(store: SqliteStore) -> None:
    waker = Waker(store, SimulatedWorkloads({}), LocalLocks(), wake_timeout=1)
    with pytest.raises(UnknownServiceError):
        await waker.wake("ghost", "r")


async def test_a_wake_takes_over_a_hibernation_a_crash_left_half_done(
        store: SqliteStore) -> None:
    """HIBERNATING under a free lock: its hibernator is gone. The wake goes through WAKING
    like any other (the table's HIBERNATING/WAKE row)."""
    record = ServiceRecord.new("h", 2, 1000.0)
    await store.put(record.with_state(S.HIBERNATING, 1001.0, "crashed half-way"))
    workloads = SimulatedWorkloads({"h": 0.0})
    await Waker(store, workloads, LocalLocks(), wake_timeout=5).wake("h", "first request")
    stored = await store.get("h")
    assert stored is not None and stored.state is S.ACTIVE
    assert [t.to_state for t in stored.history][-3:] == [S.HIBERNATING, S.WAKING, S.ACTIVE]
    assert workloads.calls == [("h", 2)]


async def test_prewake_wakes_a_sleeping_service_and_leaves_an_awake_one_alone(
        store: SqliteStore) -> None:
    await sleeping(store, "p", recorded=2)
    workloads = SimulatedWorkloads({"p": 0.0})
    waker = Waker(store, workloads, LocalLocks(), wake_timeout=5)
    assert len(await waker.wake("p", "predicted call", cause=Event.PREWAKE)) >= 1
    stored = await store.get("p")
    assert stored is not None and stored.state is S.ACTIVE
    await waker.wake("p", "predicted call", cause=Event.PREWAKE)
    assert workloads.calls == [("p", 2)]  # awake: no second scale


async def test_a_prewake_writes_its_reason_starting_with_pre_wake(store: SqliteStore) -> None:
    """torpor/ledger.py tells a pre-wake from a cold start by this prefix."""
    await sleeping(store, "p", recorded=1)
    await sleeping(store, "q", recorded=1)
    waker = Waker(store, SimulatedWorkloads({"p": 0.0, "q": 0.0}), LocalLocks(), wake_timeout=5)
    await waker.wake("p", "predicted call", cause=Event.PREWAKE)
    await waker.wake("q", "first request")
    p, q = await store.get("p"), await store.get("q")
    assert p is not None and q is not None
    assert [t.reason.split(";")[0] for t in p.history[-2:]] == ["pre-wake: predicted call"] * 2
    assert [t.reason.split(";")[0] for t in q.history[-2:]] == ["first request"] * 2
    assert reason_for("pre-wake: x", Event.PREWAKE) == "pre-wake: x"
    assert reason_for("shift", Event.VERSION_SHIFT) == "version shift: shift"


async def test_prewake_leaves_an_evicted_service_evicted(store: SqliteStore) -> None:
    await sleeping(store, "e", recorded=1, state=S.EVICTED)
    workloads = SimulatedWorkloads({"e": 0.0})
    waker = Waker(store, workloads, LocalLocks(), wake_timeout=5)
    assert await waker.wake("e", "pre-wake: call predicted", cause=Event.PREWAKE) == ()
    stored = await store.get("e")
    assert stored is not None and stored.state is S.EVICTED
    assert workloads.calls == []


# --- per-service wake settings and groups ---------------------------------------------------


def own_settings(**by_name: WakeSettings) -> Callable[[str], WakeSettings]:
    return lambda name: by_name.get(name, WakeSettings(5.0, 100))


async def test_activation_replicas_answer_after_the_first_and_start_the_rest(
        store: SqliteStore) -> None:
    await sleeping(store, "big", recorded=3)
    workloads = SimulatedWorkloads({"big": 0.05})
    waker = Waker(store, workloads, LocalLocks(), wake_timeout=5, flip_when="all_ready",
                  settings=own_settings(big=WakeSettings(5.0, 100, activation_replicas=1)))
    ready = await waker.wake("big", "first request")
    assert len(ready) == 1  # answered once the one activation replica was ready
    assert workloads.calls == [("big", 1), ("big", 3)]  # then the rest, to the recorded count
    record = await store.get("big")
    assert record is not None and record.state is S.ACTIVE
    assert (record.desired_replicas, record.recorded_replicas) == (3, 3)


async def test_a_service_s_own_wake_timeout_applies(store: SqliteStore) -> None:
    await sleeping(store, "slow", recorded=1)
    await sleeping(store, "quick", recorded=1)
    workloads = SimulatedWorkloads({"slow": 0.6, "quick": 0.6})
    waker = Waker(store, workloads, LocalLocks(), wake_timeout=0.3,
                  settings=own_settings(slow=WakeSettings(5.0, 100),
                                        quick=WakeSettings(0.3, 100)))
    assert len(await waker.wake("slow", "r")) == 1  # 0.6 s: within its own 5 s
    with pytest.raises(WakeFailedError, match=r"within 0.3s"):
        await waker.wake("quick", "r")


async def test_one_wake_wakes_the_whole_group_each_from_its_recorded_count(
        store: SqliteStore) -> None:
    for name, recorded in (("a", 1), ("b", 2), ("c", 3), ("alone", 1)):
        await sleeping(store, name, recorded=recorded)
    workloads = SimulatedWorkloads({"a": 0.05, "b": 0.1, "c": 0.1, "alone": 0.0})
    group = {"a": ("b", "c"), "b": ("a", "c"), "c": ("a", "b")}
    waker = Waker(store, workloads, LocalLocks(), wake_timeout=5,
                  members=lambda name: group.get(name, ()))
    await waker.wake("a", "first request")
    await wait_until(lambda: not waker.waking("b") and not waker.waking("c"), 5, "members")
    for name, recorded in (("a", 1), ("b", 2), ("c", 3)):
        record = await store.get(name)
        assert record is not None and record.state is S.ACTIVE, name
        assert workloads.desired_replicas(name) == recorded
    b = await store.get("b")
    assert b is not None and "woken with a" in b.history[-2].reason
    alone = await store.get("alone")
    assert alone is not None and alone.state is S.HIBERNATED
    # Awake already: a later wake of one member wakes nobody again.
    calls = len(workloads.calls)
    await waker.wake("b", "again")
    assert len(workloads.calls) == calls
    await waker.close()
