"""The savings ledger: what sleeping saved and what waking cost, per service, durably.

Owns, per service: replica-seconds saved (time HIBERNATED or EVICTED x recorded replicas),
replica-seconds spent loaded but idle (time ACTIVE in check intervals without a call x
replicas), cold starts (completed wakes a request or `torpor wake` asked for) with
their wait (WAKING → ACTIVE), and pre-wakes with how many were wasted (back to sleep with
no call since the pre-wake). Amounts go into hour buckets (merged into day buckets after
`HOURLY_FOR`, dropped after `KEEP_FOR`) so that a report can cut at `--since`, and into
lifetime totals. The ledger reads the state changes from the service records' history,
never from its own clock: counting is idempotent by transition time (`events_until`) and
by the end of the last counted interval (`counted_until`), both kept in its documents, so
a restart or a new leader continues where the stored documents end, counting nothing twice.

Must not do I/O (the control plane loads and saves its documents, kind `DOCUMENT_KIND`,
and decides that only the leader's ledger counts) nor change any service.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torpor import metrics
from torpor.lifecycle.wake import PREWAKE_REASON, VERSION_SHIFT_REASON
from torpor.logs import event
from torpor.model import ServiceRecord, ServiceState, Transition

log = logging.getLogger("torpor.ledger")

#: The store's document kind holding one service's ledger.
DOCUMENT_KIND = "ledger"
#: Version of a ledger document; another version is not read (counting starts afresh).
FORMAT = 1

HOUR = 3600
DAY = 86400
#: Hour buckets younger than this are kept as they are; older ones merge into day buckets.
HOURLY_FOR = 2 * DAY
#: Buckets older than this are dropped (lifetime totals keep them).
KEEP_FOR = 30 * DAY

SLEEPING = frozenset({ServiceState.HIBERNATED, ServiceState.EVICTED})

LastCallOf = Callable[[str], float | None]


@dataclasses.dataclass
class Savings:
    """Amounts of one service (or a sum of several) over some time."""

    replica_seconds_saved: float = 0.0
    replica_seconds_idle: float = 0.0
    cold_starts: int = 0
    cold_start_seconds: float = 0.0
    prewakes: int = 0
    prewakes_wasted: int = 0

    def add(self, other: Savings) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def to_list(self) -> list[float]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    @classmethod
    def from_list(cls, values: Iterable[Any]) -> Savings:
        numbers = [float(v) for v in values]
        if len(numbers) != len(dataclasses.fields(cls)) or not all(map(math.isfinite, numbers)):
            raise ValueError(f"not {len(dataclasses.fields(cls))} finite numbers: {numbers}")
        saved, idle, cold, cold_seconds, prewakes, wasted = numbers
        return cls(saved, idle, int(cold), cold_seconds, int(prewakes), int(wasted))

    def to_json(self, name: str) -> dict[str, Any]:
        """The `torpor report --json` object (contract keys)."""
        return {"name": name, **dataclasses.asdict(self)}


@dataclasses.dataclass
class PendingPrewake:
    """A pre-wake whose outcome is not known yet: useful once a call arrives after
    `waking_at`, wasted once the service goes back to sleep without one."""

    waking_at: float
    active_at: float


@dataclasses.dataclass
class Account:
    """The ledger of one service."""

    counted_until: float
    events_until: float
    totals: Savings = dataclasses.field(default_factory=Savings)
    buckets: dict[int, Savings] = dataclasses.field(default_factory=dict)
    pending: PendingPrewake | None = None

    def bucket(self, at: float) -> Savings:
        start = int(at // HOUR) * HOUR
        return self.buckets.setdefault(start, Savings())

    def to_document(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "counted_until": self.counted_until,
            "events_until": self.events_until,
            "totals": self.totals.to_list(),
            "buckets": {str(start): b.to_list() for start, b in sorted(self.buckets.items())},
            "pending_prewake": None if self.pending is None
            else [self.pending.waking_at, self.pending.active_at],
        }

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> Account:
        """Raises ValueError (or KeyError, TypeError) for a document it cannot read."""
        if doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT}")
        pending = doc.get("pending_prewake")
        return cls(
            counted_until=float(doc["counted_until"]),
            events_until=float(doc["events_until"]),
            totals=Savings.from_list(doc["totals"]),
            buckets={int(start): Savings.from_list(values)
                     for start, values in dict(doc["buckets"]).items()},
            pending=None if pending is None
            else PendingPrewake(float(pending[0]), float(pending[1])),
        )


class Ledger:
    """Every service's account; `started_at` is where a service without one starts."""

    def __init__(self, started_at: float, accounts: Mapping[str, Account] | None = None,
                 idle_window_limit: float = math.inf, export_metrics: bool = True) -> None:
        """`idle_window_limit`: a tick longer than this (the control plane was down or
        not leading: replicas may not have run, calls were not seen) counts loaded-idle
        time only for its last `idle_window_limit` seconds; sleeping time, read from the
        records' history, counts whole. `export_metrics`: False for a copy that only
        reports (the counting ledger exports them)."""
        self._started_at = started_at
        self._idle_window_limit = idle_window_limit
        self._export = export_metrics
        self._accounts: dict[str, Account] = dict(accounts or {})
        self._dirty: set[str] = set()

    @classmethod
    def from_documents(cls, docs: Mapping[str, Mapping[str, Any]], now: float,
                       idle_window_limit: float = math.inf,
                       export_metrics: bool = True) -> Ledger:
        """The ledger the stored documents describe; an unreadable one is skipped with a
        log line (that service's counting starts at `now`)."""
        accounts: dict[str, Account] = {}
        for name, doc in docs.items():
            try:
                accounts[name] = Account.from_document(doc)
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                event(log, "ledger.document_unreadable", service=name, error=repr(exc),
                      level=logging.WARNING)
        return cls(now, accounts, idle_window_limit, export_metrics)

    def names(self) -> list[str]:
        return sorted(self._accounts)

    def account(self, name: str) -> Account | None:
        return self._accounts.get(name)

    # --- counting -----------------------------------------------------------------------

    def observe(self, record: ServiceRecord) -> None:
        """Count the completed wakes in `record`'s history not counted yet (a store
        listener calls this on every write; `tick` calls it too, so none is missed)."""
        account = self._account(record.name)
        history = record.history
        for index, entry in enumerate(history):
            if entry.at <= account.events_until:
                continue
            account.events_until = entry.at
            self._dirty.add(record.name)
            if entry.from_state is ServiceState.WAKING and entry.to_state is ServiceState.ACTIVE:
                waking = _wake_started(history, index)
                if waking is not None:
                    self._count_wake(record.name, account, waking, entry.at)

    def tick(self, now: float, records: Iterable[ServiceRecord], last_call_of: LastCallOf) -> None:
        """Count the time since the last tick: asleep and loaded-idle replica-seconds of
        every record, and the outcome of pending pre-wakes; then drop old buckets."""
        for record in records:
            self.observe(record)
            account = self._account(record.name)
            last_call = last_call_of(record.name)
            if now > account.counted_until:
                self._count_time(record, account, account.counted_until, now, last_call)
                account.counted_until = now
                self._dirty.add(record.name)
            if account.pending is not None:
                self._settle_prewake(record, account, last_call)
        for account in self._accounts.values():
            _compact(account, now)

    def _account(self, name: str) -> Account:
        account = self._accounts.get(name)
        if account is None:
            account = Account(counted_until=self._started_at, events_until=self._started_at)
            self._accounts[name] = account
            self._dirty.add(name)
        return account

    def _count_wake(self, name: str, account: Account, waking: Transition,
                    active_at: float) -> None:
        """A WAKING → ACTIVE: a cold start, a pre-wake, or neither (a version shift)."""
        if waking.reason.startswith(VERSION_SHIFT_REASON):
            return
        bucket = account.bucket(active_at)
        if waking.reason.startswith(PREWAKE_REASON):
            for into in (account.totals, bucket):
                into.prewakes += 1
            account.pending = PendingPrewake(waking.at, active_at)
            return
        wait = max(0.0, active_at - waking.at)
        for into in (account.totals, bucket):
            into.cold_starts += 1
            into.cold_start_seconds += wait
        if self._export:
            metrics.COLD_STARTS.labels(service=name).inc()
            metrics.COLD_START_SECONDS.labels(service=name).observe(wait)
            event(log, "ledger.cold_start", service=name, seconds=round(wait, 3),
                  reason=waking.reason)

    def _count_time(self, record: ServiceRecord, account: Account, start: float, end: float,
                    last_call: float | None) -> None:
        """Replica-seconds asleep and loaded-idle in (start, end]: idle only when no call
        came in it (a loaded check interval without calls, as the replay counts)."""
        called = last_call is not None and last_call > start
        idle_from = max(start, end - self._idle_window_limit)
        for state, a, b in state_segments(record, start, end):
            if state in SLEEPING:
                saved = (b - a) * record.recorded_replicas
                self._spread(account, a, b, saved, "replica_seconds_saved")
                if self._export:
                    metrics.REPLICA_SECONDS_SAVED.labels(service=record.name).inc(saved)
            elif state is ServiceState.ACTIVE and not called and b > idle_from:
                a = max(a, idle_from)
                idle = (b - a) * _loaded_replicas(record)
                self._spread(account, a, b, idle, "replica_seconds_idle")

    def _spread(self, account: Account, a: float, b: float, amount: float, field: str) -> None:
        """Add `amount`, earned evenly over [a, b), to the hour buckets it spans."""
        if amount <= 0 or b <= a:
            return
        setattr(account.totals, field, getattr(account.totals, field) + amount)
        at = max(a, b - KEEP_FOR)  # what is older than every bucket only goes to the totals
        while at < b:
            until = min(b, (int(at // HOUR) + 1) * HOUR)
            bucket = account.bucket(at)
            setattr(bucket, field, getattr(bucket, field) + amount * (until - at) / (b - a))
            at = until

    def _settle_prewake(self, record: ServiceRecord, account: Account,
                        last_call: float | None) -> None:
        """Useful once a call came after the pre-wake began (before the service slept
        again); wasted once it left ACTIVE without one."""
        pending = account.pending
        assert pending is not None
        left = next((t for t in record.history
                     if t.at > pending.active_at and t.from_state is ServiceState.ACTIVE), None)
        if last_call is not None and last_call >= pending.waking_at and (
                left is None or last_call < left.at):
            outcome = "useful"
        elif left is not None or record.state is not ServiceState.ACTIVE:
            outcome = "wasted"
            at = left.at if left is not None else pending.active_at
            for into in (account.totals, account.bucket(at)):
                into.prewakes_wasted += 1
        else:
            return
        account.pending = None
        self._dirty.add(record.name)
        if self._export:
            metrics.PREWAKES.labels(service=record.name, outcome=outcome).inc()
            event(log, "ledger.prewake_settled", service=record.name, outcome=outcome)

    # --- documents and reports ----------------------------------------------------------

    def take_dirty(self) -> dict[str, dict[str, Any]]:
        """The documents of accounts changed since the last call (to save); if saving
        fails, call `mark_dirty` with their names."""
        names, self._dirty = self._dirty, set()
        return {name: self._accounts[name].to_document()
                for name in sorted(names) if name in self._accounts}

    def mark_dirty(self, names: Iterable[str]) -> None:
        self._dirty.update(names)

    def documents(self) -> dict[str, dict[str, Any]]:
        return {name: account.to_document() for name, account in self._accounts.items()}

    def report(self, now: float, since: float | None = None) -> list[tuple[str, Savings]]:
        """Per service (sorted by name): lifetime totals, or with `since` (seconds) every
        bucket overlapping (now - since, now] (whole hours; whole days beyond HOURLY_FOR)."""
        rows = []
        for name in self.names():
            account = self._accounts[name]
            if since is None:
                rows.append((name, dataclasses.replace(account.totals)))
                continue
            summed = Savings()
            for start, bucket in account.buckets.items():
                if start + _bucket_length(start, now) > now - since:
                    summed.add(bucket)
            rows.append((name, summed))
        return rows


def total(rows: Iterable[tuple[str, Savings]]) -> Savings:
    summed = Savings()
    for _, savings in rows:
        summed.add(savings)
    return summed


def state_segments(record: ServiceRecord, start: float,
                   end: float) -> list[tuple[ServiceState, float, float]]:
    """The states `record` was in during (start, end], as (state, from, to) pieces, read
    from its history (before its first entry: that entry's `from_state`, if any)."""
    history = record.history
    if not history:
        return [(record.state, start, end)] if end > start else []
    pieces: list[tuple[ServiceState, float, float]] = []
    state: ServiceState | None = history[0].from_state
    at = start
    for entry in history:
        if entry.at > at:
            if state is not None:
                pieces.append((state, at, min(entry.at, end)))
            at = min(entry.at, end)
        state = entry.to_state
        if at >= end:
            return pieces
    if end > at:
        pieces.append((record.state, at, end))
    return pieces


def _loaded_replicas(record: ServiceRecord) -> int:
    """Replicas of the service while it was ACTIVE: what should run now, or for a service
    that slept since, the count recorded at its hibernation."""
    return record.desired_replicas if record.state is ServiceState.ACTIVE \
        else record.recorded_replicas


def _wake_started(history: tuple[Transition, ...], active: int) -> Transition | None:
    """The entry into WAKING that the WAKING → ACTIVE at index `active` ended (None when
    the history no longer holds it)."""
    before = history[active - 1] if active > 0 else None
    return before if before is not None and before.to_state is ServiceState.WAKING else None


def _bucket_length(start: int, now: float) -> int:
    """An hour, or a day for a bucket at midnight older than HOURLY_FOR (merged)."""
    return DAY if start % DAY == 0 and start < now - HOURLY_FOR else HOUR


def _compact(account: Account, now: float) -> None:
    """Merge hour buckets older than HOURLY_FOR into day buckets; drop buckets older than
    KEEP_FOR."""
    for start in [s for s in account.buckets if s < now - HOURLY_FOR]:
        bucket = account.buckets[start]
        day = start - start % DAY
        if start < now - KEEP_FOR - DAY:
            del account.buckets[start]
        elif day != start:
            del account.buckets[start]
            account.buckets.setdefault(day, Savings()).add(bucket)
