"""The control plane: service table + store + workloads → Envoy config, and the admin API.

Owns: the in-memory service table (config joined with stored records, kept current from
the store's change notifications, so a wake written by an activator is pushed at once),
deciding where each service's traffic goes (its ready endpoints, the activator, or nowhere
when evicted), starting the replicas of active services, running the reconciler and the
statistics flusher, and serving ADS, access logs and the admin API. Must not speak the
xDS protocol itself (server.py), build protos (resources.py), decide policy (reconciler.py)
nor wake services itself (activator/waker.py).

Start-up order matters (FIELD_NOTES.md): the desired state is loaded from the store and
put in the cache *before* the xDS port accepts a stream, so a restarted control plane never
wipes Envoy's routes with an empty snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

import grpc

from activator.waker import Waker
from torpor import metrics
from torpor.advertise import advertised_activator_host
from torpor.catalog import CatalogChange, ServiceCatalog
from torpor.clock import Clock, SystemClock
from torpor.config import Config, ServiceConfig
from torpor.errors import ConflictError, StoreError, TorporError, UnknownServiceError, WorkloadError
from torpor.etcd.election import LeaderElection
from torpor.etcd.registry import Activator, ActivatorRegistry
from torpor.locks import LocalLocks, ServiceLocks
from torpor.logs import event
from torpor.model import Endpoint, ServiceRecord, ServiceState, ServiceStatus, Transition
from torpor.store.base import Store
from torpor.workloads.base import Discovery, Workloads
from xds_server.admin_api import start_admin_server
from xds_server.cache import SnapshotCache
from xds_server.collector import CallCollector
from xds_server.publisher import Publisher, Resources
from xds_server.reconciler import Reconciler
from xds_server.resources import GatewaySettings, ResourceBuilder, RoutedService
from xds_server.server import AdsServer
from xds_server.serving import start_xds_listener

log = logging.getLogger("torpor.control_plane")

#: States in which a service's replicas should run.
RUNNING_STATES = frozenset({ServiceState.ACTIVE, ServiceState.WAKING})
#: States in which a service keeps its route and cluster in Envoy.
ROUTED_STATES = frozenset(set(ServiceState) - {ServiceState.EVICTED})


@dataclasses.dataclass(frozen=True)
class BoundPorts:
    """Where the control plane listens (config ports may be 0 in tests)."""

    xds: int
    admin_api: int
    metrics: int


class ControlPlane:
    """One control-plane process. Also implements torpor.admin.ServiceAdmin."""

    def __init__(self, config: Config, store: Store, workloads: Workloads,
                 clock: Clock | None = None, serve_metrics: bool = True,
                 locks: ServiceLocks | None = None, run_policy: bool = True,
                 catalog: ServiceCatalog | None = None,
                 election: LeaderElection | None = None,
                 registry: ActivatorRegistry | None = None) -> None:
        """`election`: in a fleet, only its leader runs the reconciler (None: this process
        always does). `registry`: in a fleet, the activator replicas Envoy's activator
        cluster lists (None: the one `activator` of the config)."""
        self.config = config
        # The config's services, plus discovered ones when discovery feeds this catalog.
        self.catalog = catalog if catalog is not None else ServiceCatalog(config.services)
        self.store = store
        self.workloads = workloads
        self.clock = clock or SystemClock()
        self.records: dict[str, ServiceRecord] = {}
        activator = config.activator
        reach = advertised_activator_host(activator)
        # Until a registry says otherwise: the activator of the config.
        self._configured_activator = (Endpoint(reach, activator.listen.port),
                                      Endpoint(reach, activator.listen_h2.port))
        self.builder = ResourceBuilder(
            GatewaySettings(
                listen=Endpoint(config.gateway.listen.host, config.gateway.listen.port),
                activators=(self._configured_activator[0],),
                activators_h2=(self._configured_activator[1],),
                route_timeout=config.activator.wake_timeout + 30.0,
                max_requests=max(1024, 4 * config.activator.max_held_per_service),
                retry_buffer_bytes=config.gateway.retry_buffer_bytes,
            )
        )
        self.election = election
        self.registry = registry
        self.cache = SnapshotCache()
        self.ads = AdsServer(self.cache)
        self.collector = CallCollector(self.clock, self.catalog.hosts())
        self.publisher = Publisher(self.cache, self.ads, config.control_plane.ack_timeout)
        self.locks = locks or LocalLocks()
        self.waker = Waker(store, workloads, self.locks, wake_timeout=config.activator.wake_timeout,
                           flip_when=config.wake.flip_when, clock=self.clock)
        self.reconciler = Reconciler(config, store, workloads, self.locks, self.collector,
                                     self.clock, lambda: self.records, self._apply_record,
                                     self.sync, catalog=self.catalog)
        self._run_policy = run_policy
        self._tasks: list[asyncio.Task[None]] = []
        self.ports: BoundPorts | None = None
        self._serve_metrics = serve_metrics
        self._servers: list[grpc.aio.Server] = []
        self._metrics_server: WSGIServer | None = None
        self._dirty = asyncio.Event()
        self._sync_task: asyncio.Task[None] | None = None
        self._remove_listeners: list[Callable[[], None]] = []
        self.discovery: Discovery | None = None

    # --- life cycle ---------------------------------------------------------------------

    async def start(self) -> BoundPorts:
        """Load state, start replicas of active services, then serve."""
        await self.store.open()
        await self.workloads.start()
        # Discovered services join the catalog before the first snapshot is built.
        self.discovery = await self.workloads.discover(self.catalog)
        await self._load_records()
        await self.collector.load(self.store)
        for name, record in self.records.items():
            self.collector.ensure(name, record.created_at)
        if self.election is None:
            await self.reconciler.repair()  # a fleet's leader repairs in its policy passes
        self._remove_listeners = [self.workloads.add_listener(self._on_endpoints),
                                  self.store.add_listener(self._apply_record),
                                  self.store.add_call_listener(self.collector.note_peer_call),
                                  self.catalog.add_listener(self._on_catalog)]
        if self.registry is not None:
            await self.registry.follow(self._on_activators)
        for record in self.records.values():
            await self._ensure_running(record)
        self.cache.set_resources(self._desired())  # before the first stream can arrive
        self._sync_task = asyncio.create_task(self._sync_loop())
        self.ports = await self._serve()
        self._tasks.append(asyncio.create_task(
            self.collector.run_flusher(self.store, self.config.control_plane.stats_flush_every)))
        if self._run_policy:
            self._tasks.append(asyncio.create_task(self._policy_loop()))
            if self.election is not None:
                self.election.start()
        event(log, "control_plane.started", xds=self.ports.xds, admin_api=self.ports.admin_api,
              services=len(self.records))
        return self.ports

    async def stop(self, stop_workloads: bool = True) -> None:
        """Stop serving; stop the replicas too unless told to leave them running."""
        for remove in self._remove_listeners:
            remove()
        if self.election is not None:
            await self.election.stop()  # another control plane takes over at once
        if self.registry is not None:
            await self.registry.stop()
        if self.discovery is not None:
            await self.discovery.stop()
        for task in [*self._tasks, *filter(None, [self._sync_task])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for server in self._servers:
            await server.stop(1.0)
        self._servers.clear()
        # After the servers: access-log entries that arrived during their grace are saved.
        await self.collector.flush(self.store)
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.shutdown)
            self._metrics_server = None
        if stop_workloads:
            await self.workloads.close()
        await self.store.close()
        event(log, "control_plane.stopped")

    async def _serve(self) -> BoundPorts:
        cp = self.config.control_plane
        xds_server, xds_port = await start_xds_listener(str(cp.xds), self.ads, self.collector)
        self._servers.append(xds_server)
        admin_server, admin_port = await start_admin_server(str(cp.admin_api), self)
        self._servers.append(admin_server)
        metrics_port = 0
        if self._serve_metrics:
            self._metrics_server, metrics_port = metrics.serve_metrics(cp.metrics.host,
                                                                       cp.metrics.port)
        return BoundPorts(xds=xds_port, admin_api=admin_port, metrics=metrics_port)

    async def _load_records(self) -> None:
        """Join catalog services with stored records; a new service gets a record."""
        stored = {r.name: r for r in await self.store.list()}
        for service in self.catalog.services():
            await self._register(service, stored.get(service.name))

    async def _register(self, service: ServiceConfig, record: ServiceRecord | None) -> None:
        """Take a service into the table: its stored record, else a new one. A new record
        starts ACTIVE, or HIBERNATED when the workloads say the service was put to sleep
        by torpor before (the Deployment's recorded-replicas annotation outlives a lost
        store). In a fleet another control plane may create it first: then its record is
        the one."""
        if record is None:
            try:
                record = await self.store.put(self._new_record(service))
                event(log, "service.registered", service=service.name,
                      state=record.state.value, replicas=service.replicas)
            except ConflictError:
                record = await self.store.get(service.name)
                if record is None:
                    raise StoreError(f"service {service.name!r}: its record was created and "
                                     "deleted while registering; try again") from None
        self.records[service.name] = record
        self.collector.ensure(service.name, record.created_at)
        metrics.set_service_state(service.name, record.state, record.recorded_replicas)

    def _new_record(self, service: ServiceConfig) -> ServiceRecord:
        """ACTIVE with the replicas running now (a Deployment) or configured; HIBERNATED with
        the count found in the workload's own record of an earlier hibernation."""
        now = self.clock.now()
        running = self.workloads.desired_replicas(service.name)
        record = ServiceRecord.new(service.name, running or service.replicas, now)
        sleeping = self.workloads.recorded_replicas(service.name)
        if running or sleeping is None:
            return record
        found = Transition(at=now, from_state=None, to_state=ServiceState.HIBERNATED,
                           reason="found scaled to 0 by torpor (recorded-replicas annotation)")
        return dataclasses.replace(record, state=ServiceState.HIBERNATED, desired_replicas=0,
                                   recorded_replicas=sleeping, history=(found,))

    async def _ensure_running(self, record: ServiceRecord) -> None:
        """Replicas for a service that should run and has none asked for (a restarted
        local control plane); a Kubernetes Deployment already at its count is left alone,
        so torpor never fights a manual `kubectl scale` or an HPA."""
        if record.state in RUNNING_STATES and self.workloads.desired_replicas(record.name) == 0:
            await self.workloads.scale(record.name, record.desired_replicas)

    def _on_catalog(self, change: CatalogChange) -> None:
        """A discovered service came, changed or went: re-register, then push."""
        self.collector.set_hosts(self.catalog.hosts())
        task = asyncio.create_task(self._catalog_changed(change))
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _catalog_changed(self, change: CatalogChange) -> None:
        try:
            if change.after is not None and change.name not in self.records:
                await self._register(change.after, await self.store.get(change.name))
                await self._ensure_running(self.records[change.name])
            elif change.after is None:
                self.records.pop(change.name, None)
                metrics.forget_service(change.name)
            self._dirty.set()
        except TorporError as exc:
            event(log, "service.register_failed", service=change.name, error=str(exc),
                  level=logging.ERROR)

    # --- Envoy config -------------------------------------------------------------------

    def _desired(self) -> Resources:
        return self.builder.build(self._routed_services())

    def _routed_services(self) -> list[RoutedService]:
        routed = []
        for service in self.catalog.services():
            record = self.records.get(service.name)
            if record is not None and record.state in ROUTED_STATES:
                routed.append(RoutedService(service.name, service.host,
                                            self._traffic_target(service, record),
                                            http2=service.protocol == "http2"))
        return routed

    def _traffic_target(self, service: ServiceConfig,
                        record: ServiceRecord) -> tuple[Endpoint, ...]:
        """Ready replicas of an active service; otherwise the activator, which holds the
        request and wakes the service (Knative's rule: no ready endpoint → activator)."""
        if record.state is ServiceState.ACTIVE:
            ready = self.workloads.ready_endpoints(service.name)
            if ready:
                return ready
        return self.builder.activator_targets(service.protocol == "http2")

    def _on_activators(self, activators: dict[str, Activator]) -> None:
        """The registered activator replicas changed: they become the endpoints of the
        activator cluster and of every sleeping service. None registered (all restarting):
        the configured address, rather than no endpoint at all."""
        metrics.ACTIVATORS.set(len(activators))
        found = sorted(activators.values()) or [self._configured_activator]
        if self.builder.set_activators(tuple(a[0] for a in found), tuple(a[1] for a in found)):
            event(log, "activators.changed", members=sorted(activators),
                  http=[str(a[0]) for a in found])
            self._dirty.set()

    async def sync(self) -> bool:
        """Push the current table to every Envoy; True once every connected Envoy has
        applied it (also when a concurrent push already carried the change)."""
        ok = await self.publisher.publish(self._desired)
        snapshot = self.cache.snapshot()
        return ok and (snapshot is None or not self.ads.lagging(snapshot.version))

    async def wait_routed(self, name: str) -> None:
        """Return once every connected Envoy has applied the table as it is now, in which
        an ACTIVE `name` with ready replicas is routed to them (what the activator's HTTP/2
        holder waits for before asking Envoy to replay a held request)."""
        if not await self.sync():
            raise TorporError(f"service {name!r}: an Envoy did not apply the switch back to "
                              "its replicas in time")

    def is_leader(self) -> bool:
        """Whether this control plane runs the reconciler (in a fleet: the elected one)."""
        return self.election is None or self.election.is_leader

    async def _policy_loop(self) -> None:
        """Apply the idle policy every `policy.check_every`, when leading."""
        while True:
            await asyncio.sleep(self.config.policy.check_every)
            if not self.is_leader():
                continue
            try:
                await self.reconciler.check()
            except Exception:
                log.exception("policy.check_failed")

    def _apply_record(self, record: ServiceRecord) -> None:
        """A record changed (here, or by an activator through the store): newer revisions
        replace the table's copy and schedule a push."""
        current = self.records.get(record.name)
        if current is None or record.revision <= current.revision:
            return
        self.records[record.name] = record
        metrics.set_service_state(record.name, record.state, record.recorded_replicas)
        self._dirty.set()

    async def _sync_loop(self) -> None:
        """Coalesce endpoint changes: one push carries every change made meanwhile."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.sync()
            except Exception:
                log.exception("xds.sync_failed")

    def _on_endpoints(self, name: str, endpoints: tuple[Endpoint, ...]) -> None:
        metrics.SERVICE_READY_ENDPOINTS.labels(service=name).set(len(endpoints))
        with contextlib.suppress(UnknownServiceError):
            metrics.SERVICE_REPLICAS.labels(service=name).set(
                self.workloads.running_replicas(name))
        event(log, "service.endpoints", service=name, ready=[str(e) for e in endpoints])
        self._dirty.set()

    # --- admin (torpor.admin.ServiceAdmin) ----------------------------------------------

    async def statuses(self) -> list[ServiceStatus]:
        return [self._status(name) for name in sorted(self.records)]

    def problems(self) -> list[str]:
        return self.discovery.problems() if self.discovery is not None else []

    async def status(self, name: str) -> ServiceStatus:
        if name not in self.records:
            raise UnknownServiceError(f"unknown service {name!r}")
        return self._status(name)

    async def hibernate(self, name: str) -> ServiceStatus:
        """Raises WorkloadError when the hibernation was abandoned (the service is ACTIVE
        again, on its running replicas), so `torpor hibernate` does not report success."""
        await self.status(name)
        record = await self.reconciler.hibernate(name, "torpor hibernate")
        if record.state is ServiceState.ACTIVE:
            raise WorkloadError(f"service {name!r} stays ACTIVE: {record.history[-1].reason}")
        return self._status(name)

    async def wake(self, name: str) -> ServiceStatus:
        await self.status(name)
        await self.waker.wake(name, "torpor wake")
        await self.sync()  # the answer shows the service routed to its replicas again
        return self._status(name)

    def _status(self, name: str) -> ServiceStatus:
        record = self.records[name]
        service = self.catalog.get(name)
        seen = self.collector.last_call(name)
        last_call = max(filter(None, (record.last_call, seen)), default=None)
        return ServiceStatus(
            name=name,
            host=service.host if service else "",
            state=record.state,
            replicas=self.workloads.running_replicas(name),
            desired_replicas=record.desired_replicas,
            recorded_replicas=record.recorded_replicas,
            ready_endpoints=self.workloads.ready_endpoints(name),
            last_call=last_call,
            created_at=record.created_at,
            updated_at=record.updated_at,
            history=record.history,
        )
