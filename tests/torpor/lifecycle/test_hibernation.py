"""The hibernation procedures with a real sqlite store, simulated replicas and a recording
push: make-before-break order, abandoning a hibernation Envoy did not apply, eviction,
start-up repair; and the policy loop that drives them, with an injected clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.configs import model_service, write_config
from tests.support.workloads import SimulatedWorkloads
from torpor.catalog import ServiceCatalog
from torpor.clock import ManualClock
from torpor.config import Config, load_config
from torpor.errors import InvalidTransitionError
from torpor.lifecycle.hibernation import Hibernation
from torpor.locks import LocalLocks
from torpor.model import ServiceRecord, ServiceState
from torpor.store.sqlite import SqliteStore
from xds_server.collector import CallCollector
from xds_server.policy_loop import PolicyLoop, policy_settings

S = ServiceState


class Table:
    """What the control plane gives the procedures: its records, apply, and push."""

    def __init__(self, workloads: SimulatedWorkloads, acked: bool = True) -> None:
        self.records: dict[str, ServiceRecord] = {}
        self.pushes: list[dict[str, ServiceState]] = []
        self.acked = acked
        self.workloads = workloads

    def apply(self, record: ServiceRecord) -> None:
        self.records[record.name] = record

    async def push(self) -> bool:
        # What Envoy would be told, and how many replicas ran when it was told.
        self.pushes.append({n: r.state for n, r in self.records.items()})
        self.scaled_at_push = list(self.workloads.calls)
        return self.acked


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[Config, SqliteStore, ManualClock]]:
    path = write_config(tmp_path, model_service("a", 2) + "    policy: {evict_after: 2h}\n" +
                        model_service("b", 1) +
                        "    never_sleep: true\n",
                        "policy: {idle_after: 10m, evict_after: 1h, creation_grace: 1m}")
    config = load_config(path)
    store = SqliteStore(tmp_path / "r.db")
    await store.open()
    yield config, store, ManualClock(start=1_000_000.0)
    await store.close()


class Reconciler:
    """The procedures and the policy loop over one table, as a control plane wires them."""

    def __init__(self, hibernation: Hibernation, policy: PolicyLoop, table: Table) -> None:
        self.hibernate = hibernation.hibernate
        self.evict = hibernation.evict
        self.check = policy.check
        self._hibernation = hibernation
        self._table = table

    async def repair(self) -> None:
        await self._hibernation.repair(self._table.records.values())


async def make(setup: tuple[Config, SqliteStore, ManualClock], acked: bool = True
               ) -> tuple[Reconciler, Table, SimulatedWorkloads, CallCollector]:
    config, store, clock = setup
    workloads = SimulatedWorkloads({"a": 0.0, "b": 0.0})
    table = Table(workloads, acked)
    collector = CallCollector(clock)
    for service in config.services:
        record = await store.put(ServiceRecord.new(service.name, service.replicas, clock.now()))
        table.apply(record)
        await workloads.scale(service.name, service.replicas)
        collector.ensure(service.name, record.created_at)
    hibernation = Hibernation(store, workloads, LocalLocks(), table, collector, clock,
                              lock_wait=5.0, on_record=table.apply)
    policy = PolicyLoop(config, ServiceCatalog(config.services), lambda: table.records,
                        collector, hibernation, clock)
    reconciler = Reconciler(hibernation, policy, table)
    return reconciler, table, workloads, collector


async def test_hibernate_points_at_activator_before_scaling_down(setup) -> None:  # type: ignore[no-untyped-def]
    reconciler, table, workloads, _ = await make(setup)
    record = await reconciler.hibernate("a", "torpor hibernate")
    assert record.state is S.HIBERNATED and record.recorded_replicas == 2
    assert table.pushes[0]["a"] is S.HIBERNATING
    assert ("a", 0) not in table.scaled_at_push  # scaled only after Envoy applied the switch
    assert workloads.calls[-1] == ("a", 0)
    stored = await setup[1].get("a")
    assert stored is not None and [t.to_state for t in stored.history] == [
        S.ACTIVE, S.HIBERNATING, S.HIBERNATED]
    with pytest.raises(InvalidTransitionError, match="only a service that is ACTIVE"):
        await reconciler.hibernate("a", "again")


async def test_hibernation_abandoned_when_envoy_does_not_apply(setup) -> None:  # type: ignore[no-untyped-def]
    reconciler, table, workloads, _ = await make(setup, acked=False)
    record = await reconciler.hibernate("a", "idle")
    assert record.state is S.ACTIVE
    assert ("a", 0) not in workloads.calls
    assert "did not apply" in record.history[-1].reason
    assert table.pushes[-1]["a"] is S.ACTIVE


async def test_evict_only_from_hibernated(setup) -> None:  # type: ignore[no-untyped-def]
    reconciler, table, _, _ = await make(setup)
    with pytest.raises(InvalidTransitionError):
        await reconciler.evict("a", "dormant")
    await reconciler.hibernate("a", "idle")
    record = await reconciler.evict("a", "dormant")
    assert record.state is S.EVICTED and table.pushes[-1]["a"] is S.EVICTED


async def test_policy_pass_follows_the_clock(setup) -> None:  # type: ignore[no-untyped-def]
    config, _, clock = setup
    reconciler, table, _, collector = await make(setup)
    await reconciler.check()
    assert table.records["a"].state is S.ACTIVE  # creation grace
    clock.advance(120)
    collector.ensure("a", 0).record(clock.now())  # called now
    await reconciler.check()
    assert table.records["a"].state is S.ACTIVE
    clock.advance(config.policy.idle_after + 1)
    await reconciler.check()
    assert table.records["a"].state is S.HIBERNATED
    assert table.records["b"].state is S.ACTIVE  # never_sleep
    clock.advance(config.policy.evict_after)  # 1h: the default, but "a" has evict_after 2h
    await reconciler.check()
    assert table.records["a"].state is S.HIBERNATED
    clock.advance(3600)
    await reconciler.check()
    assert table.records["a"].state is S.EVICTED
    assert table.records["b"].state is S.ACTIVE


async def test_per_service_overrides(setup) -> None:  # type: ignore[no-untyped-def]
    config, _, _ = setup
    a, b = (policy_settings(config, s) for s in config.services)
    assert (a.idle_after, a.evict_after, a.never_sleep) == (600, 7200, False)
    assert b.never_sleep is True


async def test_repair_makes_half_done_states_definite(setup) -> None:  # type: ignore[no-untyped-def]
    _, store, clock = setup
    reconciler, table, _, _ = await make(setup)
    halfway = await store.put(table.records["a"].with_state(S.HIBERNATING, clock.now(), "x"))
    table.apply(halfway)
    await reconciler.hibernate("b", "x")
    waking = await store.put((await store.get("b")).with_state(S.WAKING, clock.now(), "x"))  # type: ignore[union-attr]
    table.apply(waking)
    await reconciler.repair()
    assert table.records["a"].state is S.ACTIVE
    assert table.records["b"].state is S.HIBERNATED
