"""The hibernation procedures: hibernate, evict, and repair what a crash left half-done.

Owns carrying out the steps of transitions.py that put a service to sleep: make-before-
break (record the replica count and write HIBERNATING, push, and only once every connected
Envoy applied the switch to the activator scale to zero), eviction (write EVICTED, push:
routes go first, then the cluster), and repair (a HIBERNATING or WAKING nobody holds the lock
of is made definite). Each runs under the service's lock, the one a wake takes, so a wake
and a hibernation of one service never interleave. Must not choose states (the table does)
nor know Envoy: it pushes through the Routing port and reads call times through CallTimes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable

from torpor import metrics
from torpor.clock import Clock
from torpor.errors import InvalidTransitionError, TorporError, UnknownServiceError, WorkloadError
from torpor.lifecycle.ports import CallTimes, Routing
from torpor.lifecycle.records import change_state
from torpor.lifecycle.transitions import Action, Event, Step, decide
from torpor.locks import LockTimeoutError, ServiceLocks, lock_key
from torpor.logs import event
from torpor.model import ServiceRecord, ServiceState
from torpor.store.base import Store
from torpor.workloads.base import Workloads

log = logging.getLogger("torpor.reconciler")

S = ServiceState

#: Repair only takes a lock nobody holds: a short wait is enough to tell.
REPAIR_LOCK_WAIT = 0.05

#: Why repair moved a service, by what it found (shown in the service's history).
_REPAIR_REASONS = {
    (S.HIBERNATING, Event.REPAIR_READY):
        "hibernation interrupted (its control plane stopped before scaling to 0)",
    (S.HIBERNATING, Event.REPAIR_NOT_READY):
        "hibernation interrupted (its control plane stopped before scaling to 0)",
    (S.WAKING, Event.REPAIR_READY):
        "wake interrupted after its replicas were ready (its waker stopped or lost the store)",
    (S.WAKING, Event.REPAIR_NOT_READY):
        "wake interrupted (its waker stopped before the service was ready)",
}


class NotAppliedError(TorporError):
    """An Envoy did not apply a push in time (or NACKed it)."""


class Hibernation:
    """Moves services along ACTIVE → HIBERNATING → HIBERNATED → EVICTED, and repairs."""

    def __init__(self, store: Store, workloads: Workloads, locks: ServiceLocks,
                 routing: Routing, calls: CallTimes, clock: Clock, *, lock_wait: float,
                 on_record: Callable[[ServiceRecord], None] = lambda record: None) -> None:
        """`lock_wait`: how long `torpor hibernate` waits for a wake under way.
        `on_record(record)`: told of every record read or written here, before a push, so
        that the table pushed is the one just written."""
        self._store = store
        self._workloads = workloads
        self._locks = locks
        self._routing = routing
        self._calls = calls
        self._clock = clock
        self._lock_wait = lock_wait
        self._on_record = on_record

    async def hibernate(self, name: str, reason: str, lock_wait: float | None = None,
                        cause: Event = Event.HIBERNATE) -> ServiceRecord:
        """Make-before-break: traffic to the activator, every Envoy applied it, then scale
        to 0. Raises InvalidTransitionError unless the service is ACTIVE. If an Envoy does
        not apply the switch in time (or NACKs), or the scale fails, the service goes back
        to ACTIVE on its replicas (the returned record says why)."""
        async with self._holding(name, S.ACTIVE, lock_wait) as record:
            replicas = self._workloads.desired_replicas(name) or record.desired_replicas
            step = decide(name, record.state, cause)
            record = await self._write(record, step, reason, recorded_replicas=replicas)
            try:
                await self._run(name, step.after, replicas)
            except NotAppliedError:
                metrics.HIBERNATE_FAILURES.labels(service=name).inc()
                return await self._take(
                    record, decide(name, record.state, Event.HIBERNATION_ABANDONED),
                    "hibernation abandoned: an Envoy did not apply the switch to the "
                    "activator in time")
            acked = decide(name, record.state, Event.HIBERNATION_ACKED)
            try:
                record = await self._take(record, acked, f"scaled 0 of {replicas}",
                                          last_call=self._calls.last_call(name))
            except WorkloadError as exc:
                metrics.HIBERNATE_FAILURES.labels(service=name).inc()
                return await self._take(
                    record, decide(name, record.state, Event.HIBERNATION_SCALE_FAILED),
                    f"hibernation abandoned: {exc}", restore=replicas)
            metrics.HIBERNATIONS.labels(service=name).inc()
            return record

    async def evict(self, name: str, reason: str, lock_wait: float | None = None) -> ServiceRecord:
        """Remove a hibernated service's route and cluster from Envoy. A request for its
        host still reaches the activator through the catch-all virtual host, and wakes it."""
        async with self._holding(name, S.HIBERNATED, lock_wait) as record:
            record = await self._take(record, decide(name, record.state, Event.POLICY_DORMANT),
                                      reason)
            metrics.EVICTIONS.labels(service=name).inc()
            return record

    async def repair(self, records: Iterable[ServiceRecord],
                     lock_wait: float = REPAIR_LOCK_WAIT) -> None:
        """States a crash can leave behind, made definite (transitions.py's REPAIR rows).
        Only where nobody holds the service's lock: a held lock means the hibernation or
        wake is still under way (in a fleet, possibly in another process); a dead holder's
        lock goes with its lease and the next pass repairs."""
        for record in list(records):
            if record.state not in (S.HIBERNATING, S.WAKING):
                continue
            try:
                await self._repair(record.name, lock_wait)
            except (LockTimeoutError, InvalidTransitionError):
                continue
            except TorporError as exc:
                event(log, "policy.repair_failed", service=record.name, error=str(exc),
                      level=logging.ERROR)

    async def _repair(self, name: str, lock_wait: float) -> None:
        async with self._locks.hold(lock_key(name), lock_wait):
            record = await self._fresh(name)
            found = (Event.REPAIR_READY if self._workloads.ready_endpoints(name)
                     else Event.REPAIR_NOT_READY)
            reason = _REPAIR_REASONS.get((record.state, found), "repaired")
            await self._take(record, decide(name, record.state, found), reason)

    # --- carrying out a step ----------------------------------------------------------

    async def _take(self, record: ServiceRecord, step: Step, reason: str,
                    restore: int = 0, **changes: object) -> ServiceRecord:
        """The whole step: `before` effects, the write, then `after` effects. Raises
        NotAppliedError (AWAIT_APPLIED) or WorkloadError (SCALE_TO_ZERO) for the caller to
        turn into the next event."""
        record = await self._write(record, step, reason, **changes)
        await self._run(record.name, step.after, restore)
        return record

    async def _write(self, record: ServiceRecord, step: Step, reason: str,
                     **changes: object) -> ServiceRecord:
        """`before` effects, then the state the step writes (if any)."""
        await self._run(record.name, step.before, 0)
        if step.to is None:
            return record
        record = await change_state(self._store, record, step.to, reason, self._clock.now(),
                                    **changes)
        self._on_record(record)
        return record

    async def _run(self, name: str, actions: tuple[Action, ...], restore: int) -> None:
        for action in actions:
            if action is Action.PUSH:
                await self._routing.push()
            elif action is Action.AWAIT_APPLIED:
                if not await self._routing.push():
                    raise NotAppliedError(f"service {name!r}: an Envoy did not apply the "
                                          "switch in time")
            elif action is Action.SCALE_TO_ZERO:
                await self._workloads.scale(name, 0)
            elif action is Action.RESTORE_REPLICAS:
                with contextlib.suppress(WorkloadError):
                    await self._workloads.scale(name, restore)
            else:  # pragma: no cover - the table gives a hibernation no other action
                raise AssertionError(f"a hibernation cannot {action.value}")

    @contextlib.asynccontextmanager
    async def _holding(self, name: str, state: ServiceState,
                       lock_wait: float | None) -> AsyncIterator[ServiceRecord]:
        """Hold the service's lock and yield its stored record, which must still be in
        `state`, the one the caller decided for (else InvalidTransitionError: someone
        else moved it meanwhile, and the caller's verdict is out of date)."""
        async with self._locks.hold(lock_key(name), lock_wait or self._lock_wait):
            record = await self._fresh(name)
            if record.state is not state:
                verb = "hibernated" if state is S.ACTIVE else "evicted"
                raise InvalidTransitionError(
                    f"service {name!r} is {record.state.value}; only a service that is "
                    f"{state.value} can be {verb}")
            yield record

    async def _fresh(self, name: str) -> ServiceRecord:
        record = await self._store.get(name)
        if record is None:
            raise UnknownServiceError(f"unknown service {name!r}")
        self._on_record(record)
        return record
