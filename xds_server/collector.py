"""Calling statistics per service, from Envoy's request counters and its access log.

Two sources: Envoy's per-cluster request counters, reported once per stats flush
(stats_sink.py → `count_calls`), for every request that reaches a service's cluster, awake
or asleep (nothing per request: the warm path costs what a plain Envoy costs); and the
access log (ALS, `StreamAccessLogs` → `ingest`), which Envoy sends only for requests of the
catch-all (resources.py `_access_log`): evicted services and unknown hosts.

Owns: reading Envoy's `StreamAccessLogs` streams; one `CallStats` per service of the table
(creation time, last call, counts per window, calls per hour of the week); the count of
calls for hosts that are not in the table; the matching Prometheus series; and saving all
of it to the store (`flush`, `run_flusher`) and reading it back after a restart (`load`),
so that a restarted control plane does not mistake a busy service for an idle one.

Must not: decide anything (policies read `stats()` and decide), write service records,
log or allocate per entry beyond what counting needs (Envoy can send ~45k entries/s,
measured), or raise out of a flush because the store is down (it keeps the data and
tries again at the next flush).

Which service an access-log entry is for: every service route is named after its service, so
`route_name` identifies it without parsing hosts. Entries of the catch-all route (a service
that was evicted, or a host nobody knows) and entries whose route is not in the table are
matched by their Host and path against the catalog's routes (`router`; or by Host alone,
`set_hosts`); what still matches nothing counts in `unknown_hosts`. "The table" is what
the owner declared with `ensure` (and not yet `forget`): entries for any other name are
unknown hosts.

An entry counts at its own `start_time` (when Envoy received the request), not when its
log arrives (~0.5-1 s later, or minutes later for a request held over a cold start); an
entry without one, or stamped in the future (clock skew between hosts), counts at now.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from torpor import metrics
from torpor.call_stats import HOURS_PER_WEEK, CallStats
from torpor.clock import Clock, SystemClock
from torpor.errors import StoreError
from torpor.logs import event
from torpor.model import host_of
from torpor.store.base import Store

log = logging.getLogger("torpor.collector")

#: route_name of the catch-all virtual host (resources.py names it so). Its entries are
#: matched by host; listed for readers, the lookup needs no special case (it is never a
#: service name: those are DNS labels, without "_").
CATCH_ALL_ROUTE = "torpor_catch_all"

#: Store key of the unknown-host counts; a DNS label cannot contain "_", so no service
#: can be called this.
UNKNOWN_HOSTS_KEY = "_unknown_hosts"
UNKNOWN_HOSTS_FORMAT = 1

#: At most this many unknown hosts are kept. When one more arrives, the counter is cut back
#: to the UNKNOWN_HOSTS_KEEP most frequent (ties: the most recently first seen), so a flood
#: of random Host headers costs bounded memory and keeps the hosts that matter.
UNKNOWN_HOSTS_LIMIT = 1000
UNKNOWN_HOSTS_KEEP = UNKNOWN_HOSTS_LIMIT * 9 // 10


class CallCollector(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Counts calls per service from Envoy's gRPC access log; see the module docstring.

    Runs on the event loop of the grpc.aio server it is registered with; its methods are
    not thread-safe.
    """

    def __init__(self, clock: Clock | None = None, hosts: Mapping[str, str] | None = None,
                 router: Callable[[str, str], str | None] | None = None) -> None:
        """`router(authority, path)`: the service a catch-all request was for (the
        catalog's routing rule: hosts and paths); else the `hosts` map, by host alone."""
        self._clock = clock or SystemClock()
        self._hosts: dict[str, str] = {}
        self._router = router
        self._stats: dict[str, CallStats] = {}
        #: loaded from the store for names not ensure()d (yet): ensure() adopts them.
        self._stored: dict[str, CallStats] = {}
        #: names whose stats changed since the last successful flush.
        self._dirty: set[str] = set()
        self._unknown_dirty = False
        self._flush_lock = asyncio.Lock()
        #: calls for hosts not in the table, by host (bounded: UNKNOWN_HOSTS_LIMIT).
        self.unknown_hosts: Counter[str] = Counter()
        if hosts:
            self.set_hosts(hosts)

    # --- the table ------------------------------------------------------------------------

    def set_hosts(self, hosts: Mapping[str, str]) -> None:
        """Replace the Host → service name map (keys are normalised like `host_of`)."""
        self._hosts = {host_of(host): name for host, name in hosts.items()}

    def ensure(self, name: str, created_at: float) -> CallStats:
        """`name` is in the table: its stats, created now if it has none. Stats loaded from
        the store are adopted; `created_at` (from the service's record) is authoritative."""
        stats = self._stats.get(name)
        if stats is not None:
            return stats
        stats = self._stored.pop(name, None)
        if stats is None:
            stats = CallStats(created_at=created_at)
            self._dirty.add(name)
        elif stats.created_at != created_at:
            stats.created_at = created_at
            self._dirty.add(name)
        self._stats[name] = stats
        if stats.last_call is not None:
            metrics.LAST_REQUEST.labels(service=name).set(stats.last_call)
        return stats

    def forget(self, name: str) -> None:
        """`name` left the table: drop its stats and metric series. Its stored entry stays
        (the store has no call-stats delete); a later ensure() of the name starts afresh."""
        self._stats.pop(name, None)
        self._stored.pop(name, None)
        self._dirty.discard(name)
        for metric in (metrics.REQUESTS_SEEN, metrics.LAST_REQUEST):
            with contextlib.suppress(KeyError):
                metric.remove(name)

    def stats(self, name: str) -> CallStats | None:
        """The live stats of `name` (mutated in place as calls arrive), None if not in the
        table. Callers read; they must not modify."""
        return self._stats.get(name)

    def last_call(self, name: str) -> float | None:
        """Unix time of the last call (or held request) for `name`, None if none or unknown."""
        stats = self._stats.get(name)
        return None if stats is None else stats.last_call

    def note_held(self, name: str, at: float | None = None) -> None:
        """The activator holds a request for `name`: it was called at `at` (default now).
        Moves last_call only; the call is counted when its access-log entry arrives (once
        it is answered). Ignored for a name not in the table."""
        stats = self._stats.get(name)
        if stats is None:
            return
        stats.touch(self._clock.now() if at is None else at)
        self._dirty.add(name)
        if stats.last_call is not None:
            metrics.LAST_REQUEST.labels(service=name).set(stats.last_call)

    def note_peer_call(self, name: str, at: float) -> None:
        """Another control plane of the fleet saved a call of `name` at `at` (its Envoys'
        access logs): the idle policy must see it. Moves last_call only, and does not mark
        the stats for a flush (the peer saved it already)."""
        stats = self._stats.get(name)
        if stats is None or (stats.last_call is not None and stats.last_call >= at):
            return
        stats.touch(at)
        metrics.LAST_REQUEST.labels(service=name).set(at)

    # --- Envoy's request counters (stats_sink.py) -------------------------------------------

    def count_calls(self, calls: Mapping[str, int], at: float | None) -> None:
        """`calls[cluster]` requests reached each service's cluster during one stats flush
        of one Envoy, which ended at `at` (None, or later than now: now). They count at
        that time, so the last call is known to within one flush interval. Clusters not in
        the table (torpor's own, a service that just left) are ignored: the requests of
        hosts nobody routes reach the catch-all, whose access log counts them."""
        now = self._clock.now()
        at = now if at is None or at > now else at
        table = self._stats
        for name, count in calls.items():
            stats = table.get(name)
            if stats is None or count <= 0:
                continue
            stats.record(at, count)
            self._dirty.add(name)
            metrics.REQUESTS_SEEN.labels(service=name).inc(count)
            if stats.last_call is not None:
                metrics.LAST_REQUEST.labels(service=name).set(stats.last_call)

    # --- the access log -------------------------------------------------------------------

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> als_pb2.StreamAccessLogsResponse:
        node = ""
        async for message in request_iterator:
            if not node and message.HasField("identifier"):  # first message only
                node = message.identifier.node.id or "?"
                event(log, "collector.stream_opened", node=node,
                      log_name=message.identifier.log_name)
            if message.HasField("http_logs"):
                self.ingest(message.http_logs.log_entry)
        event(log, "collector.stream_closed", node=node)
        return als_pb2.StreamAccessLogsResponse()

    def ingest(self, entries: Iterable[Any]) -> None:
        """Count a batch of HTTPAccessLogEntry (one ALS message).

        Entries of one service within one second are recorded together (one
        `CallStats.record(latest, count)`): every window bucket and hour of the week is a
        whole number of seconds, so this is exact, and several times cheaper than one
        record per entry. Metrics are updated once per service per batch.
        """
        now = self._clock.now()
        now_second = math.floor(now)
        table = self._stats
        #: (service, whole second) → [calls, latest start time]
        groups: dict[tuple[str, int], list[Any]] = {}
        unknown = 0
        for entry in entries:
            common = entry.common_properties
            name = common.route_name
            if name not in table:  # catch-all, no route, or a route that left the table
                host = host_of(entry.request.authority)
                name = (self._router(entry.request.authority, entry.request.path) or ""
                        if self._router is not None else self._hosts.get(host, ""))
                if name not in table:
                    self._count_unknown(host)
                    unknown += 1
                    continue
            if common.HasField("start_time"):
                start = common.start_time
                at = start.seconds + start.nanos * 1e-9
                second = start.seconds
                if at > now:
                    at, second = now, now_second
            else:
                at, second = now, now_second
            key = (name, second)
            group = groups.get(key)
            if group is None:
                groups[key] = [1, at]
            else:
                group[0] += 1
                if at > group[1]:
                    group[1] = at
        counted: dict[str, int] = {}
        for (name, _), (count, latest) in groups.items():
            table[name].record(latest, count)
            counted[name] = counted.get(name, 0) + count
        for name, count in counted.items():
            self._dirty.add(name)
            metrics.REQUESTS_SEEN.labels(service=name).inc(count)
            last = table[name].last_call
            if last is not None:
                metrics.LAST_REQUEST.labels(service=name).set(last)
        if unknown:
            self._unknown_dirty = True
            metrics.UNKNOWN_HOST_REQUESTS.inc(unknown)

    def _count_unknown(self, host: str, count: int = 1) -> None:
        hosts = self.unknown_hosts
        if host in hosts:
            hosts[host] += count
            return
        hosts[host] = count
        if len(hosts) > UNKNOWN_HOSTS_LIMIT:
            self._trim_unknown()

    def _trim_unknown(self) -> None:
        """Keep the UNKNOWN_HOSTS_KEEP most frequent hosts; among equal counts the later
        first seen (nlargest is stable, so iterate newest first)."""
        hosts = self.unknown_hosts
        keep = {
            host
            for host, _ in heapq.nlargest(
                UNKNOWN_HOSTS_KEEP, reversed(hosts.items()), key=lambda item: item[1]
            )
        }
        for host in [h for h in hosts if h not in keep]:
            del hosts[host]

    # --- the store ------------------------------------------------------------------------

    async def load(self, store: Store) -> None:
        """Read back what `flush` saved. Meant once, at start, before the first flush:
        counts made before it are added to the stored ones. Entries that cannot be read are
        skipped with a log line; a StoreError (the store itself fails) is raised."""
        stored = await store.load_call_stats()
        loaded = skipped = 0
        for name, data in stored.items():
            try:
                if name == UNKNOWN_HOSTS_KEY:
                    self._load_unknown(data)
                    continue
                if not isinstance(data, Mapping):
                    raise ValueError(f"not an object but {type(data).__name__}")
                stats = CallStats.from_dict(data)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                skipped += 1
                event(log, "collector.stats_unreadable", level=logging.WARNING, service=name,
                      error=f"{type(exc).__name__}: {exc}")
                continue
            loaded += 1
            current = self._stats.get(name)
            if current is None:
                self._stored[name] = stats
                continue
            # ensure()d before load: its created_at is the record's, its counts are new.
            if current.total or current.last_call is not None:
                _add_counts(stats, current)
                self._dirty.add(name)
            stats.created_at = current.created_at
            self._stats[name] = stats
            if stats.last_call is not None:
                metrics.LAST_REQUEST.labels(service=name).set(stats.last_call)
        event(log, "collector.loaded", services=loaded, skipped=skipped,
              unknown_hosts=len(self.unknown_hosts))

    def _load_unknown(self, data: Any) -> None:
        if not isinstance(data, Mapping):
            raise ValueError(f"unknown-host counts: not an object but {type(data).__name__}")
        if data.get("format") != UNKNOWN_HOSTS_FORMAT:
            raise ValueError(f"unknown-host counts format {data.get('format')!r} is not "
                             f"{UNKNOWN_HOSTS_FORMAT}")
        hosts = data.get("hosts")
        if not isinstance(hosts, Mapping):
            raise ValueError("unknown-host counts without a 'hosts' object")
        counts = {str(host): int(count) for host, count in hosts.items()}
        if self.unknown_hosts:
            self._unknown_dirty = True
        for host, count in counts.items():
            if count > 0:
                self._count_unknown(host, count)

    async def flush(self, store: Store) -> None:
        """Save every service whose stats changed since the last flush, and the unknown-host
        counts if they changed. On StoreError: log, count, keep everything dirty for the
        next flush; never raises it. Flushes are serialised, so an older snapshot never
        overwrites a newer one."""
        async with self._flush_lock:
            names, self._dirty = self._dirty, set()
            unknown, self._unknown_dirty = self._unknown_dirty, False
            payload: dict[str, dict[str, Any]] = {
                name: self._stats[name].to_dict() for name in names if name in self._stats
            }
            if unknown:
                payload[UNKNOWN_HOSTS_KEY] = {"format": UNKNOWN_HOSTS_FORMAT,
                                              "hosts": dict(self.unknown_hosts)}
            if not payload:
                return
            try:
                await store.save_call_stats(payload)
            except BaseException as exc:
                self._dirty.update(name for name in names if name in self._stats)
                self._unknown_dirty = self._unknown_dirty or unknown
                if not isinstance(exc, StoreError):
                    raise
                metrics.CALL_STATS_FLUSHES.labels(outcome="failed").inc()
                event(log, "collector.flush_failed", level=logging.WARNING,
                      entries=len(payload), error=str(exc))
                return
            metrics.CALL_STATS_FLUSHES.labels(outcome="ok").inc()
            event(log, "collector.flushed", level=logging.DEBUG, entries=len(payload))

    async def run_flusher(self, store: Store, every: float) -> None:
        """Flush every `every` seconds until cancelled; then flush once more, so that a
        clean stop loses nothing, and re-raise the cancellation."""
        try:
            while True:
                await asyncio.sleep(every)
                try:
                    await self.flush(store)
                except Exception as exc:  # a bug must not stop the flushing for good
                    metrics.CALL_STATS_FLUSHES.labels(outcome="failed").inc()
                    event(log, "collector.flush_failed", level=logging.ERROR,
                          error=f"{type(exc).__name__}: {exc}")
        except asyncio.CancelledError:
            await self.flush(store)
            raise


def _add_counts(into: CallStats, other: CallStats) -> None:
    """Add `other`'s calls to `into` (the stored stats of a service counted before load)."""
    into.total += other.total
    for key, counts in other.buckets.items():
        target = into.buckets.setdefault(key, {})
        for number, count in counts.items():
            target[number] = target.get(number, 0) + count
    for hour in range(HOURS_PER_WEEK):
        into.by_hour_of_week[hour] += other.by_hour_of_week[hour]
    if other.last_call is not None:
        into.touch(other.last_call)
