"""EtcdStore against a real etcd: compare-and-set, paging, two processes following each
other's writes, an etcd restart, a compaction while one store is cut off, calling
statistics of several control planes, and etcd being down.

"Two processes" are two EtcdConnections (two gRPC channels) with their own store and member
name in this one test process: etcd cannot tell them from two machines.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest
from aetcd import rpc

from tests.support.etcd import EtcdServer, stop_etcd
from tests.support.net import free_port, wait_until
from torpor.call_stats import CallStats
from torpor.errors import ConflictError, StoreError
from torpor.etcd.connection import (
    MAX_TXN_OPS,
    EtcdConnection,
    StoreUnavailableError,
    grpc_target,
    range_end,
)
from torpor.model import ServiceRecord, ServiceState
from torpor.store.etcd import EtcdStore

S = ServiceState
NOW = 1_700_000_000.0
PREFIX = "/torpor-test/"
T = TypeVar("T")


@contextlib.asynccontextmanager
async def opened_store(endpoint: str, member: str, timeout: float = 5.0,
                       ) -> AsyncIterator[EtcdStore]:
    """A store on a connection of its own (a process of its own, as far as etcd knows)."""
    conn = EtcdConnection([endpoint], PREFIX, timeout)
    store = EtcdStore(conn, member)
    try:
        await store.open()
        yield store
    finally:
        await store.close()
        await conn.close()


@pytest.fixture
async def store(etcd: EtcdServer) -> AsyncIterator[EtcdStore]:
    async with opened_store(etcd.endpoint, "a") as s:
        yield s


@pytest.fixture
async def pair(etcd: EtcdServer) -> AsyncIterator[tuple[EtcdStore, EtcdStore]]:
    async with opened_store(etcd.endpoint, "a") as a, opened_store(etcd.endpoint, "b") as b:
        yield a, b


class Seen:
    """What a store listener was told, with the monotonic time of each call."""

    def __init__(self) -> None:
        self.records: list[tuple[float, ServiceRecord]] = []

    def __call__(self, record: ServiceRecord) -> None:
        self.records.append((time.monotonic(), record))

    def first(self, name: str, revision: int) -> float | None:
        """When the listener first saw `name` at `revision` (None: not yet)."""
        for at, record in self.records:
            if record.name == name and record.revision == revision:
                return at
        return None

    def latest(self) -> dict[str, ServiceRecord]:
        """Per name, the record with the highest revision seen."""
        found: dict[str, ServiceRecord] = {}
        for _, record in self.records:
            if record.name not in found or record.revision > found[record.name].revision:
                found[record.name] = record
        return found


async def until_available(call: Callable[[], Awaitable[T]], timeout: float = 20.0) -> T:
    """`call()` once etcd answers again (gRPC reconnects with a back-off after an outage)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call()
        except StoreUnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


# --- one store -----------------------------------------------------------------------------


async def test_put_is_compare_and_set_with_the_reason_of_a_conflict(store: EtcdStore) -> None:
    created = await store.put(ServiceRecord.new("echo", replicas=2, now=NOW))
    assert created.revision > 0

    with pytest.raises(ConflictError, match="already exists"):
        await store.put(ServiceRecord.new("echo", replicas=1, now=NOW))

    hibernating = await store.put(created.with_state(S.HIBERNATING, NOW + 1, "idle"))
    assert hibernating.revision > created.revision
    with pytest.raises(ConflictError, match="changed meanwhile"):
        await store.put(created.with_state(S.HIBERNATING, NOW + 2, "stale writer"))
    assert await store.get("echo") == hibernating  # the losers changed nothing

    await store.delete("echo")
    await store.delete("echo")  # unknown: no error
    assert await store.get("echo") is None
    with pytest.raises(ConflictError, match="was deleted"):
        await store.put(hibernating.with_state(S.HIBERNATED, NOW + 3, "after delete"))
    assert await store.get("echo") is None

    recreated = await store.put(ServiceRecord.new("echo", replicas=1, now=NOW))
    assert recreated.revision > hibernating.revision + 1  # the delete used a revision too


async def test_get_and_list_round_trip_with_history(store: EtcdStore) -> None:
    record = ServiceRecord.new("b", replicas=3, now=NOW)
    record = dataclasses.replace(record.with_state(S.HIBERNATING, NOW + 10, "idle 10m"),
                                 recorded_replicas=3, desired_replicas=0, last_call=NOW + 5)
    record = record.with_state(S.HIBERNATED, NOW + 11, "scaled to 0")
    b = await store.put(record)
    a = await store.put(ServiceRecord.new("a", replicas=1, now=NOW))

    got = await store.get("b")
    assert got == b
    assert got is not None
    assert [(t.from_state, t.to_state, t.reason) for t in got.history] == [
        (None, S.ACTIVE, "registered"),
        (S.ACTIVE, S.HIBERNATING, "idle 10m"),
        (S.HIBERNATING, S.HIBERNATED, "scaled to 0"),
    ]
    assert (got.state, got.recorded_replicas, got.desired_replicas, got.last_call) == (
        S.HIBERNATED, 3, 0, NOW + 5)
    assert await store.list() == [a, b]  # sorted by name, each with its revision
    assert await store.get("missing") is None


async def test_list_reads_every_page(store: EtcdStore) -> None:
    count = 1_200  # more than two pages of 500
    names = [f"svc-{i:05d}" for i in range(count)]
    limit = asyncio.Semaphore(64)

    async def create(name: str) -> ServiceRecord:
        async with limit:
            return await store.put(ServiceRecord.new(name, replicas=1 + len(name) % 3, now=NOW))

    started = time.monotonic()
    stored = await asyncio.gather(*(create(n) for n in reversed(names)))
    put_took = time.monotonic() - started

    started = time.monotonic()
    listed = await store.list()
    list_took = time.monotonic() - started
    print(f"\n{count} records: put in {put_took:.2f}s, listed in {list_took * 1000:.0f} ms")
    assert [r.name for r in listed] == names
    assert listed == sorted(stored, key=lambda r: r.name)  # revisions included


# --- two stores (two processes) -------------------------------------------------------------


async def test_a_put_reaches_the_other_store_listener(
        pair: tuple[EtcdStore, EtcdStore]) -> None:
    a, b = pair
    seen = Seen()
    b.add_listener(seen)

    latencies: list[float] = []
    record = await a.put(ServiceRecord.new("echo", replicas=2, now=NOW))
    for i in range(20):
        sent = time.monotonic()
        record = await a.put(dataclasses.replace(record, desired_replicas=i, updated_at=NOW + i))
        await wait_until(lambda r=record: seen.first(r.name, r.revision) is not None, 2.0,
                         f"store b's listener to see revision {record.revision}",
                         interval=0.002)
        arrived = seen.first(record.name, record.revision)
        assert arrived is not None
        latencies.append((arrived - sent) * 1000)

    print(f"\nput by a -> listener of b: p50 {statistics.median(latencies):.1f} ms, "
          f"max {max(latencies):.1f} ms over {len(latencies)} puts")
    assert max(latencies) < 2000
    assert seen.latest()["echo"] == record  # what b was told is what a stored
    assert await b.get("echo") == record


async def test_racing_writers_one_wins_the_other_conflicts(
        pair: tuple[EtcdStore, EtcdStore]) -> None:
    a, b = pair
    rounds = 20
    for i in range(rounds):
        name = f"race-{i}"
        await a.put(ServiceRecord.new(name, replicas=2, now=NOW))
        read_a, read_b = await asyncio.gather(a.get(name), b.get(name))
        assert read_a is not None and read_b is not None
        assert read_a.revision == read_b.revision

        results = await asyncio.gather(
            a.put(read_a.with_state(S.HIBERNATING, NOW + 1, "by a")),
            b.put(read_b.with_state(S.HIBERNATING, NOW + 1, "by b")),
            return_exceptions=True)

        won = [r for r in results if isinstance(r, ServiceRecord)]
        lost = [r for r in results if isinstance(r, BaseException)]
        assert len(won) == 1 and len(lost) == 1, results
        assert isinstance(lost[0], ConflictError)
        assert "changed meanwhile" in str(lost[0])
        stored = await a.get(name)
        assert stored == won[0]  # the winner's write, not the last one
        assert stored is not None
        assert [t.to_state for t in stored.history] == [S.ACTIVE, S.HIBERNATING]


async def test_watch_resumes_after_an_etcd_restart_and_nothing_is_lost(
        etcd: EtcdServer, pair: tuple[EtcdStore, EtcdStore]) -> None:
    a, b = pair
    before = []
    for i in range(10):
        record = ServiceRecord.new(f"svc-{i}", replicas=i + 1, now=NOW)
        if i % 2:
            record = dataclasses.replace(record.with_state(S.HIBERNATING, NOW + 1, "idle"),
                                         desired_replicas=0)
        before.append(await a.put(record))
    seen = Seen()
    b.add_listener(seen)

    started = time.monotonic()
    await etcd.restart_ready()
    restarted = time.monotonic() - started

    ready = time.monotonic()
    after = await until_available(lambda: a.put(dataclasses.replace(
        before[0], desired_replicas=7, updated_at=NOW + 60)))
    written = time.monotonic()
    await wait_until(lambda: seen.first("svc-0", after.revision) is not None, 20.0,
                     "store b's listener to see a write made after the restart",
                     interval=0.01)
    arrived = seen.first("svc-0", after.revision)
    assert arrived is not None
    print(f"\netcd restarted in {restarted:.2f}s; a's first write went through "
          f"{(written - ready) * 1000:.0f} ms after etcd was ready and reached b's listener "
          f"{(arrived - ready) * 1000:.0f} ms after etcd was ready")

    listed = await until_available(b.list)
    assert listed == sorted([after, *before[1:]], key=lambda r: r.name)
    assert [(r.name, r.state, r.recorded_replicas) for r in listed[1:]] == \
        [(r.name, r.state, r.recorded_replicas) for r in sorted(before[1:],
                                                                  key=lambda r: r.name)]

    # And the watch goes on: the next write is seen promptly.
    again = await a.put(dataclasses.replace(after, desired_replicas=8))
    await wait_until(lambda: seen.first("svc-0", again.revision) is not None, 2.0,
                     "store b's listener to see the next write")


class CuttableProxy:
    """A TCP forwarder to etcd for one store: `cut()` drops its connections and refuses new
    ones (closes them at once) until `restore()`, while etcd itself stays up for others."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.blocked = False
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blocked:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            dst.close()
            self._writers.discard(dst)

    def cut(self) -> None:
        self.blocked = True
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    def restore(self) -> None:
        self.blocked = False

    async def close(self) -> None:
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def test_writes_made_while_cut_off_arrive_when_the_watch_resumes(
        etcd: EtcdServer, caplog: pytest.LogCaptureFixture) -> None:
    """Store b loses its connection (etcd stays up for a); a writes meanwhile. b's watch
    resumes from the last revision it saw: every write arrives, in order, no listing."""
    caplog.set_level(logging.INFO, logger="torpor.store.etcd")
    proxy = CuttableProxy(etcd.port)
    await proxy.start()
    try:
        async with opened_store(etcd.endpoint, "a") as a, \
                opened_store(proxy.endpoint, "b", timeout=2.0) as b:
            record = await a.put(ServiceRecord.new("echo", replicas=2, now=NOW))
            await wait_until(lambda: b._revision >= record.revision, 2.0,
                             "b's watch to deliver the first record")
            seen = Seen()
            b.add_listener(seen)

            proxy.cut()
            written = []
            for i in range(10):
                record = await a.put(dataclasses.replace(record, desired_replicas=i))
                written.append(record)
            await a.put(ServiceRecord.new("other", replicas=1, now=NOW))
            assert seen.records == []  # b really was cut off
            proxy.restore()
            restored = time.monotonic()

            await wait_until(lambda: seen.first("other", b._revision) is not None, 20.0,
                             "b's watch to resume", interval=0.01)
            print(f"\nwatch resumed: b had the {len(written) + 1} writes made while it was cut "
                  f"off {(time.monotonic() - restored) * 1000:.0f} ms after the link came back")
            echo = [r for _, r in seen.records if r.name == "echo"]
            assert echo == written  # every version, in order (not just the latest)
            messages = [r.getMessage() for r in caplog.records]
            assert "store.watch_lost" in messages
            assert "store.resynced" not in messages
    finally:
        await proxy.close()


async def test_a_compaction_while_cut_off_makes_the_store_list_again(
        etcd: EtcdServer, caplog: pytest.LogCaptureFixture) -> None:
    """Store b loses its connection; meanwhile a writes and etcd is compacted past the
    revision b would resume from. Once b is back, its watch cannot resume: b lists every
    record and hands each to its listeners, then follows new writes again."""
    caplog.set_level(logging.INFO, logger="torpor.store.etcd")
    proxy = CuttableProxy(etcd.port)
    await proxy.start()
    try:
        async with opened_store(etcd.endpoint, "a") as a, \
                opened_store(proxy.endpoint, "b", timeout=2.0) as b:
            first = await a.put(ServiceRecord.new("first", replicas=2, now=NOW))
            seen = Seen()
            b.add_listener(seen)
            await wait_until(lambda: b._revision >= first.revision, 2.0,
                             "b's watch to deliver the first record")

            proxy.cut()
            written = [await a.put(dataclasses.replace(first, desired_replicas=5))]
            for i in range(20):
                written.append(await a.put(ServiceRecord.new(f"new-{i:02d}", i + 1, NOW)))
            revision = written[-1].revision
            await a._conn.call("compact", a._conn.kv.Compact,
                               rpc.CompactionRequest(revision=revision, physical=True))
            assert seen.first("new-00", written[1].revision) is None  # b really was cut off
            proxy.restore()
            restored = time.monotonic()

            expected = {r.name: r for r in written}
            await wait_until(lambda: seen.latest() == expected, 20.0,
                             "b's listeners to be told every record after the compaction",
                             interval=0.01)
            print(f"\nresync after compaction: b's listeners had all {len(expected)} records "
                  f"{(time.monotonic() - restored) * 1000:.0f} ms after the link came back")
            messages = [r.getMessage() for r in caplog.records]
            assert "store.watch_compacted" in messages
            assert "store.resynced" in messages

            later = await a.put(ServiceRecord.new("later", replicas=1, now=NOW))
            await wait_until(lambda: seen.first("later", later.revision) is not None, 2.0,
                             "b's watch to follow writes after the resync")
    finally:
        await proxy.close()


async def test_resync_tells_listeners_every_record(store: EtcdStore) -> None:
    """_resync (the compaction path) directly: every record, whatever listeners saw before."""
    records = [await store.put(ServiceRecord.new(f"r{i}", replicas=1, now=NOW))
               for i in range(5)]
    # The store's own watch has delivered those: only the resync tells the listener now.
    await wait_until(lambda: store._revision >= records[-1].revision, 2.0,
                     "the store's watch to catch up")
    seen = Seen()
    store.add_listener(seen)
    await store._resync()
    assert sorted((r for _, r in seen.records), key=lambda r: r.name) == records
    assert store._revision >= records[-1].revision


# --- calling statistics ---------------------------------------------------------------------


def _stats(last_call: float, calls: int = 1) -> dict[str, object]:
    stats = CallStats(created_at=NOW)
    stats.record(last_call, calls)
    return stats.to_dict()


async def test_call_stats_of_two_members(pair: tuple[EtcdStore, EtcdStore]) -> None:
    a, b = pair
    told: list[tuple[str, float]] = []
    b.add_call_listener(lambda name, at: told.append((name, at)))

    await a.save_call_stats({"echo": _stats(NOW + 100, calls=3), "only-a": _stats(NOW + 1)})
    await b.save_call_stats({"echo": _stats(NOW + 200, calls=5), "only-b": _stats(NOW + 2)})

    loaded_a = await a.load_call_stats()
    assert set(loaded_a) == {"echo", "only-a"}  # a's own entries only
    assert loaded_a["echo"]["total"] == 3  # a's own counts...
    assert loaded_a["echo"]["last_call"] == NOW + 200  # ...with the latest call anyone saw
    assert loaded_a["only-a"]["last_call"] == NOW + 1
    loaded_b = await b.load_call_stats()
    assert loaded_b["echo"]["total"] == 5
    assert loaded_b["echo"]["last_call"] == NOW + 200

    # b hears of a's calls (not of its own).
    await wait_until(lambda: ("echo", NOW + 100) in told, 2.0, "b to hear of a's first call")
    await a.save_call_stats({"echo": _stats(NOW + 300, calls=4)})
    await wait_until(lambda: ("echo", NOW + 300) in told, 2.0, "b to hear of a's later call")
    assert all(at != NOW + 200 and name != "only-b" for name, at in told), told
    assert (await b.load_call_stats())["echo"]["last_call"] == NOW + 300


async def test_call_stats_of_many_services_take_several_transactions(
        etcd: EtcdServer, pair: tuple[EtcdStore, EtcdStore]) -> None:
    a, _ = pair
    count = 3 * MAX_TXN_OPS + 7  # etcd refuses a transaction of more than 128 operations
    await a.save_call_stats({f"svc-{i:04d}": _stats(NOW + i) for i in range(count)})
    loaded = await a.load_call_stats()
    assert len(loaded) == count
    assert loaded["svc-0300"]["last_call"] == NOW + 300
    assert len(await etcd.keys(PREFIX + "stats/")) == count


async def test_unreadable_call_stats_are_skipped(
        pair: tuple[EtcdStore, EtcdStore], caplog: pytest.LogCaptureFixture) -> None:
    a, b = pair
    told: list[tuple[str, float]] = []
    b.add_call_listener(lambda name, at: told.append((name, at)))
    conn = a._conn
    for key, value in ((conn.key("stats", "echo", "c"), b"{not json"),
                       (conn.key("stats", "echo", "d"), b"[1, 2]"),
                       (conn.key("stats", "bad", "a"), b"\xff\xfe")):
        await conn.call("put", conn.kv.Put, rpc.PutRequest(key=key, value=value))
    await a.save_call_stats({"echo": _stats(NOW + 10)})
    await b.save_call_stats({"echo": _stats(NOW + 20)})

    loaded = await a.load_call_stats()
    assert loaded == {"echo": {**_stats(NOW + 10), "last_call": NOW + 20}}
    assert "store.call_stats_unreadable" in [r.getMessage() for r in caplog.records]
    # b's watch skipped the garbage too, and still hears of a's real call.
    await wait_until(lambda: told == [("echo", NOW + 10)], 2.0, "b to hear of a's call")
    assert b._watch_task is not None and not b._watch_task.done()


# --- documents -----------------------------------------------------------------------------


async def test_documents_are_one_value_for_the_fleet(
        etcd: EtcdServer, pair: tuple[EtcdStore, EtcdStore]) -> None:
    a, b = pair
    assert await a.load_documents("ledger") == {}
    await a.save_documents("ledger", {"echo": {"saved": 1.0}, "other": {"saved": 2.0}})
    await a.save_documents("learned", {"echo": {"gaps": [1, 2]}})
    # Another member reads what the leader wrote; a later writer replaces it.
    assert await b.load_documents("ledger") == {"echo": {"saved": 1.0},
                                                "other": {"saved": 2.0}}
    await b.save_documents("ledger", {"echo": {"saved": 3.0}})
    assert await a.load_documents("ledger") == {"echo": {"saved": 3.0},
                                                "other": {"saved": 2.0}}
    assert await a.load_documents("learned") == {"echo": {"gaps": [1, 2]}}
    assert sorted(await etcd.keys(PREFIX + "docs/")) == sorted([
        PREFIX + "docs/learned/echo", PREFIX + "docs/ledger/echo", PREFIX + "docs/ledger/other"])

    await a.delete_documents("ledger", ["echo", "unknown"])
    assert await b.load_documents("ledger") == {"other": {"saved": 2.0}}
    assert await b.load_documents("learned") == {"echo": {"gaps": [1, 2]}}
    assert await a.list() == []  # not records


async def test_many_documents_take_several_transactions_and_bad_ones_are_skipped(
        pair: tuple[EtcdStore, EtcdStore], caplog: pytest.LogCaptureFixture) -> None:
    a, b = pair
    count = 2 * MAX_TXN_OPS + 3
    await a.save_documents("ledger", {f"svc-{i:04d}": {"i": i} for i in range(count)})
    conn = a._conn
    for key, value in ((conn.key("docs", "ledger", "torn"), b"{not json"),
                       (conn.key("docs", "ledger", "listed"), b"[1, 2]")):
        await conn.call("put", conn.kv.Put, rpc.PutRequest(key=key, value=value))

    loaded = await b.load_documents("ledger")
    assert len(loaded) == count and loaded["svc-0200"] == {"i": 200}
    unreadable = sorted(r.__dict__["service"] for r in caplog.records
                        if r.getMessage() == "store.document_unreadable")
    assert unreadable == ["listed", "torn"]

    await a.delete_documents("ledger", [f"svc-{i:04d}" for i in range(count)])
    assert set(await b.load_documents("ledger")) == set()


# --- etcd down ------------------------------------------------------------------------------


async def test_a_killed_etcd_makes_calls_fail_with_the_endpoint(etcd: EtcdServer) -> None:
    timeout = 1.0
    async with opened_store(etcd.endpoint, "a", timeout=timeout) as store:
        await store.put(ServiceRecord.new("echo", replicas=1, now=NOW))
        await asyncio.to_thread(etcd.kill)
        for call in (lambda: store.get("echo"), store.list,
                     lambda: store.put(ServiceRecord.new("other", replicas=1, now=NOW))):
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError) as info:
                await call()
            took = time.monotonic() - started
            assert isinstance(info.value, StoreError)
            assert etcd.endpoint in str(info.value)
            assert took < timeout + 3, took
        print(f"\netcd killed: the last call failed after {took * 1000:.0f} ms: {info.value}")


async def test_a_frozen_etcd_makes_calls_fail_after_the_timeout(etcd: EtcdServer) -> None:
    timeout = 1.0
    async with opened_store(etcd.endpoint, "a", timeout=timeout) as store:
        await store.put(ServiceRecord.new("echo", replicas=1, now=NOW))
        etcd.pause()
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError, match=etcd.endpoint):
                await store.get("echo")
            took = time.monotonic() - started
            print(f"\netcd frozen: get failed after {took * 1000:.0f} ms (timeout {timeout}s)")
            assert timeout * 0.8 < took < timeout + 3
        finally:
            etcd.resume()
        got = await until_available(lambda: store.get("echo"))
        assert got is not None and got.name == "echo"


async def test_open_fails_with_the_endpoint_when_etcd_is_down(etcd: EtcdServer) -> None:
    await stop_etcd(etcd)
    conn = EtcdConnection([etcd.endpoint], PREFIX, timeout=1.0)
    store = EtcdStore(conn, "a")
    try:
        with pytest.raises(StoreUnavailableError, match=etcd.endpoint):
            await store.open()
    finally:
        await store.close()
        await conn.close()


async def test_a_dead_endpoint_in_the_list_is_skipped(etcd: EtcdServer) -> None:
    """Every endpoint in one gRPC target: a store opens and works through the live one."""
    dead = f"127.0.0.1:{free_port()}"
    assert grpc_target([dead, etcd.endpoint]) == f"ipv4:{dead},{etcd.endpoint}"
    with pytest.raises(StoreUnavailableError, match=dead):
        async with opened_store(dead, "x", timeout=1.0):
            pass
    conn = EtcdConnection([dead, etcd.endpoint], PREFIX, timeout=2.0)
    store = EtcdStore(conn, "a")
    try:
        await store.open()
        stored = await store.put(ServiceRecord.new("echo", replicas=1, now=NOW))
        assert await store.get("echo") == stored
    finally:
        await store.close()
        await conn.close()


def test_range_end_covers_exactly_the_prefix() -> None:
    assert range_end(b"/torpor/services/") == b"/torpor/services0"
    assert range_end(b"a\xff") == b"b"
    assert range_end(b"\xff\xff") == b"\0"  # every key


async def test_records_are_json_under_the_prefix(etcd: EtcdServer, store: EtcdStore) -> None:
    """What other tools (etcdctl, a second torpor version) read: one JSON object per key."""
    stored = await store.put(ServiceRecord.new("echo", replicas=2, now=NOW))
    keys = await etcd.keys(PREFIX + "services/")
    assert list(keys) == [PREFIX + "services/echo"]
    assert json.loads(keys[PREFIX + "services/echo"]) == stored.to_dict()
