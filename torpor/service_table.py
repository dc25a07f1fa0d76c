"""The service table: every service of the catalog joined with its stored record.

Owns the one in-memory copy of the records a control plane routes by, kept current from
the store's change notifications (a wake written by an activator in another process is
seen at once), taking a catalog service into it (its stored record, else its first record)
and starting the replicas of services that should run. Must not decide states
(torpor.lifecycle does) nor know Envoy: it tells `on_change` and the routing reacts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from torpor import metrics
from torpor.catalog import CatalogChange, ServiceCatalog
from torpor.clock import Clock
from torpor.config import ServiceConfig
from torpor.errors import ConflictError, StoreError
from torpor.lifecycle.records import first_record
from torpor.lifecycle.transitions import runs_replicas
from torpor.logs import event
from torpor.model import ServiceRecord, ServiceStatus
from torpor.store.base import Store
from torpor.workloads.base import Workloads

log = logging.getLogger("torpor.control_plane")


class ServiceTable:
    """Records by service name, for the services of `catalog`."""

    def __init__(self, catalog: ServiceCatalog, store: Store, workloads: Workloads,
                 clock: Clock, on_change: Callable[[str], None] = lambda name: None,
                 on_registered: Callable[[str, float], object] = lambda name, at: None) -> None:
        """`on_change(name)`: the record of service `name` came, went or changed (push).
        `on_registered(name, created_at)`: a service joined the table (the collector keeps
        its statistics)."""
        self.catalog = catalog
        self._store = store
        self._workloads = workloads
        self._clock = clock
        self._on_change = on_change
        self._on_registered = on_registered
        self.records: dict[str, ServiceRecord] = {}
        self._changed = asyncio.Event()

    async def load(self) -> None:
        """Join catalog services with stored records; a new service gets its first record."""
        stored = {r.name: r for r in await self._store.list()}
        for service in self.catalog.services():
            await self.register(service, stored.get(service.name))

    async def register(self, service: ServiceConfig, record: ServiceRecord | None) -> None:
        """Take a service into the table: its stored record, else its first one. In a
        fleet another control plane may create it first: then its record is the one."""
        if record is None:
            try:
                record = await self._store.put(first_record(
                    service.name, service.replicas,
                    self._workloads.desired_replicas(service.name),
                    self._workloads.recorded_replicas(service.name), self._clock.now()))
                event(log, "service.registered", service=service.name,
                      state=record.state.value, replicas=service.replicas)
            except ConflictError:
                record = await self._store.get(service.name)
                if record is None:
                    raise StoreError(f"service {service.name!r}: its record was created and "
                                     "deleted while registering; try again") from None
        self.records[service.name] = record
        self._on_registered(service.name, record.created_at)
        metrics.set_service_state(service.name, record.state, record.recorded_replicas)

    async def ensure_running(self, record: ServiceRecord) -> None:
        """Replicas for a service that should run and has none asked for (a restarted
        local control plane); a Kubernetes Deployment already at its count is left alone,
        so torpor never fights a manual `kubectl scale` or an HPA."""
        if runs_replicas(record.state) and self._workloads.desired_replicas(record.name) == 0:
            await self._workloads.scale(record.name, record.desired_replicas)

    async def ensure_all_running(self) -> None:
        for record in list(self.records.values()):
            await self.ensure_running(record)

    async def catalog_changed(self, change: CatalogChange) -> None:
        """A discovered service came (register it, start it) or went (forget it)."""
        if change.after is not None and change.name not in self.records:
            await self.register(change.after, await self._store.get(change.name))
            await self.ensure_running(self.records[change.name])
        elif change.after is None:
            self.records.pop(change.name, None)
            metrics.forget_service(change.name)
        self._changed_now(change.name)

    def apply(self, record: ServiceRecord) -> None:
        """A record changed (here, or in another process through the store): a newer
        revision replaces the table's copy."""
        current = self.records.get(record.name)
        if current is None or record.revision <= current.revision:
            return
        self.records[record.name] = record
        metrics.set_service_state(record.name, record.state, record.recorded_replicas)
        self._changed_now(record.name)

    async def wait_for(self, holds: Callable[[], bool], timeout: float) -> bool:
        """Wait until `holds()` is true of the table (checked at every change), at most
        `timeout` seconds; returns whether it holds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not holds():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return holds()
        return True

    def endpoints_changed(self, name: str) -> None:
        """Ready endpoints of `name` changed (routing reads them from workloads)."""
        self._changed_now(name)

    def _changed_now(self, name: str) -> None:
        self._changed.set()
        self._on_change(name)

    def status(self, name: str, last_seen: float | None) -> ServiceStatus:
        """What `torpor status` shows of `name` (which must be in the table); `last_seen`:
        the latest call the access logs saw, newer than the stored one while unflushed."""
        record = self.records[name]
        service = self.catalog.get(name)
        last_call = max(filter(None, (record.last_call, last_seen)), default=None)
        return ServiceStatus(
            name=name,
            host=service.host if service else "",
            state=record.state,
            replicas=self._workloads.running_replicas(name),
            desired_replicas=record.desired_replicas,
            recorded_replicas=record.recorded_replicas,
            ready_endpoints=self._workloads.ready_endpoints(name),
            last_call=last_call,
            created_at=record.created_at,
            updated_at=record.updated_at,
            history=record.history,
            replica_problem=self._workloads.problem(name),
            source=self.catalog.source(name),
            hosts=service.routes().hosts if service else (),
            paths=service.paths if service else (),
            rewrite=service.rewrite if service else None,
        )
