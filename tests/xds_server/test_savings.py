"""The live savings ledger (xds_server/savings.py) over a real sqlite store with a manual
clock, and the Report RPC through the real admin server and the CLI's client."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.etcd import EtcdServer
from tests.torpor.test_etcd_store import opened_store
from tests.xds_server.test_admin_api import FakeAdmin
from torpor import admin_client
from torpor.admin_client import AdminError
from torpor.clock import ManualClock
from torpor.errors import StoreError
from torpor.ledger import DOCUMENT_KIND, Savings
from torpor.model import ServiceRecord, ServiceState
from torpor.report import format_duration, format_report_table, report_json
from torpor.store.base import Store
from torpor.store.sqlite import SqliteStore
from xds_server.admin_api import start_admin_server
from xds_server.savings import SavingsKeeper

S = ServiceState
T0 = 1_700_000_000.0


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "state.db")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


class Fleet:
    """What a SavingsKeeper reads from its control plane: records, last calls, leadership."""

    def __init__(self) -> None:
        self.clock = ManualClock(T0)
        self.records: dict[str, ServiceRecord] = {}
        self.calls: dict[str, float] = {}
        self.leading = True

    def keeper(self, store: Store) -> SavingsKeeper:
        return SavingsKeeper(store, lambda: self.records, self.calls.get, self.clock,
                             lambda: self.leading, tick_every=10.0, save_every=30.0)

    def move(self, name: str, to: S, reason: str = "idle", **changes: int) -> ServiceRecord:
        record = self.records[name].with_state(to, self.clock.now(), reason)
        self.records[name] = dataclasses.replace(record, **changes)
        return self.records[name]


def saved(rows: list[tuple[str, Savings]], name: str = "echo") -> Savings:
    return dict(rows)[name]


async def test_the_leader_counts_saves_and_a_restart_continues_where_it_saved(
        store: SqliteStore) -> None:
    fleet = Fleet()
    fleet.records["echo"] = ServiceRecord.new("echo", replicas=2, now=T0)
    keeper = fleet.keeper(store)
    await keeper.tick()  # starts counting: loads the (empty) stored ledger
    assert keeper.counting
    fleet.clock.advance(5)
    fleet.move("echo", S.HIBERNATING)
    fleet.move("echo", S.HIBERNATED, desired_replicas=0)
    fleet.clock.advance(100)
    fleet.move("echo", S.WAKING, "first request")
    fleet.clock.advance(4)
    keeper.on_record(fleet.move("echo", S.ACTIVE, "first request; 1 ready", desired_replicas=2))
    rows = await keeper.report(None)
    assert saved(rows).replica_seconds_saved == pytest.approx(100 * 2)
    assert (saved(rows).cold_starts, saved(rows).cold_start_seconds) == (1, pytest.approx(4))
    await keeper.close()  # the leader at stop: counted up to now, saved
    assert set(await store.load_documents(DOCUMENT_KIND)) == {"echo"}

    again = fleet.keeper(store)  # a restart: the same records, the stored ledger
    await again.tick()
    fleet.clock.advance(10)
    rows = await again.report(None)
    assert saved(rows).cold_starts == 1  # not counted twice
    assert saved(rows).replica_seconds_saved == pytest.approx(100 * 2)


async def test_a_follower_reports_what_the_leader_saved_and_counts_nothing(
        store: SqliteStore) -> None:
    fleet = Fleet()
    fleet.records["echo"] = ServiceRecord.new("echo", replicas=1, now=T0)
    leader = fleet.keeper(store)
    await leader.tick()
    fleet.move("echo", S.HIBERNATING)
    fleet.move("echo", S.HIBERNATED, desired_replicas=0)
    fleet.clock.advance(60)
    await leader.tick()
    await leader.save()

    follower_view = Fleet()
    follower_view.clock, follower_view.records = fleet.clock, fleet.records
    follower_view.leading = False
    follower = follower_view.keeper(store)
    await follower.tick()
    assert not follower.counting
    fleet.clock.advance(30)  # the leader has not saved these yet: brought up to now
    rows = await follower.report(None)
    assert saved(rows).replica_seconds_saved == pytest.approx(90)
    stored = await store.load_documents(DOCUMENT_KIND)
    assert stored["echo"]["counted_until"] == T0 + 60  # the follower saved nothing

    fleet.leading = False  # the leader lost the election: stops counting, saves nothing
    await leader.tick()
    assert not leader.counting
    await leader.close()
    assert (await store.load_documents(DOCUMENT_KIND)) == stored


async def test_a_failed_save_keeps_the_accounts_for_the_next_one(
        store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = Fleet()
    fleet.records["echo"] = ServiceRecord.new("echo", replicas=1, now=T0)
    keeper = fleet.keeper(store)
    await keeper.tick()

    async def down(kind: str, docs: object) -> None:
        raise StoreError("sqlite store is locked")

    with monkeypatch.context() as m:
        m.setattr(store, "save_documents", down)
        await keeper.save()  # logged, not raised
    assert await store.load_documents(DOCUMENT_KIND) == {}
    await keeper.save()
    assert set(await store.load_documents(DOCUMENT_KIND)) == {"echo"}


async def test_report_rpc_through_the_cli_client() -> None:
    asked: list[float | None] = []

    async def report(since: float | None) -> list[tuple[str, Savings]]:
        asked.append(since)
        return [("a", Savings(7200.0, 30.0, 2, 9.0, 1, 0)), ("b", Savings(0.0, 60.0, 1, 3.0, 2, 1))]

    server, port = await start_admin_server("127.0.0.1:0", FakeAdmin([]), report=report)
    bare, bare_port = await start_admin_server("127.0.0.1:0", FakeAdmin([]))
    try:
        address = f"127.0.0.1:{port}"
        response = await asyncio.to_thread(admin_client.report, address, None)
        document = report_json(response, None)
        assert document["services"] == [
            {"name": "a", "replica_seconds_saved": 7200.0, "replica_seconds_idle": 30.0,
             "cold_starts": 2, "cold_start_seconds": 9.0, "prewakes": 1, "prewakes_wasted": 0},
            {"name": "b", "replica_seconds_saved": 0.0, "replica_seconds_idle": 60.0,
             "cold_starts": 1, "cold_start_seconds": 3.0, "prewakes": 2, "prewakes_wasted": 1}]
        assert document["total"] == {
            "name": "total", "replica_seconds_saved": 7200.0, "replica_seconds_idle": 90.0,
            "cold_starts": 3, "cold_start_seconds": 12.0, "prewakes": 3, "prewakes_wasted": 1}
        await asyncio.to_thread(admin_client.report, address, 3600.0)
        assert asked == [None, 3600.0]
        table = format_report_table(document)
        assert table.splitlines()[0].split()[:3] == ["NAME", "SAVED", "IDLE"]
        assert "2h00m" in table.splitlines()[1] and "4.5s" in table.splitlines()[1]
        assert table.splitlines()[3].startswith("TOTAL")

        with pytest.raises(AdminError) as raised:
            await asyncio.to_thread(admin_client.report, f"127.0.0.1:{bare_port}", None)
        assert raised.value.code == "UNIMPLEMENTED"
    finally:
        await server.stop(None)
        await bare.stop(None)


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (2.5, "2.5s"), (45, "45s"), (750, "12m30s"), (11100, "3h05m"),
    (187200, "2d04h")])
def test_durations_are_readable(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


async def test_in_a_fleet_a_new_leader_continues_the_ledger_the_old_one_saved(
        etcd: EtcdServer) -> None:
    """Two control planes on a real etcd: the follower reports what the leader saved; when
    leadership moves, the new leader loads it and counts on, nothing twice."""
    fleet = Fleet()
    fleet.records["echo"] = ServiceRecord.new("echo", replicas=2, now=T0)
    other = Fleet()
    other.clock, other.records, other.leading = fleet.clock, fleet.records, False
    async with opened_store(etcd.endpoint, "a") as store_a, \
            opened_store(etcd.endpoint, "b") as store_b:
        leader, follower = fleet.keeper(store_a), other.keeper(store_b)
        await leader.tick()
        await follower.tick()
        fleet.clock.advance(10)
        fleet.move("echo", S.HIBERNATING)
        fleet.move("echo", S.HIBERNATED, desired_replicas=0)
        fleet.clock.advance(50)
        fleet.move("echo", S.WAKING, "first request")
        fleet.clock.advance(3)
        leader.on_record(fleet.move("echo", S.ACTIVE, "first request; 1 ready",
                                    desired_replicas=2))
        follower.on_record(fleet.records["echo"])  # not counting: ignored
        await leader.tick()
        await leader.save()
        assert saved(await follower.report(None)).cold_starts == 1
        assert saved(await follower.report(None)).replica_seconds_saved == pytest.approx(100)

        fleet.leading, other.leading = False, True  # leadership moves
        await leader.tick()
        await follower.tick()
        assert follower.counting and not leader.counting
        fleet.clock.advance(10)
        rows = await follower.report(None)
        assert saved(rows).cold_starts == 1
        assert saved(rows).replica_seconds_saved == pytest.approx(100)
