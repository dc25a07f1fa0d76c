"""The control plane: the parts of one `torpor xds-server`, wired together, started and
stopped in order.

Owns: which part listens to which (store changes → table → routing; endpoint and catalog
changes → routing; access logs → collector), the start order, and its own listeners (ADS
with access logs, the admin API, metrics). Must not hold the table's logic
(torpor/service_table.py), choose or carry out state changes (torpor.lifecycle), build
Envoy config (routing.py, resources.py) nor open or close what the assembly owns (store,
locks, election, registry, workloads, discovery): it uses them.

Start-up order matters (measured): the desired state is loaded from the store and
put in the cache *before* the xDS port accepts a stream, so a restarted control plane never
wipes Envoy's routes with an empty snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

import grpc

from torpor import metrics
from torpor.advertise import advertised_activator_host
from torpor.catalog import CatalogChange, ServiceCatalog
from torpor.clock import Clock, SystemClock
from torpor.config import Config
from torpor.credentials import AdminTokens
from torpor.errors import TorporError, UnknownServiceError
from torpor.etcd.election import LeaderElection
from torpor.etcd.registry import ActivatorRegistry
from torpor.lifecycle.hibernation import Hibernation
from torpor.lifecycle.wake import Waker
from torpor.locks import LocalLocks, ServiceLocks
from torpor.logs import event
from torpor.model import Endpoint, ServiceStatus
from torpor.registrations import Registrations
from torpor.reload import ReloadPlan, ServiceChanges
from torpor.service_table import ServiceTable
from torpor.store.base import Store
from torpor.traffic import TrafficBook
from torpor.wake_settings import group_members, longest_wake_timeout, settings_lookup
from torpor.workloads.base import Workloads
from xds_server import types
from xds_server.admin_api import start_admin_server
from xds_server.admin_auth import AdminAuthInterceptor, server_tls
from xds_server.cache import Snapshot, SnapshotCache
from xds_server.certificates import CertificateWatcher
from xds_server.collector import CallCollector
from xds_server.credentials import Credentials
from xds_server.policy_loop import PolicyLoop
from xds_server.publisher import Publisher
from xds_server.quarantine import QuarantineBuilder, envoy_words
from xds_server.routing import EnvoyRouting, gateway_settings
from xds_server.savings import SavingsKeeper
from xds_server.server import AdsServer, Rejection
from xds_server.service_admin import ControlPlaneAdmin
from xds_server.serving import start_xds_listener
from xds_server.traffic_control import TrafficControl

log = logging.getLogger("torpor.control_plane")


@dataclasses.dataclass(frozen=True)
class BoundPorts:
    """Where the control plane listens (config ports may be 0 in tests)."""

    xds: int
    admin_api: int
    metrics: int


class ControlPlane:
    """One control-plane process's parts. `admin` is what the admin API serves."""

    def __init__(self, config: Config, store: Store, workloads: Workloads,
                 clock: Clock | None = None, serve_metrics: bool = True,
                 locks: ServiceLocks | None = None, run_policy: bool = True,
                 catalog: ServiceCatalog | None = None,
                 election: LeaderElection | None = None,
                 registry: ActivatorRegistry | None = None,
                 problems: Callable[[], list[str]] = list) -> None:
        """`store` must be open. `election`: in a fleet, only its leader runs the policy
        (None: this process always does). `registry`: in a fleet, the activator replicas
        Envoy's activator cluster lists (None: the one `activator` of the config).
        `problems()`: why some discovered Deployments are not services."""
        self.config = config
        self.catalog = catalog if catalog is not None else ServiceCatalog(config.services)
        self.store = store
        self.workloads = workloads
        self.clock = clock or SystemClock()
        self.election = election
        self.registry = registry
        self.locks = locks or LocalLocks()
        self.collector = CallCollector(self.clock, router=self.catalog.route_name)
        self.table = ServiceTable(self.catalog, store, workloads, self.clock,
                                  on_change=lambda name: self.routing.mark_dirty(name),
                                  on_registered=self.collector.ensure)
        reach = advertised_activator_host(config.activator)
        # Until a registry says otherwise: the activator of the config.
        configured = (Endpoint(reach, config.activator.listen.port),
                      Endpoint(reach, config.activator.listen_h2.port))
        self.cache = SnapshotCache()
        self.ads = AdsServer(self.cache)
        # Publishes only what Envoy accepts; a refused service is quarantined (status shows
        # why) and every other service keeps routing.
        self.quarantine = QuarantineBuilder(gateway_settings(config, configured))
        self.ads.add_listeners(self._on_rejected, self._on_applied)
        # The API keys and JWKS behind gateway.auth and services[].auth, kept current.
        self.credentials = Credentials(config.gateway)
        # The split between the versions of services with versions (store-kept).
        self.traffic = TrafficBook(self.catalog, store, self.clock)
        self.routing = EnvoyRouting(
            self.table, workloads, self.quarantine,
            self.cache, self.ads, Publisher(self.cache, self.ads, config.control_plane.ack_timeout),
            configured, confirm_timeout=config.control_plane.ack_timeout,
            auth_of=self.credentials.route_auth, weight_of=self.traffic.weight,
            gateway_auth=self.credentials.gateway_auth)
        self.traffic_control = TrafficControl(self.traffic, self.catalog, self.routing)
        self.waker = Waker(store, workloads, self.locks, wake_timeout=config.activator.wake_timeout,
                           flip_when=config.wake.flip_when, clock=self.clock,
                           settings=settings_lookup(config.activator, self.catalog.get),
                           members=lambda name: group_members(self.catalog.services(), name))
        self.hibernation = Hibernation(
            store, workloads, self.locks, self.routing, self.collector, self.clock,
            lock_wait=max(longest_wake_timeout(config.activator, config.services),
                          config.control_plane.ack_timeout),
            on_record=self.table.apply)
        self.policy = PolicyLoop(config, self.catalog, lambda: self.table.records,
                                 self.collector, self.hibernation, self.clock, self.is_leader,
                                 waker=self.waker, store=store)
        # Services arriving, changing, leaving at run time (config reload, torpor register).
        self.changes = ServiceChanges(self.catalog, workloads, self.routing.push)
        self.registrations = Registrations(config, store, self.catalog, self.changes)
        self.admin = ControlPlaneAdmin(self.table, self.collector, self.hibernation,
                                       self.waker, self.routing,
                                       lambda: [*problems(), *self.readiness()],
                                       outlook=self.policy.outlook,
                                       quarantine=self.quarantine.problem,
                                       left_out=self.quarantine.left_out,
                                       registrations=self.registrations,
                                       register_timeout=config.control_plane.ack_timeout,
                                       settings=settings_lookup(config.activator,
                                                                self.catalog.get),
                                       weights=lambda name: (self.traffic.split(name),
                                                             self.traffic.history(name)))
        self._run_policy = run_policy
        self.savings = SavingsKeeper(  # the leader's savings ledger (torpor report)
            store, lambda: self.table.records, self.collector.last_call, self.clock,
            lambda: self._run_policy and self.is_leader(), tick_every=config.policy.check_every,
            save_every=config.control_plane.stats_flush_every)
        self._serve_metrics = serve_metrics
        self._tasks: list[asyncio.Task[None]] = []
        self._servers: list[grpc.aio.Server] = []
        self._metrics_server: WSGIServer | None = None
        self._remove_listeners: list[Callable[[], None]] = []
        self.ports: BoundPorts | None = None

    # --- life cycle ---------------------------------------------------------------------

    async def start(self) -> BoundPorts:
        """Load the table, start replicas of services that should run, then serve."""
        gateway = self.config.gateway
        if gateway.routing == "host_header" and self.config.control_plane.xds_protocol == "sotw":
            # Works, but each flip resends every cluster (~150 ms at 10,000 services).
            event(log, "xds.routing_by_host_over_sotw", level=logging.WARNING,
                  advice="use control_plane.xds_protocol: delta with gateway.routing: "
                         "host_header")
        await self.registrations.load()  # registered services are routed from the start
        await self.table.load()  # registers each service's statistics with the collector
        await self.traffic.load()  # the splits set before a restart
        await self.collector.load(self.store)  # adds the stored counts to them
        if self.election is None:  # a fleet's leader repairs in its policy passes
            await self.hibernation.repair(self.table.records.values())
        self._remove_listeners = [self.workloads.add_listener(self.routing.on_endpoints),
                                  self.store.add_listener(self.table.apply),
                                  self.store.add_listener(self.savings.on_record),
                                  self.store.add_call_listener(self.collector.note_peer_call),
                                  self.catalog.add_listener(self._on_catalog)]
        if self.registry is not None:
            await self.registry.follow(self.routing.on_activators)
        await self.table.ensure_all_running()
        if self.config.gateway.tls is not None:
            # The listener's certificates, before the listener that names them.
            watcher = CertificateWatcher(self.config.gateway.tls, self._on_certificates,
                                         every=self.config.control_plane.reload_poll or 2.0)
            watcher.load()
            self._tasks.append(asyncio.create_task(watcher.run()))
        self.routing.load()  # the desired state, before the first stream arrives
        self._tasks.append(asyncio.create_task(self.credentials.run(
            self.config.control_plane.reload_poll or 2.0, self.routing.mark_dirty)))
        if self.election is not None:  # a fleet: another control plane may set a split
            self._tasks.append(asyncio.create_task(self.traffic.follow(
                2.0, self.traffic_control.changed)))
        # The table's resources live as long as the process: out of the collector's
        # generations, a full collection no longer walks them (measured at 50k services:
        # a 27 ms pause in one flip out of 50 without this).
        gc.freeze()
        self._tasks.append(asyncio.create_task(self.routing.run()))
        self.ports = await self._serve()
        # Read at each scrape, so it clears as soon as Envoy applies a newer config.
        metrics.XDS_CONFIG_REJECTED.set_function(lambda: float(bool(self.readiness())))
        # One process of a fleet exports service states and replicas: the leader.
        metrics.export_service_facts(self.is_leader, self._running_replicas)
        if self.election is None and self._run_policy:  # the only reconciler there is
            metrics.LEADER.labels(election="reconciler").set(1)
        self._tasks.append(asyncio.create_task(
            self.collector.run_flusher(self.store, self.config.control_plane.stats_flush_every)))
        self._tasks.append(asyncio.create_task(self.savings.run()))
        if self.config.store.kind == "etcd":  # another control plane may register
            self._tasks.append(asyncio.create_task(self.registrations.follow()))
        if self._run_policy:
            self._tasks.append(asyncio.create_task(self.policy.run()))
            if self.election is not None:
                self.election.start()
        event(log, "control_plane.started", xds=self.ports.xds, admin_api=self.ports.admin_api,
              services=len(self.table.records))
        return self.ports

    async def stop(self) -> None:
        """Stop listening and serving, and save the statistics; what the assembly opened
        (store, workloads, election, registry) it closes itself, after this."""
        for remove in self._remove_listeners:
            remove()
        self._remove_listeners.clear()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        metrics.XDS_CONFIG_REJECTED.set_function(lambda: 0.0)
        metrics.export_service_facts(None)
        if self.election is None and self._run_policy:
            metrics.LEADER.labels(election="reconciler").set(0)
        if self._run_policy:
            await self.policy.close()  # pre-wakes stopped, learned states saved
        await self.waker.close()  # group members' wakes under way stopped
        for server in self._servers:
            await server.stop(1.0)
        self._servers.clear()
        # After the servers: access-log entries that arrived during their grace are saved.
        await self.collector.flush(self.store)
        await self.savings.close()  # counted up to now and saved (the leader)
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.shutdown)
            self._metrics_server = None
        event(log, "control_plane.stopped")

    async def _serve(self) -> BoundPorts:
        cp = self.config.control_plane
        xds_server, xds_port = await start_xds_listener(str(cp.xds), self.ads, self.collector,
                                                        tls=cp.tls)
        self._servers.append(xds_server)
        tokens = AdminTokens.from_config(self.config)  # creates admin-token if none is set
        admin_server, admin_port = await start_admin_server(
            str(cp.admin_api), self.admin, report=self.savings.report, registry=self.admin,
            traffic=self.traffic_control,
            interceptors=[AdminAuthInterceptor(tokens)],
            credentials=server_tls(cp.admin_tls) if cp.admin_tls is not None else None)
        self._servers.append(admin_server)
        metrics_port = 0
        if self._serve_metrics:
            self._metrics_server, metrics_port = metrics.serve_metrics(
                cp.metrics.host, cp.metrics.port,
                ready=lambda: (self.readiness(), self.quarantine_notes()))
        return BoundPorts(xds=xds_port, admin_api=admin_port, metrics=metrics_port)

    def readiness(self) -> list[str]:
        """Why this control plane is not ready ([] when it is): a connected Envoy rejects
        the current config and no quarantine resolved it. Quarantined services do not
        count (the rest of the config applies); status shows them. Read by /ready on the
        metrics server's thread: it only reads."""
        reasons = [f"Envoy {r.node} rejected {types.short(r.type_url)} v{r.version}: "
                   f"{envoy_words(r.error)}" for r in self.ads.rejections()]
        if self.quarantine.unresolved and not reasons:
            reasons.append(self.quarantine.unresolved)
        return reasons

    async def wait_settled(self, timeout: float) -> list[str]:
        """Wait, at most `timeout`, until every connected Envoy applied the current config
        (after any quarantine's new push), or one keeps rejecting it; returns readiness()
        (`torpor up` prints it instead of a silent "ready")."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (remaining := deadline - loop.time()) > 0:
            snapshot = self.cache.snapshot()
            if snapshot is None:
                break
            behind = await self.ads.wait_synced(snapshot.version, remaining)
            current = self.cache.snapshot()
            if not behind and current is not None and current.version == snapshot.version:
                break
            if current is not None and current.version == snapshot.version and \
                    self.quarantine.unresolved:
                break  # rejected, and nobody to quarantine for it: it stays so
            await asyncio.sleep(0.05)  # a quarantine's new push is on its way
        return self.readiness()

    def quarantine_notes(self) -> list[str]:
        """One line per quarantined service: "quarantined: NAME: problem"."""
        return [f"quarantined: {name}: {problem}"
                for name, problem in sorted(self.quarantine.quarantined().items())]

    def _on_certificates(self, certificates: dict[str, tuple[bytes, bytes]]) -> None:
        """The gateway's certificates (read, or changed on disk): sent to Envoy (SDS)."""
        self.quarantine.set_certificates(certificates)
        self.routing.mark_dirty()

    def _on_applied(self, snapshot: Snapshot) -> None:
        """Every Envoy applied `snapshot`: suspects of a NACK may be let back in."""
        if self.quarantine.applied(snapshot):
            self.routing.mark_dirty()

    def _on_rejected(self, rejection: Rejection) -> None:
        """An Envoy NACKed a config: quarantine the services behind it, push without them."""
        if self.quarantine.rejected(rejection, self.cache.snapshot()):
            self.routing.mark_dirty()

    def _running_replicas(self) -> dict[str, int]:
        """Replicas running now per service, for torpor_service_replicas at each scrape (on
        the metrics server's thread: it only reads)."""
        found = {}
        for name in list(self.table.records):
            with contextlib.suppress(UnknownServiceError):
                found[name] = self.workloads.running_replicas(name)
        return found

    def is_leader(self) -> bool:
        """Whether this control plane runs the policy (in a fleet: the elected one)."""
        return self.election is None or self.election.is_leader

    def _on_catalog(self, change: CatalogChange) -> None:
        """A discovered service came, changed or went: the table takes it in, then push."""
        task = asyncio.create_task(self._catalog_changed(change))
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _catalog_changed(self, change: CatalogChange) -> None:
        try:
            await self.table.catalog_changed(change)
        except TorporError as exc:
            event(log, "service.register_failed", service=change.name, error=str(exc),
                  level=logging.ERROR)

    async def apply_reload(self, plan: ReloadPlan, config: Config) -> dict[str, str]:
        """A reloaded config: `plan` (torpor.reload.plan_reload) carried out, `config`
        (torpor.reload.applied: new services and policy, every other setting as it was)
        what runs from now on. Returns the services it could not apply, name → why."""
        self.config = config
        self.policy.set_config(config)
        self.registrations.set_config(config)
        return await self.changes.apply(plan, self.registrations.displace)

    # --- what `torpor up` asks of its control plane -------------------------------------

    async def statuses(self) -> list[ServiceStatus]:
        return await self.admin.statuses()

    async def wait_routed(self, name: str) -> None:
        """Every Envoy routes `name` to its replicas (the in-process HTTP/2 holder's
        confirmation before Envoy replays a held request). Raises TorporError for a
        quarantined service Envoy does not route at all (a replay would not reach it)."""
        await self.routing.wait_routed(name)
        _raise_if_left_out(self.quarantine, name)


def _raise_if_left_out(quarantine: QuarantineBuilder, name: str) -> None:
    problem = quarantine.left_out(name)
    if problem is not None:
        raise TorporError(f"service {name!r} is quarantined, Envoy does not route it: "
                          f"{problem}")
