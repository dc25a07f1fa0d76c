"""One assembly of torpor's components for every process: `torpor up`, `torpor xds-server`
and `torpor activator`.

Owns which components a role runs, opening each resource once and closing it once, in one
order: workloads (and discovery), then the store with its locks, election and registry,
then the control plane, the activator (registered in the fleet once it listens), and last
Envoy. Closing runs the same list backwards, also after a start that failed half-way: each
resource is pushed on one exit stack the moment it is open. This is the only code that
imports both xds_server and activator; the components below never import each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from activator.admin_waker import AdminRouteConfirmation, AdminWaker
from activator.async_owners import Replicas
from activator.catalog_mirror import CatalogMirror, MissRefresh
from activator.server import ActivatorServer
from assembly.envoy_process import SupervisedEnvoy
from torpor import metrics
from torpor.advertise import advertised_activator_host
from torpor.catalog import ServiceCatalog
from torpor.config import Address, Config
from torpor.coordination import Coordination, open_coordination
from torpor.credentials import admin_target
from torpor.errors import TorporError
from torpor.lifecycle.ports import Wakes
from torpor.lifecycle.wake import Waker
from torpor.logs import event
from torpor.model import Endpoint
from torpor.registrations import Registrations
from torpor.reload import ReloadPlan, ServiceChanges
from torpor.wake_settings import group_members, settings_lookup
from torpor.workloads import make_workloads
from torpor.workloads.base import Discovery, Workloads
from xds_server.bootstrap import config_bootstrap
from xds_server.control_plane import BoundPorts, ControlPlane

log = logging.getLogger("torpor.assembly")

#: After the drain grace: how long Envoy may still take to pass on the answers the
#: activator gave at the grace's end, before it is stopped (and what it still answers cut).
RELAY_SECONDS = 1.0


class Role(enum.StrEnum):
    """What one torpor process runs."""

    UP = "up"  # everything on one machine, Envoy included
    XDS_SERVER = "xds-server"  # the control plane alone
    ACTIVATOR = "activator"  # the activator alone


def wakes_itself(config: Config) -> bool:
    """Whether a standalone activator wakes services itself (etcd lock + Kubernetes: fleet
    mode) or asks the control plane (local processes can only be scaled by the control
    plane that started them)."""
    return config.store.kind == "etcd" and config.workloads.kind == "kubernetes"


class Assembly:
    """The components of one process, started in order and closed in reverse order."""

    def __init__(self, config: Config, role: Role, member: str | None = None,
                 advertise: str | None = None, logs: Path | None = None) -> None:
        """`member`: this process's name in a fleet. `advertise`: where Envoy reaches this
        activator. `logs`: where `up` writes Envoy's bootstrap and log."""
        if advertise:
            config = dataclasses.replace(
                config, activator=dataclasses.replace(config.activator, advertise=advertise))
        self.config = config
        self.role = role
        self._member = member
        self._logs = logs or config.log_dir()
        self.catalog = ServiceCatalog(config.services)
        self.workloads: Workloads | None = None
        self.discovery: Discovery | None = None
        self.coordination: Coordination | None = None
        self.control_plane: ControlPlane | None = None
        self.activator: ActivatorServer | None = None
        self.envoy: SupervisedEnvoy | None = None
        self.ports: BoundPorts | None = None
        self._grace_over = asyncio.Event()  # a second signal: stop waiting in the drain
        self._stack = contextlib.AsyncExitStack()

    @property
    def runs_control_plane(self) -> bool:
        return self.role in (Role.UP, Role.XDS_SERVER)

    @property
    def runs_activator(self) -> bool:
        return self.role in (Role.UP, Role.ACTIVATOR)

    async def start(self, say: Callable[[str], None] = lambda text: None) -> None:
        """Open and start everything the role runs; on failure, close what was opened and
        raise. `say(text)`: progress for a person (`torpor up` prints it)."""
        try:
            await self._start(say)
        except BaseException:
            await self.close()
            raise

    async def drain(self, say: Callable[[str], None] = lambda text: None) -> None:
        """A graceful stop's first half, while everything still runs: the activator leaves
        the fleet's endpoints and `up`'s Envoy closes its listeners (nothing new comes in),
        then the activator lets its held requests finish (their wakes need the control
        plane, the replicas and Envoy, all still up) for up to `activator.drain_grace` and
        answers what is left 503 + Retry-After. Last, Envoy finishes what it is still
        answering: requests to active services on open connections, and the activator's
        answers on their way to the client (stopping Envoy the moment the activator is idle
        would cut those), within what is left of the grace. `close` follows."""
        if self.activator is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.activator.drain_grace
        fleet = self.coordination
        if fleet is not None and fleet.registry is not None:
            await fleet.registry.deregister()  # idempotent: close does it again
        self.activator.refuse_new()
        if self.envoy is not None:
            await self.envoy.stop_listening()
        say(f"draining: new requests refused; {self.activator.held.total()} held may finish "
            f"within {self.config.activator.drain_grace:g}s (activator.drain_grace)")
        await self.activator.drain()
        if self.envoy is not None:
            await self._envoy_finishes(self.envoy, deadline - loop.time(), say)

    async def _envoy_finishes(self, envoy: SupervisedEnvoy, grace_left: float,
                              say: Callable[[str], None]) -> None:
        """Wait for Envoy's requests in flight until the grace ends (or a second signal),
        then RELAY_SECONDS more: the activator's last answers, given at the grace's end,
        still have to pass through Envoy."""
        in_flight = await envoy.requests_in_flight()
        if not in_flight:
            return
        say(f"draining: {in_flight} request(s) still in flight through Envoy")
        left = await envoy.wait_requests_done(grace_left, self._grace_over)
        if left:
            left = await envoy.wait_requests_done(RELAY_SECONDS, asyncio.Event())
        event(log, "gateway.drained", in_flight_cut=left)
        if left:
            say(f"drain grace over: {left} request(s) in flight through Envoy are cut")

    def end_grace(self) -> None:
        """Cut a running drain's grace short (a second signal): the activator answers what
        it holds 503 + Retry-After now, and Envoy is given only RELAY_SECONDS more to pass
        on what it is still answering."""
        self._grace_over.set()
        if self.activator is not None:
            self.activator.end_grace()

    async def apply_reload(self, plan: ReloadPlan, config: Config) -> dict[str, str]:
        """A reloaded config (assembly/reload.py): the control plane applies the services
        and the policy; every other setting keeps its start value in every component."""
        if self.control_plane is None:
            raise TorporError(f"{self.role.value} runs no control plane to reload")
        return await self.control_plane.apply_reload(plan, config)

    async def close(self) -> None:
        """Close everything opened, newest first. Idempotent."""
        await self._stack.aclose()

    async def _start(self, say: Callable[[str], None]) -> None:
        config = self.config
        if self.role is Role.ACTIVATOR:
            self._open_activator_metrics()
        if self.runs_control_plane or wakes_itself(config):
            # Before a lease is granted: listing every watched namespace can keep the loop
            # busy for longer than a short lease TTL.
            await self._open_workloads()
        if self.runs_control_plane or config.store.kind == "etcd":
            self.coordination = open_coordination(config, self._member)
            await self.coordination.open()
            self._stack.push_async_callback(self.coordination.close)
        if self.runs_control_plane:
            self.ports = await self._start_control_plane()
            cp = config.control_plane
            xds = cp.xds if cp.xds.is_unix else f"{cp.xds.host}:{self.ports.xds}"
            say(f"control plane: xDS on {xds}, admin API on "
                f"{cp.admin_api}, metrics on http://{cp.metrics}/metrics")
        if self.runs_activator:
            await self._start_activator()
            if self.role is Role.UP:
                act = config.activator
                say(f"activator: HTTP/1 on {act.listen}, HTTP/2 on {act.listen_h2}; its "
                    "metrics are on control_plane.metrics (activator.metrics "
                    f"{act.metrics} is used by a standalone `torpor activator` only)")
        if self.role is Role.UP:
            assert self.ports is not None
            self.envoy = await self._start_envoy(self.ports.xds, say)
            admin = config.gateway.admin
            say(f"envoy: listening on http://{config.gateway.listen}, admin on "
                f"{admin if admin.is_unix else f'http://{admin}'} "
                f"(log: {self._logs / 'envoy.log'})")

    def _open_activator_metrics(self) -> None:
        """A standalone activator serves its own metrics (under `up`, the control plane's
        endpoint serves the one registry of the process)."""
        listen = self.config.activator.metrics
        server, _ = metrics.serve_metrics(listen.host, listen.port)
        self._stack.push_async_callback(asyncio.to_thread, server.shutdown)

    async def _open_workloads(self) -> None:
        workloads = make_workloads(self.config)
        await workloads.start()
        self.workloads = workloads
        self._stack.push_async_callback(workloads.close)
        # Discovered services join the catalog before the first snapshot is built.
        self.discovery = await workloads.discover(self.catalog)
        if self.discovery is not None:
            self._stack.push_async_callback(self.discovery.stop)

    async def _start_control_plane(self) -> BoundPorts:
        assert self.coordination is not None and self.workloads is not None
        fleet = self.coordination
        discovery = self.discovery
        self.control_plane = ControlPlane(
            self.config, fleet.store, self.workloads, locks=fleet.locks,
            catalog=self.catalog, election=fleet.election, registry=fleet.registry,
            problems=discovery.problems if discovery is not None else list)
        self._stack.push_async_callback(self.control_plane.stop)
        return await self.control_plane.start()

    async def _start_activator(self) -> None:
        """The activator with the waker and flip confirmation the role calls for, then its
        registration (only a listening activator may be put in Envoy's endpoints)."""
        waker, confirm, on_miss = await self._activator_parts()
        cp = self.control_plane
        self.activator = ActivatorServer(
            self.config, waker, catalog=self.catalog, after_wake=confirm, on_miss=on_miss,
            on_held=cp.collector.note_held if cp is not None else None,
            replicas=self._replicas())
        self._stack.push_async_callback(self.activator.stop)
        await self.activator.start()
        await self._register()

    def _replicas(self) -> Replicas | None:
        """In a fleet: this activator's name and the registry's lookup of the others (a
        status request of an asynchronous call another replica took is fetched from it).
        Raises TorporError for a member name that cannot be part of a call's id."""
        fleet = self.coordination
        if fleet is None or fleet.registry is None or not self.config.activator.async_calls:
            return None
        try:
            return Replicas(fleet.member, fleet.registry.http_address)
        except ValueError as exc:
            raise TorporError(str(exc)) from exc

    async def _activator_parts(self) -> tuple[Wakes, Callable[[str], Awaitable[None]],
                                              Callable[[], Awaitable[None]] | None]:
        """(waker, flip confirmation, refresh on an unknown host) for this role."""
        config = self.config
        if self.control_plane is not None:
            # One process, one waker: the activator and `torpor wake` share it.
            return self.control_plane.waker, self.control_plane.wait_routed, None
        admin = admin_target(config)  # the token: config's file, or the one up created
        confirm = AdminRouteConfirmation(admin, config.activator.wake_timeout).wait_routed
        settings = settings_lookup(config.activator, self.catalog.get)
        if wakes_itself(config):
            assert self.coordination is not None and self.workloads is not None
            on_miss = await self._follow_registrations(self.coordination, self.workloads)
            catalog = self.catalog
            waker = Waker(self.coordination.store, self.workloads, self.coordination.locks,
                          wake_timeout=config.activator.wake_timeout,
                          flip_when=config.wake.flip_when, settings=settings,
                          members=lambda name: group_members(catalog.services(), name))
            self._stack.push_async_callback(waker.close)
            return waker, confirm, on_miss
        mirror = CatalogMirror(admin, self.catalog)
        await mirror.start()
        self._stack.push_async_callback(mirror.stop)
        return (AdminWaker(admin, config.activator.wake_timeout, settings), confirm,
                mirror.refresh_on_miss)

    async def _follow_registrations(self, fleet: Coordination, workloads: Workloads
                                    ) -> MissRefresh:
        """An activator that wakes services itself has its own catalog (config and
        discovery): services registered through the admin API join it from the store, at
        start, within 2 s of a registration, and at once when a request names a host it
        does not know (what this returns: a service registered and put to sleep within
        those 2 s is still found). It pushes nothing: no Envoy is its own."""

        async def no_push() -> None:
            return None

        registrations = Registrations(self.config, fleet.store, self.catalog,
                                      ServiceChanges(self.catalog, workloads, no_push),
                                      writes=False)
        await registrations.load()
        following = asyncio.create_task(registrations.follow())
        self._stack.push_async_callback(_cancelled, following)

        async def sync() -> None:
            try:
                await registrations.sync()
            except TorporError as exc:
                event(log, "registrations.sync_failed", level=logging.WARNING, error=str(exc))

        on_miss = MissRefresh(sync)
        self._stack.push_async_callback(on_miss.stop)
        return on_miss

    async def _register(self) -> None:
        """In a fleet, put this activator in every control plane's activator cluster; the
        registration goes first at close, so Envoy stops sending here before it stops."""
        fleet = self.coordination
        if fleet is None or fleet.registry is None or self.activator is None:
            return
        host = advertised_activator_host(self.config.activator)
        await fleet.registry.register(Endpoint(host, self.activator.port),
                                      Endpoint(host, self.activator.port_h2))
        self._stack.push_async_callback(fleet.registry.deregister)
        event(log, "activator.started", member=fleet.member, host=host,
              port=self.activator.port, role=self.role.value,
              wakes_itself=self.role is Role.UP or wakes_itself(self.config))

    async def _start_envoy(self, xds_port: int,
                           say: Callable[[str], None]) -> SupervisedEnvoy:
        config = self.config
        xds = config.control_plane.xds
        self._logs.mkdir(parents=True, exist_ok=True)
        if not config.gateway.admin.is_unix:
            event(log, "envoy.admin_on_tcp", level=logging.WARNING,
                  admin=str(config.gateway.admin),
                  why="anyone who can reach Envoy's admin port can stop the gateway (POST "
                      "/quitquitquit) or change its state; use gateway.admin: unix:PATH "
                      "(the default)")
        boot = config_bootstrap(config, xds=xds if xds.is_unix else Address(xds.host, xds_port))
        path = self._logs / "envoy-bootstrap.json"
        path.write_text(json.dumps(boot, indent=2))
        envoy = SupervisedEnvoy(path, self._logs / "envoy.log", config.gateway.admin, say=say)
        self._stack.push_async_callback(envoy.stop)
        await envoy.start()  # until LIVE; restarted from then on when it dies
        return envoy


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
