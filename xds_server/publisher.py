"""Staged pushes: a new desired config reaches Envoy in an order that drops no request.

Owns: splitting a change into stages and waiting, between stages, until every connected
Envoy applied the previous one (measured: CDS/EDS/LDS/RDS back to back gave up to
252 ms of 503s for a new host; waiting for the cluster ACK removed them).

- stage 1: clusters and endpoints of old + new (new definitions win); listeners and
  routes unchanged. Adds clusters, changes endpoints.
- stage 2: the new listeners and routes, still with old + new clusters. Routes move.
- stage 3: exactly the new config. Clusters no route uses any more go.

A stage equal to the current snapshot is skipped, so an endpoint flip is one EDS push.
A stage an Envoy rejects (NACK) ends the push: the later stages would build on what it
refused; the quarantine (quarantine.py) leaves the service behind it out and asks for a
new push.
Requests to publish coalesce: only the newest desired state is pushed after a running push.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from torpor import metrics
from torpor.logs import event
from xds_server import types
from xds_server.cache import ResourceMap, SnapshotCache, changes
from xds_server.server import AdsServer

log = logging.getLogger("torpor.xds")

Resources = Mapping[str, ResourceMap]


def stages(current: Resources | None, desired: Resources) -> list[Resources]:
    """The snapshots that lead from `current` to `desired`, in order (pure)."""
    if current is None:
        return [desired]
    merged = {
        t: {**current.get(t, {}), **desired.get(t, {})} for t in (types.CLUSTER, types.ENDPOINT)
    }
    first = {**current, **merged}
    second = {**desired, **merged}
    out: list[Resources] = []
    for stage in (first, second, desired):
        if not out or not _same(out[-1], stage):
            out.append(stage)
    return [s for s in out if not _same(current, s)]


def _same(a: Resources, b: Resources) -> bool:
    return not any(changes(a.get(k, {}), b.get(k, {})) for k in set(a) | set(b))


class Publisher:
    """Pushes desired configs through the cache in stages, one push at a time."""

    def __init__(self, cache: SnapshotCache, ads: AdsServer, ack_timeout: float) -> None:
        self._cache = cache
        self._ads = ads
        self._ack_timeout = ack_timeout
        self._lock = asyncio.Lock()
        self._applied: Resources | None = None  # the last stage every Envoy applied

    async def publish(self, build: Callable[[], Resources]) -> bool:
        """Bring every connected Envoy to the config `build()` returns.

        `build` runs once the previous push finished, so callers that queue up behind a
        push coalesce into the newest state. True if every Envoy applied every stage in
        time; False if one lagged or NACKed (logged; the push went on regardless, as one
        stuck Envoy must not freeze the fleet's config)."""
        async with self._lock:
            desired = build()
            current = self._cache.snapshot()
            base = current.resources if current else None
            if self._rejected():
                # Stage from what Envoy applied last, never from what it refused (else
                # stage 1 would carry the refused resource again, and be refused again).
                base = self._applied
            ok = True
            for stage in stages(base, desired):
                ok = await self._push(stage) and ok
                if self._rejected():
                    # An Envoy refused this stage: the later stages build on it, so stop.
                    # The quarantine's rejection listener has asked for a new push already.
                    return False
            return ok

    def _rejected(self) -> bool:
        """True when a connected Envoy NACKed the current snapshot."""
        snapshot = self._cache.snapshot()
        return snapshot is not None and any(
            r.version == snapshot.version for r in self._ads.rejections())

    async def _push(self, resources: Resources) -> bool:
        started = time.monotonic()
        snapshot = self._cache.set_resources(resources)
        metrics.XDS_SNAPSHOT_VERSION.set(snapshot.version)
        for type_url, rs in resources.items():
            metrics.XDS_RESOURCES.labels(type=types.short(type_url)).set(len(rs))
        behind = await self._ads.wait_synced(snapshot.version, self._ack_timeout)
        elapsed = time.monotonic() - started
        if behind:
            event(log, "xds.push_incomplete", level=logging.WARNING, version=snapshot.version,
                  seconds=round(elapsed, 4), behind=behind)
            return False
        self._applied = resources
        metrics.XDS_PUSH_DURATION.observe(elapsed)
        event(log, "xds.pushed", level=logging.DEBUG, version=snapshot.version,
              seconds=round(elapsed, 4))
        return True
