"""`torpor activator`: the activator in its own process, alone or as one of a fleet.

Owns choosing how a standalone activator wakes services and learns the service table:
- `store: etcd` with `workloads: kubernetes` (fleet mode, deploy/'s base): it wakes
  services itself (activator/waker.py) with the etcd lease lock, so exactly one replica of
  the fleet wakes a service; it discovers labelled Deployments itself; and it registers
  its own address in etcd, so every control plane lists it in Envoy's activator cluster.
- otherwise: it asks the control plane's admin API to wake (local processes can only be
  scaled by the control plane that started them) and mirrors its catalog; with etcd it
  still registers itself.
Also serves `activator.metrics`. Must not hold, proxy or wake requests itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from wsgiref.simple_server import WSGIServer

from activator.admin_waker import AdminWaker
from activator.catalog_mirror import CatalogMirror
from activator.server import ActivatorServer
from activator.waker import Waker, Wakes
from torpor import metrics
from torpor.advertise import advertised_activator_host
from torpor.catalog import ServiceCatalog
from torpor.config import Config
from torpor.coordination import Coordination, open_coordination
from torpor.logs import event
from torpor.model import Endpoint
from torpor.workloads import make_workloads
from torpor.workloads.base import Discovery, Workloads

log = logging.getLogger("torpor.activator")


class StandaloneActivator:
    def __init__(self, config: Config, member: str | None = None,
                 advertise: str | None = None) -> None:
        if advertise:
            config = dataclasses.replace(
                config, activator=dataclasses.replace(config.activator, advertise=advertise))
        self.config = config
        self._member = member
        self.catalog = ServiceCatalog(config.services)
        self.coordination: Coordination | None = None
        self.workloads: Workloads | None = None
        self._discovery: Discovery | None = None
        self._mirror: CatalogMirror | None = None
        self.server: ActivatorServer | None = None
        self._metrics: WSGIServer | None = None

    @property
    def wakes_itself(self) -> bool:
        """Whether this process wakes services (fleet mode) or asks the control plane."""
        return self.config.store.kind == "etcd" and self.config.workloads.kind == "kubernetes"

    async def start(self) -> None:
        """Connect, learn the services, listen, then register (only a listening activator
        may be put in Envoy's endpoints)."""
        listen = self.config.activator.metrics
        self._metrics, _ = metrics.serve_metrics(listen.host, listen.port)
        waker: Wakes
        if self.wakes_itself:
            # Before the lease is granted: listing every watched namespace can keep the
            # loop busy for longer than a short lease TTL.
            self.workloads = make_workloads(self.config)
            await self.workloads.start()
            self._discovery = await self.workloads.discover(self.catalog)
        if self.config.store.kind == "etcd":
            self.coordination = open_coordination(self.config, self._member)
            await self.coordination.open()
        if self.workloads is not None:
            assert self.coordination is not None
            waker = Waker(self.coordination.store, self.workloads, self.coordination.locks,
                          wake_timeout=self.config.activator.wake_timeout,
                          flip_when=self.config.wake.flip_when)
            on_miss = None
        else:
            admin = str(self.config.control_plane.admin_api)
            waker = AdminWaker(admin, self.config.activator.wake_timeout)
            self._mirror = CatalogMirror(admin, self.catalog)
            await self._mirror.start()
            on_miss = self._mirror.refresh_on_miss
        self.server = ActivatorServer(self.config, waker, catalog=self.catalog, on_miss=on_miss)
        await self.server.start()
        await self._register()

    async def _register(self) -> None:
        if self.coordination is None or self.coordination.registry is None:
            return
        assert self.server is not None
        host = advertised_activator_host(self.config.activator)
        await self.coordination.registry.register(Endpoint(host, self.server.port),
                                                  Endpoint(host, self.server.port_h2))
        event(log, "activator.started", member=self.coordination.member, host=host,
              port=self.server.port, wakes_itself=self.wakes_itself)

    async def stop(self) -> None:
        """Deregister first (Envoy stops sending here), then stop listening, then leave
        the fleet (the lease is revoked: no lock of this process outlives it)."""
        if self.coordination is not None and self.coordination.registry is not None:
            await self.coordination.registry.deregister()
        if self.server is not None:
            await self.server.stop()
        if self._mirror is not None:
            await self._mirror.stop()
        if self._discovery is not None:
            await self._discovery.stop()
        if self.workloads is not None:
            await self.workloads.close()
        if self.coordination is not None:
            await self.coordination.close()
        if self._metrics is not None:
            await asyncio.to_thread(self._metrics.shutdown)
