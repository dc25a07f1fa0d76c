"""Waking a sleeping service: lock → WAKING → scale to the recorded count → ready → ACTIVE.

Owns: the order of a wake, doing it once however many requests ask (single flight within
the process, the service lock across processes), and leaving the service in a defined
state when the wake fails (back to HIBERNATED, never stuck in WAKING). Must not hold or
proxy requests (holding.py, proxy.py) nor push Envoy config: the control plane sees the
store change (WAKING re-adds an evicted route, ACTIVE flips the endpoints back) and pushes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from torpor import metrics
from torpor.clock import Clock, SystemClock
from torpor.errors import (
    ConflictError,
    StoreError,
    UnknownServiceError,
    WakeFailedError,
    WorkloadError,
)
from torpor.locks import LockTimeoutError, ServiceLocks, lock_key
from torpor.logs import event
from torpor.model import Endpoint, ServiceRecord, ServiceState
from torpor.store.base import Store
from torpor.transitions import change_state
from torpor.workloads.base import Workloads

log = logging.getLogger("torpor.waker")

S = ServiceState
FLIP_WHEN = ("first_ready", "all_ready")


class Wakes(Protocol):
    """What the activator needs: ready endpoints of a service, waking it if it sleeps."""

    async def wake(self, name: str, reason: str) -> tuple[Endpoint, ...]: ...


class SingleFlight:
    """One running wake per service; every caller awaits the same one.

    A caller that gives up (deadline, client gone) is cancelled alone: the wake goes on
    for the others and for the next request.
    """

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Future[tuple[Endpoint, ...]]] = {}

    def running(self, name: str) -> bool:
        return name in self._running

    async def join(self, name: str,
                   start: Callable[[], Awaitable[tuple[Endpoint, ...]]]) -> tuple[Endpoint, ...]:
        future = self._running.get(name)
        if future is None:
            future = asyncio.ensure_future(start())
            self._running[name] = future
            future.add_done_callback(lambda f: self._finished(name, f))
        return await asyncio.shield(future)

    def _finished(self, name: str, future: asyncio.Future[tuple[Endpoint, ...]]) -> None:
        if self._running.get(name) is future:
            del self._running[name]
        if not future.cancelled():
            future.exception()  # retrieved: nobody may be left waiting on a failed wake


class Waker:
    """Wakes services through the store, the workloads and the service lock."""

    def __init__(self, store: Store, workloads: Workloads, locks: ServiceLocks, *,
                 wake_timeout: float, flip_when: str = "first_ready",
                 clock: Clock | None = None) -> None:
        if flip_when not in FLIP_WHEN:
            raise ValueError(f"flip_when must be one of {FLIP_WHEN}, not {flip_when!r}")
        self._store = store
        self._workloads = workloads
        self._locks = locks
        self._wake_timeout = wake_timeout
        self._flip_when = flip_when
        self._clock = clock or SystemClock()
        self._flights = SingleFlight()

    def waking(self, name: str) -> bool:
        """Whether a wake of `name` is under way in this process."""
        return self._flights.running(name)

    async def wake(self, name: str, reason: str) -> tuple[Endpoint, ...]:
        """Ready endpoints of `name`, waking it first if it sleeps. Raises
        UnknownServiceError, or WakeFailedError when it did not get ready in time."""
        return await self._flights.join(name, lambda: self._wake(name, reason))

    async def _wake(self, name: str, reason: str) -> tuple[Endpoint, ...]:
        started = self._clock.monotonic()
        deadline = started + self._wake_timeout
        try:
            async with self._locks.hold(lock_key(name), self._wake_timeout):
                return await self._wake_locked(name, reason, started, deadline)
        except LockTimeoutError as exc:
            self._count(name, "failed", started)
            raise WakeFailedError(f"service {name!r}: {exc}", "failed") from exc
        except ConflictError as exc:
            self._count(name, "failed", started)
            raise WakeFailedError(f"service {name!r}: its record kept changing during the "
                                  f"wake ({exc})", "failed") from exc
        except StoreError as exc:
            # etcd down (or sqlite failing): no wake without the lock and the record.
            self._count(name, "failed", started)
            raise WakeFailedError(f"service {name!r} cannot be woken now: the store is "
                                  f"unavailable ({exc})", "failed") from exc

    async def _wake_locked(self, name: str, reason: str, started: float,
                           deadline: float) -> tuple[Endpoint, ...]:
        record = await self._store.get(name)
        if record is None:
            raise UnknownServiceError(f"unknown service {name!r}")
        if record.state is S.ACTIVE:
            # Already awake (another waker finished, or Envoy has not applied the flip
            # yet): no transition, just its ready endpoints once there are some.
            return await self._ready(record, 1, deadline, started, woke=False)
        if record.state in (S.HIBERNATED, S.EVICTED, S.HIBERNATING):
            target = S.WAKING if record.state is not S.HIBERNATING else S.ACTIVE
            record = await self._move(record, target, reason)
        replicas = max(1, record.recorded_replicas)
        event(log, "wake.scaling", service=name, replicas=replicas, flip_when=self._flip_when)
        try:
            await self._workloads.scale(name, replicas)
        except WorkloadError as exc:
            await self._give_up(record, f"wake failed: {exc}", started, "failed")
            raise WakeFailedError(f"service {name!r}: {exc}", "failed") from exc
        needed = 1 if self._flip_when == "first_ready" else replicas
        ready = await self._ready(record, needed, deadline, started, woke=True)
        took = self._clock.monotonic() - started
        if record.state is not S.ACTIVE:
            try:
                await self._move(record, S.ACTIVE,
                                 f"{reason}; {len(ready)} ready after {took:.1f}s",
                                 desired_replicas=replicas)
            except StoreError as exc:
                # The replicas are ready: serve what is held. The record stays WAKING until
                # the store is back and the leader's repair sees ready replicas (→ ACTIVE).
                event(log, "wake.state_write_failed", service=name, error=str(exc),
                      level=logging.ERROR)
        self._count(name, "woken", started)
        return ready

    async def _ready(self, record: ServiceRecord, needed: int, deadline: float, started: float,
                     woke: bool) -> tuple[Endpoint, ...]:
        """Wait for `needed` ready endpoints until `deadline`; on time-out a wake gives up."""
        name = record.name
        now = self._clock.monotonic()
        current = self._workloads.ready_endpoints(name)
        if len(current) >= needed:
            return current
        try:
            return await self._workloads.wait_ready(name, needed, max(0.0, deadline - now))
        except TimeoutError as exc:
            if woke:
                await self._give_up(
                    record, f"wake timed out: not ready after {self._wake_timeout:g}s", started,
                    "timeout")
            else:
                self._count(name, "timeout", started)
            raise WakeFailedError(
                f"service {name!r} did not become ready within {self._wake_timeout:g}s "
                f"({exc})", "timeout") from exc

    async def _give_up(self, record: ServiceRecord, reason: str, started: float,
                       outcome: str) -> None:
        """A failed wake leaves the service HIBERNATED with no replica: a later request
        tries again from a known state."""
        with contextlib.suppress(WorkloadError):
            await self._workloads.scale(record.name, 0)
        current = await self._store.get(record.name)
        if current is not None and current.state in (S.WAKING, S.ACTIVE):
            target = S.HIBERNATED if current.state is S.WAKING else S.HIBERNATING
            moved = await self._move(current, target, reason)
            if moved.state is S.HIBERNATING:
                await self._move(moved, S.HIBERNATED, reason)
        self._count(record.name, outcome, started)

    async def _move(self, record: ServiceRecord, to: ServiceState, reason: str,
                    **changes: int) -> ServiceRecord:
        """change_state, re-reading once if the record changed meanwhile (a status write)."""
        now = self._clock.now()
        try:
            return await change_state(self._store, record, to, reason, now, **changes)
        except ConflictError:
            fresh = await self._store.get(record.name)
            if fresh is None:
                raise UnknownServiceError(f"unknown service {record.name!r}") from None
            return await change_state(self._store, fresh, to, reason, now, **changes)

    def _count(self, name: str, outcome: str, started: float) -> None:
        took = self._clock.monotonic() - started
        metrics.WAKE_OUTCOMES.labels(service=name, outcome=outcome).inc()
        metrics.WAKE_DURATION.labels(outcome=outcome).observe(took)
        event(log, "wake.finished", service=name, outcome=outcome, seconds=round(took, 3),
              level=logging.INFO if outcome == "woken" else logging.WARNING)
