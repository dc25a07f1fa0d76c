"""The reconciler: applies the idle policy to the service table, every `check_every`.

Owns: hibernating (make-before-break: record the replica count, point the service's
cluster at the activator, wait until every connected Envoy applied that, only then scale
to zero), evicting (remove the virtual host, then the cluster), and repairing states a
crash left half-done. Each step runs under the service's lock, the one the waker takes, so
a wake and a hibernation of one service never interleave. Must not build Envoy config or
speak xDS: it changes records and asks the control plane to push (`push`), and the control
plane decides what each state means for Envoy.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

from policies import Activity, PolicySettings, decide
from torpor import metrics
from torpor.catalog import ServiceCatalog
from torpor.clock import Clock
from torpor.config import Config, ServiceConfig
from torpor.errors import InvalidTransitionError, TorporError, UnknownServiceError, WorkloadError
from torpor.locks import LockTimeoutError, ServiceLocks, lock_key
from torpor.logs import event
from torpor.model import ServiceRecord, ServiceState
from torpor.store.base import Store
from torpor.transitions import change_state, last_woken
from torpor.workloads.base import Workloads
from xds_server.collector import CallCollector

log = logging.getLogger("torpor.reconciler")

S = ServiceState

#: How long a policy pass waits for a service's lock before leaving it for the next pass
#: (a wake in progress holds it; the next pass sees the outcome).
POLICY_LOCK_WAIT = 0.5
#: Repair only takes a lock nobody holds: a short wait is enough to tell.
REPAIR_LOCK_WAIT = 0.05


def policy_settings(config: Config, service: ServiceConfig) -> PolicySettings:
    """The policy section with the service's own overrides applied."""
    base, own = config.policy, service.policy
    return PolicySettings(
        idle_after=base.idle_after if own.idle_after is None else own.idle_after,
        evict_after=base.evict_after if own.evict_after is None else own.evict_after,
        creation_grace=base.creation_grace if own.creation_grace is None else own.creation_grace,
        never_sleep=service.never_sleep,
    )


class Reconciler:
    """Moves services along ACTIVE → HIBERNATING → HIBERNATED → EVICTED."""

    def __init__(self, config: Config, store: Store, workloads: Workloads, locks: ServiceLocks,
                 collector: CallCollector, clock: Clock,
                 records: Callable[[], Mapping[str, ServiceRecord]],
                 apply: Callable[[ServiceRecord], None],
                 push: Callable[[], Awaitable[bool]],
                 catalog: ServiceCatalog | None = None) -> None:
        self._config = config
        self._store = store
        self._workloads = workloads
        self._locks = locks
        self._collector = collector
        self._clock = clock
        self._records = records
        self._apply = apply
        self._push = push
        # Discovered services come and go: settings are looked up per pass.
        self._catalog = catalog if catalog is not None else ServiceCatalog(config.services)
        self._lock_wait = max(config.activator.wake_timeout, config.control_plane.ack_timeout)

    # --- the policy loop ------------------------------------------------------------

    async def check(self) -> None:
        """One pass: hibernate what went quiet, evict what stayed silent."""
        metrics.POLICY_CHECKS.inc()
        await self.repair()
        for name, record in list(self._records().items()):
            service = self._catalog.get(name)
            if record.state not in (S.ACTIVE, S.HIBERNATED) or service is None:
                continue
            stats = self._collector.ensure(name, record.created_at)
            settings = policy_settings(self._config, service)
            decision = decide(stats, settings, self._clock.now(), last_woken(record))
            try:
                if record.state is S.ACTIVE and decision.activity is not Activity.ACTIVE:
                    await self.hibernate(name, decision.reason, POLICY_LOCK_WAIT)
                elif record.state is S.HIBERNATED and decision.activity is Activity.DORMANT:
                    await self.evict(name, decision.reason, POLICY_LOCK_WAIT)
            except (LockTimeoutError, InvalidTransitionError) as exc:
                event(log, "policy.skipped", service=name, why=str(exc), level=logging.DEBUG)
            except TorporError as exc:
                event(log, "policy.failed", service=name, error=str(exc), level=logging.ERROR)

    # --- operations (also `torpor hibernate`) -----------------------------------------

    async def hibernate(self, name: str, reason: str,
                        lock_wait: float | None = None) -> ServiceRecord:
        """Make-before-break: traffic to the activator, every Envoy ACKed, then scale to 0.

        Raises InvalidTransitionError unless the service is ACTIVE. If an Envoy does not
        apply the switch in time (or NACKs), the service goes back to ACTIVE untouched."""
        async with self._holding(name, S.ACTIVE, "hibernated", lock_wait) as record:
            replicas = self._workloads.desired_replicas(name) or record.desired_replicas
            record = await self._move(record, S.HIBERNATING, reason, recorded_replicas=replicas)
            if not await self._push():
                metrics.HIBERNATE_FAILURES.labels(service=name).inc()
                record = await self._move(record, S.ACTIVE, "hibernation abandoned: an Envoy "
                                          "did not apply the switch to the activator in time")
                await self._push()
                return record
            try:
                await self._workloads.scale(name, 0)
            except WorkloadError as exc:
                metrics.HIBERNATE_FAILURES.labels(service=name).inc()
                record = await self._move(record, S.ACTIVE, f"hibernation abandoned: {exc}")
                with contextlib.suppress(WorkloadError):
                    await self._workloads.scale(name, replicas)
                await self._push()
                return record
            record = await self._move(record, S.HIBERNATED, f"scaled 0 of {replicas}",
                                      last_call=self._collector.last_call(name))
            metrics.HIBERNATIONS.labels(service=name).inc()
            return record

    async def evict(self, name: str, reason: str, lock_wait: float | None = None) -> ServiceRecord:
        """Remove a hibernated service's route and cluster from Envoy (routes first; the
        publisher orders removals). A request for its host still reaches the activator
        through the catch-all virtual host, and wakes it."""
        async with self._holding(name, S.HIBERNATED, "evicted", lock_wait) as record:
            record = await self._move(record, S.EVICTED, reason)
            metrics.EVICTIONS.labels(service=name).inc()
            await self._push()
            return record

    async def repair(self, lock_wait: float = REPAIR_LOCK_WAIT) -> None:
        """States a crash can leave behind, made definite: an unfinished hibernation
        returns to ACTIVE (the policy decides again); an unfinished wake returns to
        HIBERNATED (the next request wakes it again). Only where nobody holds the
        service's lock: a held lock means the hibernation or wake is still under way
        (in a fleet, possibly in another process); a dead holder's lock goes with its
        lease and the next pass repairs. Runs at start-up, and in every policy pass."""
        for record in list(self._records().values()):
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
            if record.state is S.HIBERNATING:
                await self._move(record, S.ACTIVE, "hibernation interrupted (its control "
                                 "plane stopped before scaling to 0)")
            elif record.state is S.WAKING and self._workloads.ready_endpoints(name):
                await self._move(record, S.ACTIVE, "wake interrupted after its replicas were "
                                 "ready (its waker stopped or lost the store)")
            elif record.state is S.WAKING:
                await self._move(record, S.HIBERNATED, "wake interrupted (its waker stopped "
                                 "before the service was ready)")

    # --- helpers ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _holding(self, name: str, state: ServiceState, verb: str,
                       lock_wait: float | None) -> AsyncIterator[ServiceRecord]:
        """Hold the service's lock and yield its stored record, which must be in `state`
        (else InvalidTransitionError: someone else moved it meanwhile)."""
        async with self._locks.hold(lock_key(name), lock_wait or self._lock_wait):
            record = await self._fresh(name)
            if record.state is not state:
                raise InvalidTransitionError(
                    f"service {name!r} is {record.state.value}; only a service that is "
                    f"{state.value} can be {verb}")
            yield record

    async def _fresh(self, name: str) -> ServiceRecord:
        record = await self._store.get(name)
        if record is None:
            raise UnknownServiceError(f"unknown service {name!r}")
        self._apply(record)
        return record

    async def _move(self, record: ServiceRecord, to: ServiceState, reason: str,
                    **changes: object) -> ServiceRecord:
        moved = await change_state(self._store, record, to, reason, self._clock.now(),
                                   **changes)
        self._apply(moved)
        return moved
