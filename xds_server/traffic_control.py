"""`torpor traffic`, `promote`, `rollback`: a new split, pushed to every Envoy at once.

Owns the effect around torpor/traffic.py's decisions: store the split, mark the service's
versions for the next build, push, and say how long until every Envoy applied it (one
RDS push: the versions' clusters are all in Envoy already, whatever their weight).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from torpor.catalog import ServiceCatalog
from torpor.model import TrafficChange
from torpor.traffic import Split, TrafficBook, describe, promoted
from xds_server.routing import EnvoyRouting


class TrafficControl:
    """Implements torpor.admin.TrafficAdmin."""

    def __init__(self, book: TrafficBook, catalog: ServiceCatalog,
                 routing: EnvoyRouting) -> None:
        self._book = book
        self._catalog = catalog
        self._routing = routing

    async def set_traffic(self, name: str, weights: dict[str, int]) -> TrafficChange:
        return await self._apply(name, await self._book.set(
            name, weights, f"traffic {describe(weights)}"))

    async def promote(self, name: str, version: str) -> TrafficChange:
        versions = [str(v.version) for v in self._catalog.versions(name)]
        return await self._apply(name, await self._book.set(
            name, promoted(versions, version) if versions else {version: 100},
            f"promote {version}"))

    async def rollback(self, name: str) -> TrafficChange:
        return await self._apply(name, await self._book.rollback(name))

    def changed(self, names: list[str]) -> None:
        """Splits another control plane set (the store's): route them here too."""
        for name in names:
            self._mark(name)

    async def _apply(self, name: str, split: Split) -> TrafficChange:
        self._mark(name)
        started = time.monotonic()
        applied = await self._routing.push()
        return TrafficChange(name, dict(split.weights), _plain(split.previous),
                             round(time.monotonic() - started, 4), applied)

    def _mark(self, name: str) -> None:
        for version in self._catalog.versions(name):
            self._routing.mark_dirty(version.name)


def _plain(weights: Mapping[str, int] | None) -> dict[str, int] | None:
    return None if weights is None else dict(weights)
