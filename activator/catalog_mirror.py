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
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from torpor import admin_client
from torpor.catalog import CONFIG, CatalogConflictError, ServiceCatalog
from torpor.config import ServiceConfig
from torpor.logs import event

log = logging.getLogger("torpor.activator.catalog")

SOURCE = "control-plane"
#: A burst of requests for unknown hosts asks the control plane at most this often.
MISS_REFRESH_MIN_INTERVAL = 0.5


class MissRefresh:
    """A catalog refresh run when a request names a host the catalog does not know, so
    that a service added a moment ago is found on its first request: at most once per
    MISS_REFRESH_MIN_INTERVAL (a burst of unknown hosts costs one), concurrent callers
    sharing the one in flight."""

    def __init__(self, refresh: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._refresh = refresh
        self._refreshing: asyncio.Task[None] | None = None
        self._last = 0.0

    def ran(self) -> None:
        """A refresh ran just now by other means (the periodic one)."""
        self._last = time.monotonic()

    async def __call__(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            if time.monotonic() - self._last < MISS_REFRESH_MIN_INTERVAL:
                return
            self._last = time.monotonic()
            self._refreshing = asyncio.create_task(self._refresh())
        await asyncio.shield(self._refreshing)

    async def stop(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refreshing


class CatalogMirror:
    """Keeps `catalog` equal to the control plane's service list (besides config ones)."""

    def __init__(self, address: admin_client.Target, catalog: ServiceCatalog,
                 every: float = 2.0) -> None:
        self._address = address
        self._catalog = catalog
        self._every = every
        self._task: asyncio.Task[None] | None = None
        self.refresh_on_miss = MissRefresh(self.refresh)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.refresh_on_miss.stop()
        self._task = None

    async def refresh(self) -> None:
        """Copy the control plane's list once; on failure keep the last copy (a host that
        was known stays served while the control plane restarts)."""
        self.refresh_on_miss.ran()
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
