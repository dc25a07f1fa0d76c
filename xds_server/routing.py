"""The service table as Envoy sees it: build the resources, push, confirm.

Owns turning the table into Envoy's resources by each state's route (transitions.route:
an ACTIVE service's ready replicas, else the activator; an EVICTED one nowhere), the
activator endpoints (the registered replicas of a fleet, else the configured address),
coalescing changes into one push at a time, and answering "has every Envoy applied it?"
(the lifecycle's Routing and RouteConfirmation ports). Must not change records nor speak
the xDS protocol (server.py, publisher.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from torpor import metrics
from torpor.config import Config, ServiceConfig
from torpor.errors import TorporError, UnknownServiceError
from torpor.etcd.registry import Activator
from torpor.lifecycle.transitions import Route, route, routed
from torpor.lifecycle.wake import SingleFlight
from torpor.logs import event
from torpor.model import Endpoint, ServiceRecord, ServiceState
from torpor.service_table import ServiceTable
from torpor.workloads.base import Workloads
from xds_server.cache import Desired, SnapshotCache
from xds_server.certificates import listener_tls
from xds_server.publisher import Publisher
from xds_server.resources import GatewaySettings, ResourceBuilder, RouteAuth, RoutedService
from xds_server.server import AdsServer

log = logging.getLogger("torpor.control_plane")

#: How much longer than a wake Envoy's route waits: the activator answers a wake that ran
#: out of time itself (504 naming the service), before Envoy's own timeout would.
ROUTE_TIMEOUT_MARGIN = 30.0


def gateway_settings(config: Config, activator: tuple[Endpoint, Endpoint]) -> GatewaySettings:
    """Envoy settings from the config: route timeouts and circuit breakers that allow for
    a cold start and many held requests (measured): the longest wake_timeout and the largest
    max_held of the gateway and the config's services (their own settings)."""
    from torpor.wake_settings import largest_max_held, longest_wake_timeout

    return GatewaySettings(
        listen=Endpoint(config.gateway.listen.host, config.gateway.listen.port),
        activators=(activator[0],),
        activators_h2=(activator[1],),
        route_timeout=longest_wake_timeout(config.activator, config.services)
        + ROUTE_TIMEOUT_MARGIN,
        max_requests=max(1024, 4 * largest_max_held(config.activator, config.services)),
        retry_buffer_bytes=config.gateway.retry_buffer_bytes,
        edge=config.gateway.edge,
        tls=listener_tls(config.gateway.tls),
        async_calls=config.activator.async_calls,
        upstream_code_stats=config.gateway.upstream_code_stats,
        routing=config.gateway.routing,
    )


class EnvoyRouting:
    """Pushes the table to every connected Envoy. Implements the lifecycle's Routing
    (`push`) and RouteConfirmation (`wait_routed`)."""

    def __init__(self, table: ServiceTable, workloads: Workloads, builder: ResourceBuilder,
                 cache: SnapshotCache, ads: AdsServer, publisher: Publisher,
                 configured_activator: tuple[Endpoint, Endpoint],
                 confirm_timeout: float,
                 auth_of: Callable[[ServiceConfig], RouteAuth | None] = lambda s: None,
                 weight_of: Callable[[ServiceConfig], int] = lambda s: s.weight,
                 gateway_auth: Callable[[], RouteAuth | None] = lambda: None) -> None:
        """`auth_of(service)`: what Envoy asks of its callers (credentials.py), and
        `gateway_auth()` what gateway.auth asks (the by-Host virtual host's);
        `weight_of(version)`: its share of its service's traffic now (torpor/traffic.py)."""
        self._auth_of = auth_of
        self._gateway_auth = gateway_auth
        self._weight_of = weight_of
        self._table = table
        self._workloads = workloads
        self.builder = builder
        self._cache = cache
        self._ads = ads
        self._publisher = publisher
        self._configured_activator = configured_activator
        self._confirm_timeout = confirm_timeout
        self._dirty = asyncio.Event()
        # Services whose inputs changed since the last build (a flip: one), or every one.
        self._dirty_names: set[str] = set()
        self._all_dirty = True
        self._routed: dict[str, RoutedService] = {}  # what the builder was given last
        # Services (routed or not) whose wake outlasts the gateway's route timeout: the
        # catch-all, which reaches an evicted one, must wait as long as the longest.
        self._long_waits: dict[str, float] = {}
        # Every held HTTP/2 stream of a service waits for the same confirmation: one wait
        # and one push per service, not one build of the whole config per stream.
        self._confirming: SingleFlight[None] = SingleFlight()

    def desired(self) -> Desired:
        """The config for the table as it is now, rebuilt for the services marked dirty
        since the last call (all of them after `mark_dirty()` without a name)."""
        if self._all_dirty:
            names = {s.name for s in self._table.catalog.services()} | set(self._routed)
        else:
            names = self._dirty_names
        self._all_dirty, self._dirty_names = False, set()
        self.builder.set_gateway_auth(self._gateway_auth())
        changed: dict[str, RoutedService | None] = {}
        for name in names:
            self._note_long_wait(name)
            shape = self._routed_service(name)
            if shape != self._routed.get(name):
                changed[name] = shape
                if shape is None:
                    self._routed.pop(name, None)
                else:
                    self._routed[name] = shape
        self.builder.update(changed)
        self.builder.set_catch_all_timeout(max(self._long_waits.values(), default=None))
        return self.builder.desired()

    def _note_long_wait(self, name: str) -> None:
        service = self._table.catalog.get(name)
        timeout = self._route_timeout(service) if service is not None else None
        if timeout is None:
            self._long_waits.pop(name, None)
        else:
            self._long_waits[name] = timeout

    def load(self) -> None:
        """Put the table's config in the cache before any Envoy connects (a stream must
        never see an empty snapshot: Envoy would drop its routes)."""
        self._publisher.load(self.desired())

    def _routed_service(self, name: str) -> RoutedService | None:
        """How Envoy must see `name` now; None when it is not routed (evicted, gone).
        With `routing: host_header` an evicted service stays routed, to the activator: a
        Host no virtual host or cluster takes is answered 404 by Envoy there, and no
        catch-all reaches the activator (resources.py `_host_vhost`)."""
        service = self._table.catalog.get(name)
        record = self._table.records.get(name)
        if service is None or record is None:
            return None
        if not routed(record.state) and self.builder.settings.routing != "host_header":
            return None
        limit = service.rate_limit
        return RoutedService(service.name, service.host, self._target(service, record),
                             http2=service.protocol == "http2",
                             retry_non_idempotent=service.retry_non_idempotent,
                             rate_limit=(None if limit is None else
                                         (limit.requests_per_second, limit.bucket)),
                             max_concurrent=service.max_concurrent,
                             hosts=service.hosts, paths=service.paths,
                             rewrite=service.rewrite, auth=self._auth_of(service),
                             version_of=service.version_of, weight=self._weight_of(service),
                             route_timeout=self._route_timeout(service))

    def _route_timeout(self, service: ServiceConfig) -> float | None:
        """Its routes' own timeout when its wake_timeout outlasts the gateway's route
        timeout (a service discovered after the start, e.g. with a `torpor.io/wake-timeout`
        annotation, can wait longer than any service of the config); else None."""
        if service.wake_timeout is None:
            return None
        wanted = service.wake_timeout + ROUTE_TIMEOUT_MARGIN
        return wanted if wanted > self.builder.settings.route_timeout else None

    def _target(self, service: ServiceConfig, record: ServiceRecord) -> tuple[Endpoint, ...]:
        """Ready replicas of a service routed to them; otherwise the activator, which holds
        the request and wakes the service (Knative's rule: no ready endpoint → activator)."""
        if route(record.state) is Route.REPLICAS:
            ready = self._workloads.ready_endpoints(service.name)
            if ready:
                return ready
        return self.builder.activator_targets(service.protocol == "http2")

    # --- pushing ----------------------------------------------------------------------

    def mark_dirty(self, name: str | None = None) -> None:
        """Something the resources depend on changed: of service `name` only, or (None)
        of any service. The sync loop pushes soon."""
        if name is None:
            self._all_dirty = True
        else:
            self._dirty_names.add(name)
        self._dirty.set()

    async def push(self) -> bool:
        """Push the table as it is now; True once every connected Envoy has applied it
        (also when a concurrent push already carried the change)."""
        ok = await self._publisher.publish(self.desired)
        snapshot = self._cache.snapshot()
        if snapshot is None:
            return ok
        # A concurrent push may carry the change (the sync loop took it first): wait for
        # the newest snapshot to be applied, not only for this call's stages.
        behind = await self._ads.wait_synced(snapshot.version, self._confirm_timeout)
        return ok and not behind

    async def run(self) -> None:
        """Coalesce changes: one push carries every change made meanwhile."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.push()
            except Exception:
                log.exception("xds.sync_failed")

    async def wait_routed(self, name: str) -> None:
        """Return once every connected Envoy sends `name`'s traffic to its replicas: the
        table holds it ACTIVE with a ready replica (a wake written by another process
        arrives through the store's watch), and a push of that table was applied. What a
        held HTTP/2 request waits for before Envoy replays it. Raises TorporError."""
        if name not in self._table.records:
            raise UnknownServiceError(f"unknown service {name!r}")
        await self._confirming.join(name, lambda: self._confirm(name))

    async def _confirm(self, name: str) -> None:
        """One confirmation: the table shows `name` awake, then a push of it is applied."""

        def awake() -> bool:
            record = self._table.records.get(name)
            return (record is not None and record.state is ServiceState.ACTIVE
                    and bool(self._workloads.ready_endpoints(name)))

        if not await self._table.wait_for(awake, self._confirm_timeout):
            record = self._table.records.get(name)
            state = record.state.value if record is not None else "gone"
            raise TorporError(f"service {name!r} is {state} here after "
                              f"{self._confirm_timeout:g}s: its route was not switched back")
        if not await self.push():
            raise TorporError(f"service {name!r}: an Envoy did not apply the switch back to "
                              "its replicas in time")

    # --- what the resources depend on -----------------------------------------------

    def on_endpoints(self, name: str, endpoints: tuple[Endpoint, ...]) -> None:
        metrics.SERVICE_READY_ENDPOINTS.labels(service=name).set(len(endpoints))
        with contextlib.suppress(UnknownServiceError):
            metrics.SERVICE_REPLICAS.labels(service=name).set(
                self._workloads.running_replicas(name))
        event(log, "service.endpoints", service=name,
              ready=[str(e) for e in endpoints])
        self._table.endpoints_changed(name)

    def on_activators(self, activators: dict[str, Activator]) -> None:
        """The registered activator replicas changed: they become the endpoints of the
        activator cluster and of every sleeping service. None registered (all restarting):
        the configured address, rather than no endpoint at all."""
        metrics.ACTIVATORS.set(len(activators))
        found = sorted(activators.values()) or [self._configured_activator]
        if self.builder.set_activators(tuple(a[0] for a in found), tuple(a[1] for a in found)):
            event(log, "activators.changed",
                  members=sorted(activators), http=[str(a[0]) for a in found])
            self.mark_dirty()
