"""A standalone activator's copy of the control plane's service catalog.

`torpor activator` in its own process (a Kubernetes Deployment) does not discover services
itself: it needs no Kubernetes API access at all. It mirrors the control plane's table
(name, host and wake settings of every service, config and discovered) through the admin
API: every
`every` seconds, and at once when a request names a host it does not know, so a service
labelled a moment ago is found on its first request. Must not decide anything about the
services: it only copies names, hosts and the wake settings the holding applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

from torpor import admin_client
from torpor.catalog import CONFIG, CatalogConflictError, ServiceCatalog
from torpor.config import ServiceConfig
from torpor.logs import event

log = logging.getLogger("torpor.activator.catalog")

SOURCE = "control-plane"
#: A burst of requests for unknown hosts asks the control plane at most this often.
MISS_REFRESH_MIN_INTERVAL = 0.5


class CatalogMirror:
    """Keeps `catalog` equal to the control plane's service list (besides config ones)."""

    def __init__(self, address: admin_client.Target, catalog: ServiceCatalog,
                 every: float = 2.0) -> None:
        self._address = address
        self._catalog = catalog
        self._every = every
        self._task: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._last_refresh = 0.0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        for task in (self._task, self._refreshing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = None

    async def refresh_on_miss(self) -> None:
        """Refresh now unless one ran very recently; concurrent callers share one call."""
        if self._refreshing is None or self._refreshing.done():
            if time.monotonic() - self._last_refresh < MISS_REFRESH_MIN_INTERVAL:
                return
            self._refreshing = asyncio.create_task(self.refresh())
        await asyncio.shield(self._refreshing)

    async def refresh(self) -> None:
        """Copy the control plane's list once; on failure keep the last copy (a host that
        was known stays served while the control plane restarts)."""
        self._last_refresh = time.monotonic()
        try:
            statuses = await asyncio.to_thread(admin_client.list_statuses, self._address)
        except admin_client.AdminError as exc:
            event(log, "activator.catalog_refresh_failed", error=str(exc), level=logging.WARNING)
            return
        self._apply({s["name"]: mirrored(s) for s in statuses if s.get("host")})

    def _apply(self, services: dict[str, ServiceConfig]) -> None:
        for name in set(self._catalog.names_from(SOURCE)) - set(services):
            self._catalog.remove(name, SOURCE)
        for name, service in services.items():
            if self._catalog.source(name) == CONFIG:
                continue
            with contextlib.suppress(CatalogConflictError):
                self._catalog.put(service, SOURCE)

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._every)


def mirrored(status: Mapping[str, Any]) -> ServiceConfig:
    """A service as the activator needs it, from its status: name, hosts and paths, and the wake
    settings as the control plane applies them (a per-service wake_timeout and max_held
    bound its held requests here too)."""
    hosts = tuple(h for h in status.get("hosts") or () if h != status["host"])
    paths = tuple(status.get("paths") or ())
    return ServiceConfig(name=status["name"], host=status["host"], hosts=hosts,
                         paths=() if paths == ("/",) else paths,
                         rewrite=status.get("rewrite"),
                         wake_timeout=status.get("wake_timeout"),
                         max_held=status.get("max_held"),
                         activation_replicas=status.get("activation_replicas"),
                         min_awake=status.get("min_awake") or 0.0,
                         group=status.get("group"))
