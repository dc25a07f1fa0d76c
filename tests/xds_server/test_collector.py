"""The access-log collector end to end: a real grpc.aio server (registered the way the
control plane does it, xds_server/serving.py) fed real StreamAccessLogsMessages through a
real channel, the way Envoy streams them; statistics flushed to and loaded from a real
sqlite store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from prometheus_client import REGISTRY

from tests.support.net import wait_until
from torpor.call_stats import Window, hour_of_week
from torpor.clock import ManualClock
from torpor.errors import StoreError
from torpor.model import host_of
from torpor.store.sqlite import SqliteStore
from xds_server import stats_sink
from xds_server.cache import SnapshotCache
from xds_server.collector import (
    CATCH_ALL_ROUTE,
    UNKNOWN_HOSTS_KEY,
    UNKNOWN_HOSTS_LIMIT,
    CallCollector,
)
from xds_server.server import AdsServer
from xds_server.serving import start_xds_listener

# A Monday, 10:00:00 UTC, so that hours of the week are easy to check.
NOW = 1_700_474_400.0
assert hour_of_week(NOW) == 10

Stub = Any  # als_pb2_grpc.AccessLogServiceStub (generated, untyped)


# --- building what Envoy sends -----------------------------------------------------------


def entry(route: str, authority: str, start: float | None = None) -> Any:
    """One HTTPAccessLogEntry as envoy.access_loggers.http_grpc fills it."""
    e = accesslog_pb2.HTTPAccessLogEntry()
    common = e.common_properties
    common.route_name = route
    common.upstream_cluster = route or "activator"
    if start is not None:
        common.start_time.seconds = math.floor(start)
        common.start_time.nanos = round((start - math.floor(start)) * 1e9)
    e.request.authority = authority
    e.request.path = "/v1/predict"
    e.request.request_method = base_pb2.POST
    e.response.response_code.value = 200
    return e


def message(entries: Iterable[Any], node: str | None = None) -> Any:
    """A StreamAccessLogsMessage; `node` set only on a stream's first message."""
    m = als_pb2.StreamAccessLogsMessage()
    if node is not None:
        m.identifier.node.id = node
        m.identifier.log_name = "torpor"
    m.http_logs.log_entry.extend(entries)
    return m


async def send(stub: Stub, *batches: Iterable[Any], node: str = "envoy-1") -> None:
    """One access-log stream carrying `batches`; returns once the collector answered, i.e.
    after it consumed every message."""

    async def messages() -> AsyncIterator[Any]:
        for i, batch in enumerate(batches):
            yield message(batch, node if i == 0 else None)

    await stub.StreamAccessLogs(messages(), timeout=10)


def sample(name: str, labels: Mapping[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, dict(labels or {})) or 0.0


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == name]


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[CallCollector], Awaitable[Stub]]]:
    """serve(collector) → a stub on a fresh xDS listener; everything stops at teardown."""
    servers: list[grpc.aio.Server] = []
    channels: list[grpc.aio.Channel] = []

    async def start(collector: CallCollector) -> Stub:
        server, port = await start_xds_listener("127.0.0.1:0", AdsServer(SnapshotCache()),
                                                collector)
        servers.append(server)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return als_pb2_grpc.AccessLogServiceStub(channel)

    try:
        yield start
    finally:
        for channel in channels:
            await channel.close()
        for server in servers:
            await server.stop(None)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RecordingStore]:
    s = RecordingStore(tmp_path / "state.db")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


class RecordingStore(SqliteStore):
    """A real sqlite store that remembers which names each save wrote, and can fail."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.saves: list[set[str]] = []
        self.failing = False

    async def save_call_stats(self, stats: Mapping[str, Mapping[str, Any]]) -> None:
        if self.failing:
            raise StoreError("sqlite store: disk I/O error (test)")
        self.saves.append(set(stats))
        await super().save_call_stats(stats)


# --- counting ------------------------------------------------------------------------------


async def test_counts_each_entry_at_its_own_time(serve: Callable[..., Awaitable[Stub]]) -> None:
    clock = ManualClock(NOW)
    collector = CallCollector(clock)
    collector.ensure("count-a", created_at=NOW - 86400)
    collector.ensure("count-b", created_at=NOW - 86400)
    stub = await serve(collector)
    seen_before = sample("torpor_requests_seen_total", {"service": "count-a"})

    await send(
        stub,
        [entry("count-a", "a.localhost", NOW - 30.25), entry("count-a", "a.localhost", NOW - 30.5),
         entry("count-a", "a.localhost", NOW - 2 * 3600)],  # 08:xx: outside the hour window
        [entry("count-a", "a.localhost", NOW - 3 * 86400),  # only in the long window
         entry("count-b", "b.localhost")],  # no start_time: counts at the clock's now
    )

    a = collector.stats("count-a")
    assert a is not None
    assert a.total == 4
    assert a.windows(NOW) == {"minute": 2, "hour": 2, "day": 3, "long": 4}
    assert a.last_call == pytest.approx(NOW - 30.25)
    assert collector.last_call("count-a") == a.last_call
    assert a.by_hour_of_week[9] == 2 and a.by_hour_of_week[8] == 1
    assert sum(a.by_hour_of_week) == 4
    assert a.created_at == NOW - 86400

    b = collector.stats("count-b")
    assert b is not None and b.total == 1 and b.last_call == NOW
    assert b.calls_in(Window.MINUTE, NOW) == 1

    assert sample("torpor_requests_seen_total", {"service": "count-a"}) - seen_before == 4
    assert sample("torpor_last_request_timestamp_seconds", {"service": "count-a"}) == (
        pytest.approx(NOW - 30.25))
    assert collector.unknown_hosts == {}


async def test_entry_from_the_future_counts_at_now(serve: Callable[..., Awaitable[Stub]]) -> None:
    clock = ManualClock(NOW)
    collector = CallCollector(clock)
    collector.ensure("skewed", created_at=NOW)
    stub = await serve(collector)

    await send(stub, [entry("skewed", "skewed.localhost", NOW + 3600)])  # Envoy's clock ahead

    stats = collector.stats("skewed")
    assert stats is not None
    assert stats.last_call == NOW
    assert stats.windows(NOW) == {"minute": 1, "hour": 1, "day": 1, "long": 1}


async def test_many_entries_in_one_second_count_exactly(
    serve: Callable[..., Awaitable[Stub]],
) -> None:
    """Entries are grouped per service and second before recording: totals, buckets at a
    window's edge and the latest time must come out as if recorded one by one."""
    clock = ManualClock(NOW)
    collector = CallCollector(clock)
    collector.ensure("busy", created_at=NOW)
    stub = await serve(collector)
    # The minute window counts 5 s buckets: at NOW (a multiple of 5) its oldest bucket
    # starts at NOW - 55, so the second before that is out and NOW - 55 is in.
    edge = NOW - 55
    times = [edge - 1 + i / 100 for i in range(100)] + [edge + i / 100 for i in range(100)]

    await send(stub, [entry("busy", "busy.localhost", t) for t in times])

    stats = collector.stats("busy")
    assert stats is not None
    assert stats.total == 200
    assert stats.calls_in(Window.MINUTE, NOW) == 100
    assert stats.calls_in(Window.HOUR, NOW) == 200
    assert stats.last_call == pytest.approx(edge + 0.99)


async def test_catch_all_entries_of_a_known_host_count_for_its_service(
    serve: Callable[..., Awaitable[Stub]],
) -> None:
    clock = ManualClock(NOW)
    collector = CallCollector(clock, hosts={"Evicted.Localhost": "evicted"})
    collector.ensure("evicted", created_at=NOW - 86400)
    stub = await serve(collector)
    unknown_before = sample("torpor_unknown_host_requests_total")

    await send(stub, [
        entry(CATCH_ALL_ROUTE, "EVICTED.localhost:8080", NOW - 1),  # evicted: no route of its own
        entry("", "evicted.localhost", NOW - 1),  # no route matched at all
    ])

    stats = collector.stats("evicted")
    assert stats is not None and stats.total == 2
    assert collector.unknown_hosts == {}
    assert sample("torpor_unknown_host_requests_total") == unknown_before


async def test_hosts_not_in_the_table_are_counted_by_host(
    serve: Callable[..., Awaitable[Stub]],
) -> None:
    clock = ManualClock(NOW)
    collector = CallCollector(clock)
    collector.ensure("known", created_at=NOW)
    collector.set_hosts({"known.localhost": "known", "stale.localhost": "not-ensured"})
    stub = await serve(collector)
    unknown_before = sample("torpor_unknown_host_requests_total")

    await send(stub, [
        entry(CATCH_ALL_ROUTE, "nope.localhost:8080"),
        entry(CATCH_ALL_ROUTE, "NOPE.localhost"),
        entry(CATCH_ALL_ROUTE, "[::1]:8080"),
        entry("stranger", "stranger.localhost"),  # a route the table does not have (any more)
        entry(CATCH_ALL_ROUTE, "stale.localhost"),  # mapped, but to a name not in the table
    ])

    assert collector.unknown_hosts == {
        "nope.localhost": 2, "[::1]": 1, "stranger.localhost": 1, "stale.localhost": 1
    }
    assert sample("torpor_unknown_host_requests_total") - unknown_before == 5
    assert collector.stats("stranger") is None
    assert collector.stats("not-ensured") is None
    known = collector.stats("known")
    assert known is not None and known.total == 0


def test_host_of() -> None:
    assert host_of("Echo.LocalHost:8080") == "echo.localhost"
    assert host_of("echo.localhost.") == "echo.localhost"
    assert host_of("[::1]:80") == "[::1]"
    assert host_of("[::1]") == "[::1]"
    assert host_of("") == ""


async def test_unknown_hosts_are_bounded(serve: Callable[..., Awaitable[Stub]]) -> None:
    collector = CallCollector(ManualClock(NOW))
    stub = await serve(collector)
    flood = [f"scan-{i}.example" for i in range(UNKNOWN_HOSTS_LIMIT + 500)]

    await send(
        stub,
        [entry(CATCH_ALL_ROUTE, "popular.example") for _ in range(3)],
        [entry(CATCH_ALL_ROUTE, host) for host in flood],
    )

    hosts = collector.unknown_hosts
    assert len(hosts) <= UNKNOWN_HOSTS_LIMIT
    assert hosts["popular.example"] == 3  # the frequent host survives the flood
    assert flood[-1] in hosts  # and the newest are kept rather than the oldest
    assert flood[0] not in hosts


async def test_streams_like_envoy_workers(serve: Callable[..., Awaitable[Stub]]) -> None:
    """Two long-lived streams (two Envoy worker threads), node only in each first message;
    entries are counted as they arrive, not when the stream ends."""
    collector = CallCollector(ManualClock(NOW))
    collector.ensure("streamed", created_at=NOW)
    stub = await serve(collector)
    queues = [asyncio.Queue[Any](), asyncio.Queue[Any]()]

    async def feed(queue: asyncio.Queue[Any]) -> AsyncIterator[Any]:
        while (item := await queue.get()) is not None:
            yield item

    calls = [asyncio.ensure_future(stub.StreamAccessLogs(feed(q), timeout=30)) for q in queues]
    try:
        for worker, queue in enumerate(queues):
            queue.put_nowait(message([entry("streamed", "streamed.localhost", NOW - 5)],
                                     node=f"envoy-1-worker-{worker}"))
        for queue in queues:
            queue.put_nowait(message([entry("streamed", "streamed.localhost", NOW - 1)] * 2))

        def counted() -> bool:
            stats = collector.stats("streamed")
            return stats is not None and stats.total == 6

        await wait_until(counted, timeout=10, what="6 calls counted from 2 open streams")
        assert collector.last_call("streamed") == pytest.approx(NOW - 1)
        for queue in queues:
            queue.put_nowait(None)
        assert all(isinstance(r, als_pb2.StreamAccessLogsResponse) for r in
                   await asyncio.wait_for(asyncio.gather(*calls), timeout=10))
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)


async def test_note_held_moves_last_call_without_counting(
    serve: Callable[..., Awaitable[Stub]],
) -> None:
    clock = ManualClock(NOW)
    collector = CallCollector(clock)
    collector.ensure("sleepy", created_at=NOW - 86400)
    stub = await serve(collector)

    collector.note_held("sleepy")  # the activator holds a request
    stats = collector.stats("sleepy")
    assert stats is not None
    assert collector.last_call("sleepy") == NOW
    assert stats.total == 0 and stats.windows(NOW) == {"minute": 0, "hour": 0, "day": 0,
                                                       "long": 0}
    assert sample("torpor_last_request_timestamp_seconds", {"service": "sleepy"}) == NOW
    collector.note_held("sleepy", at=NOW - 100)  # an older hold does not move it back
    assert collector.last_call("sleepy") == NOW
    collector.note_held("not-in-table")  # ignored
    assert collector.stats("not-in-table") is None

    # Two minutes later the wake is done and the held request answered: its entry (started
    # when it was held) arrives and counts it once.
    clock.advance(120)
    await send(stub, [entry("sleepy", "sleepy.localhost", NOW)])
    assert stats.total == 1
    assert stats.last_call == NOW
    assert stats.calls_in(Window.HOUR, clock.now()) == 1


async def test_forget_takes_a_service_out_of_the_table(
    serve: Callable[..., Awaitable[Stub]], store: RecordingStore,
) -> None:
    collector = CallCollector(ManualClock(NOW))
    collector.ensure("gone", created_at=NOW)
    stub = await serve(collector)
    await send(stub, [entry("gone", "gone.localhost", NOW)])
    assert sample("torpor_requests_seen_total", {"service": "gone"}) >= 1

    collector.forget("gone")
    assert collector.stats("gone") is None and collector.last_call("gone") is None
    assert sample("torpor_requests_seen_total", {"service": "gone"}) == 0  # series removed
    await send(stub, [entry("gone", "gone.localhost", NOW)])
    assert collector.unknown_hosts == {"gone.localhost": 1}
    await collector.flush(store)
    assert store.saves == [{UNKNOWN_HOSTS_KEY}]

    again = collector.ensure("gone", created_at=NOW + 10)  # re-registered: starts afresh
    assert again.total == 0 and again.created_at == NOW + 10


# --- the store -----------------------------------------------------------------------------


async def test_flush_then_load_restores_everything(
    serve: Callable[..., Awaitable[Stub]], tmp_path: Path,
) -> None:
    """A restarted control plane must see the same history, not an idle service."""
    path = tmp_path / "state.db"
    clock = ManualClock(NOW)
    first = CallCollector(clock)
    first.ensure("echo", created_at=NOW - 86400)
    first.ensure("quiet", created_at=NOW - 3600)
    stub = await serve(first)
    await send(stub, [entry("echo", "echo.localhost", NOW - 10),
                      entry("echo", "echo.localhost", NOW - 7200),
                      entry(CATCH_ALL_ROUTE, "who.example")])
    first.note_held("quiet", at=NOW - 5)
    store = SqliteStore(path)
    await store.open()
    try:
        await first.flush(store)
    finally:
        await store.close()

    # A new process: load before ensure (records read later) ...
    reopened = SqliteStore(path)
    await reopened.open()
    try:
        second = CallCollector(clock)
        await second.load(reopened)
        # ... or ensure before load (records read first): same result.
        third = CallCollector(clock)
        third.ensure("echo", created_at=NOW - 86400)
        third.ensure("quiet", created_at=NOW - 3600)
        await third.load(reopened)
    finally:
        await reopened.close()

    for loaded in (second, third):
        for name, created in (("echo", NOW - 86400), ("quiet", NOW - 3600)):
            stats = loaded.ensure(name, created_at=created)
            original = first.stats(name)
            assert original is not None
            assert stats.to_dict() == original.to_dict()
        assert loaded.last_call("quiet") == NOW - 5
        assert loaded.unknown_hosts == {"who.example": 1}
    echo = second.stats("echo")
    assert echo is not None and echo.windows(NOW) == {"minute": 1, "hour": 1, "day": 2,
                                                      "long": 2}


async def test_counts_made_before_load_are_added(
    serve: Callable[..., Awaitable[Stub]], store: RecordingStore,
) -> None:
    clock = ManualClock(NOW)
    earlier = CallCollector(clock)
    earlier.ensure("echo", created_at=NOW - 86400)
    earlier.ingest([entry("echo", "echo.localhost", NOW - 100)] * 3
                   + [entry(CATCH_ALL_ROUTE, "x.example")])
    await earlier.flush(store)

    collector = CallCollector(clock)
    collector.ensure("echo", created_at=NOW - 86400)
    stub = await serve(collector)
    await send(stub, [entry("echo", "echo.localhost", NOW - 1),
                      entry(CATCH_ALL_ROUTE, "x.example")])  # arrived before the load
    await collector.load(store)

    stats = collector.stats("echo")
    assert stats is not None
    assert stats.total == 4 and stats.calls_in(Window.MINUTE, NOW) == 1
    assert stats.last_call == pytest.approx(NOW - 1)
    assert collector.unknown_hosts == {"x.example": 2}
    store.saves.clear()
    await collector.flush(store)  # the merged counts are new: they are saved
    assert store.saves == [{"echo", UNKNOWN_HOSTS_KEY}]


async def test_flush_writes_only_what_changed(
    serve: Callable[..., Awaitable[Stub]], store: RecordingStore,
) -> None:
    clock = ManualClock(NOW)
    collector = CallCollector(clock)
    collector.ensure("a", created_at=NOW)
    collector.ensure("b", created_at=NOW)
    stub = await serve(collector)
    flushes_before = sample("torpor_call_stats_flushes_total", {"outcome": "ok"})

    await collector.flush(store)
    assert store.saves == [{"a", "b"}]  # new services: their creation time is worth saving
    await collector.flush(store)
    assert store.saves == [{"a", "b"}]  # nothing changed: no write at all

    await send(stub, [entry("a", "a.localhost", NOW)])
    await collector.flush(store)
    await send(stub, [entry(CATCH_ALL_ROUTE, "nope.example")])
    await collector.flush(store)
    collector.note_held("b")
    await collector.flush(store)
    assert store.saves[1:] == [{"a"}, {UNKNOWN_HOSTS_KEY}, {"b"}]
    assert sample("torpor_call_stats_flushes_total", {"outcome": "ok"}) - flushes_before == 4

    saved = await store.load_call_stats()
    a = collector.stats("a")
    assert a is not None and saved["a"] == a.to_dict()
    assert saved[UNKNOWN_HOSTS_KEY]["hosts"] == {"nope.example": 1}


async def test_store_failure_keeps_the_data_for_the_next_flush(
    serve: Callable[..., Awaitable[Stub]], store: RecordingStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock(NOW)
    collector = CallCollector(clock)
    collector.ensure("echo", created_at=NOW)
    collector.ensure("other", created_at=NOW)
    await collector.flush(store)
    stub = await serve(collector)
    failed_before = sample("torpor_call_stats_flushes_total", {"outcome": "failed"})

    await send(stub, [entry("echo", "echo.localhost", NOW), entry(CATCH_ALL_ROUTE, "x.example")])
    store.failing = True
    with caplog.at_level(logging.WARNING, logger="torpor.collector"):
        await collector.flush(store)  # does not raise
    assert sample("torpor_call_stats_flushes_total", {"outcome": "failed"}) - failed_before == 1
    [line] = events(caplog, "collector.flush_failed")
    assert "disk I/O error" in line.__dict__["error"]
    assert (await store.load_call_stats())["echo"]["total"] == 0  # not written

    await send(stub, [entry("other", "other.localhost", NOW + 1)])  # counted meanwhile
    store.failing = False
    store.saves.clear()
    await collector.flush(store)
    assert store.saves == [{"echo", "other", UNKNOWN_HOSTS_KEY}]
    saved = await store.load_call_stats()
    assert saved["echo"]["total"] == 1 and saved["other"]["total"] == 1
    assert saved[UNKNOWN_HOSTS_KEY]["hosts"] == {"x.example": 1}
    await collector.flush(store)
    assert len(store.saves) == 1  # all clean now


async def test_unreadable_stored_entries_are_skipped_with_a_log_line(
    store: RecordingStore, caplog: pytest.LogCaptureFixture,
) -> None:
    good = CallCollector(ManualClock(NOW))
    good.ensure("good", created_at=NOW).record(NOW - 1)
    await good.flush(store)
    future = dict(good.ensure("good", created_at=NOW).to_dict(), format=99)
    partial = good.ensure("good", created_at=NOW).to_dict()
    del partial["created_at"]
    await store.save_call_stats({
        "future": future,  # written by a newer torpor
        "partial": partial,
        "short-week": dict(partial, created_at=NOW, by_hour_of_week=[1, 2]),
        "bad-buckets": dict(partial, created_at=NOW, buckets={"minute": [1]}),
        UNKNOWN_HOSTS_KEY: {"format": 1, "hosts": ["not", "a", "mapping"]},
    })
    with contextlib.closing(sqlite3.connect(store.path)) as conn, conn:
        conn.execute("INSERT INTO call_stats (name, data) VALUES ('torn', '{\"format\"')")

    collector = CallCollector(ManualClock(NOW))
    with caplog.at_level(logging.WARNING):
        await collector.load(store)

    stats = collector.ensure("good", created_at=NOW)
    assert stats.total == 1 and stats.last_call == NOW - 1
    skipped = {r.__dict__["service"] for r in events(caplog, "collector.stats_unreadable")}
    assert skipped == {"future", "partial", "short-week", "bad-buckets", UNKNOWN_HOSTS_KEY}
    assert {r.__dict__["service"] for r in events(caplog, "store.call_stats_unreadable")} == {
        "torn"}
    for name in ("future", "partial", "short-week", "bad-buckets"):
        fresh = collector.ensure(name, created_at=NOW)
        assert fresh.total == 0  # starts afresh; the next flush replaces the bad entry
    assert collector.unknown_hosts == {}


async def test_load_raises_when_the_store_fails(tmp_path: Path) -> None:
    closed = SqliteStore(tmp_path / "state.db")
    with pytest.raises(StoreError, match="not open"):
        await CallCollector().load(closed)


async def test_run_flusher_flushes_periodically_and_once_more_on_stop(
    store: RecordingStore,
) -> None:
    clock = ManualClock(NOW)
    collector = CallCollector(clock)
    collector.ensure("echo", created_at=NOW)
    collector.ingest([entry("echo", "echo.localhost", NOW)])
    flusher = asyncio.create_task(collector.run_flusher(store, every=0.02))
    try:
        async def saved_total() -> int:
            saved = await store.load_call_stats()
            return int(saved["echo"]["total"]) if "echo" in saved else -1

        async def first_flush_done() -> bool:
            return await saved_total() == 1

        await wait_until(first_flush_done, timeout=10, what="the periodic flush")

        # A failing store does not stop the flusher.
        failed_before = sample("torpor_call_stats_flushes_total", {"outcome": "failed"})
        store.failing = True
        collector.ingest([entry("echo", "echo.localhost", NOW)])
        await wait_until(lambda: sample("torpor_call_stats_flushes_total",
                                        {"outcome": "failed"}) > failed_before,
                         timeout=10, what="a failed flush")
        assert await saved_total() == 1
        store.failing = False

        collector.ingest([entry("echo", "echo.localhost", NOW)] * 2)
        flusher.cancel()  # a clean stop right after new calls: they are saved anyway
        with pytest.raises(asyncio.CancelledError):
            await flusher
        assert await saved_total() == 4
    finally:
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher


# --- Envoy's request counters (stats_sink.py) ----------------------------------------------


def flush(counters: Mapping[str, float], at: float, node: str | None = None) -> Any:
    """One StreamMetricsMessage as Envoy's metrics_service sink sends it per stats flush:
    counters as deltas, untagged names, each stamped with the flush time."""
    message = stats_sink.StreamMetricsMessage()
    if node is not None:
        message.identifier.node.id = node
    for name, value in counters.items():
        metric = message.envoy_metrics.add(name=name).metric.add(timestamp_ms=round(at * 1000))
        metric.counter.value = value
    return message


async def test_counters_of_a_flush_count_at_its_time(store: RecordingStore) -> None:
    clock = ManualClock(NOW)
    collector = CallCollector(clock)
    collector.ensure("counted", created_at=NOW - 86400)
    collector.ensure("quiet", created_at=NOW - 86400)
    await collector.flush(store)  # the new services' first save
    server, port = await start_xds_listener("127.0.0.1:0", AdsServer(SnapshotCache()),
                                            collector)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stream = channel.stream_unary(
        f"/{stats_sink.SERVICE_NAME}/StreamMetrics",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=stats_sink.StreamMetricsResponse.FromString)
    before = sample("torpor_requests_seen_total", {"service": "counted"})

    async def messages() -> AsyncIterator[Any]:
        yield flush({"cluster.counted.upstream_rq_total": 4,
                     "cluster.counted.upstream_rq_retry": 1,  # a replay: 3 calls
                     "cluster.quiet.upstream_rq_total": 0,
                     "cluster.torpor_activator.upstream_rq_total": 7,  # not a service
                     "cluster.counted.upstream_rq_2xx": 4}, NOW - 3, node="envoy-1")
        yield flush({"cluster.counted.upstream_rq_retry": 1}, NOW - 1)  # its attempt: next
        yield flush({"cluster.counted.upstream_rq_total": 3}, NOW + 60)  # clock skew: now

    try:
        await stream(messages(), timeout=10)
    finally:
        await channel.close()
        await server.stop(None)
    stats = collector.stats("counted")
    assert stats is not None
    assert stats.total == 3 + 2
    assert stats.last_call == NOW
    assert stats.calls_in(Window.MINUTE, NOW) == 5
    assert stats.by_hour_of_week[hour_of_week(NOW)] == 2
    assert stats.by_hour_of_week[hour_of_week(NOW - 3)] == 3
    assert sample("torpor_requests_seen_total", {"service": "counted"}) == before + 5
    quiet = collector.stats("quiet")
    assert quiet is not None and quiet.total == 0 and quiet.last_call is None
    assert collector.unknown_hosts == {}
    await collector.flush(store)
    assert store.saves[-1] == {"counted"}
