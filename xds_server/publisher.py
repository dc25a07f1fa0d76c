"""Staged pushes: a new desired config reaches Envoy in an order that drops no request.

Owns: splitting a change into stages and waiting, between stages, until every connected
Envoy applied the previous one (measured: CDS/EDS/LDS/RDS back to back gave up to
252 ms of 503s for a new host; waiting for the cluster ACK removed them).

- stage 1: clusters and endpoints of old + new (new definitions win); listeners and
  routes unchanged. Adds clusters, changes endpoints.
- stage 2: the new listeners and routes, still with old + new clusters. Routes move.
- stage 3: exactly the new config. Clusters no route uses any more go.

A stage equal to the current snapshot is skipped, so an endpoint flip is one EDS push.
A push costs what changed: the stages are deltas computed from the names the builder
touched (`Desired.touched`), applied to the cache's persistent maps (`SnapshotCache.apply`);
only a first push, or one after a push that did not finish, compares every resource.
A stage an Envoy rejects (NACK) ends the push: the later stages would build on what it
refused; the quarantine (quarantine.py) leaves the service behind it out and asks for a
new push.
Requests to publish coalesce: only the newest desired state is pushed after a running push.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping
from typing import cast

from torpor import metrics
from torpor.logs import event
from xds_server import types
from xds_server.cache import Delta, Desired, ResourceMap, Snapshot, SnapshotCache, changes
from xds_server.server import AdsServer

log = logging.getLogger("torpor.xds")

Resources = Mapping[str, ResourceMap]


def stages(current: Resources | None, desired: Resources) -> list[Resources]:
    """The snapshots that lead from `current` to `desired`, in order (pure)."""
    if current is None:
        return [desired]
    merged = {t: {**current.get(t, {}), **desired.get(t, {})} for t in _TARGETS}
    first = {**current, **merged}
    second = {**desired, **merged}
    out: list[Resources] = []
    for stage in (first, second, desired):
        if not out or not _same(out[-1], stage):
            out.append(stage)
    return [s for s in out if not _same(current, s)]


def _same(a: Resources, b: Resources) -> bool:
    return not any(changes(a.get(k, {}), b.get(k, {})) for k in set(a) | set(b))


#: Types whose additions go first and whose removals go last (what routes and listeners
#: point at).
_TARGETS = (types.CLUSTER, types.ENDPOINT, types.SECRET)
Stage = Mapping[str, Delta]


def deltas(base: Resources, desired: Resources,
           touched: Mapping[str, Collection[str]] | None) -> dict[str, Delta]:
    """What changes from `base` to `desired`, per type (pure): among `touched` names when
    given (in proportion to them), else among every name."""
    out = {}
    for type_url in set(base) | set(desired):
        old, new = base.get(type_url, {}), desired.get(type_url, {})
        names: Collection[str] = (touched.get(type_url, ()) if touched is not None
                                  else {*old, *new})
        put = {n: r for n in names if (r := new.get(n)) is not None
               and ((o := old.get(n)) is None or (o is not r and o.digest != r.digest))}
        drop = frozenset(n for n in names if n in old and n not in new)
        if put or drop:
            out[type_url] = Delta(put, drop)
    return out


def delta_stages(change: Mapping[str, Delta]) -> list[Stage]:
    """The stages of module docstring as deltas (pure): clusters and endpoints added or
    changed; then listeners and routes; then clusters and endpoints removed."""
    first = {t: Delta(put=change[t].put) for t in _TARGETS if t in change and change[t].put}
    second = {t: d for t, d in change.items() if t not in _TARGETS}
    third = {t: Delta(drop=change[t].drop) for t in _TARGETS if t in change and change[t].drop}
    return [s for s in (first, second, third) if s]


class Publisher:
    """Pushes desired configs through the cache in stages, one push at a time."""

    def __init__(self, cache: SnapshotCache, ads: AdsServer, ack_timeout: float) -> None:
        self._cache = cache
        self._ads = ads
        self._ack_timeout = ack_timeout
        self._lock = asyncio.Lock()
        self._applied: Resources | None = None  # the last stage every Envoy applied
        self._finished = False  # the last push went through every stage

    def load(self, desired: Desired) -> Snapshot:
        """The desired state before any Envoy connects (nothing to stage or wait for): the
        cache's content, from which later builds' touched names are the change."""
        snapshot = self._cache.set_resources(desired.resources)
        self._finished = True
        return snapshot

    async def publish(self, build: Callable[[], Desired | Resources]) -> bool:
        """Bring every connected Envoy to the config `build()` returns.

        `build` runs once the previous push finished, so callers that queue up behind a
        push coalesce into the newest state. True if every Envoy applied every stage in
        time; False if one lagged or NACKed (logged; the push went on regardless, as one
        stuck Envoy must not freeze the fleet's config)."""
        async with self._lock:
            built = build()
            desired = built if isinstance(built, Desired) else Desired(built)
            current = self._cache.snapshot()
            plan: list[Stage | Resources]
            full = True  # each stage a whole content, not a delta
            if (current is not None and desired.touched is not None and self._finished
                    and not self._rejected()):
                # The cache holds exactly the last build: the touched names are the change.
                plan = [*delta_stages(deltas(current.resources, desired.resources,
                                             desired.touched))]
                full = False
            else:
                base = current.resources if current else None
                if self._rejected():
                    # Stage from what Envoy applied last, never from what it refused (else
                    # stage 1 would carry the refused resource again, and be refused again).
                    base = self._applied
                plan = [*stages(base, desired.resources)]
            self._finished = False
            ok = True
            for i, stage in enumerate(plan):
                last = i == len(plan) - 1
                ok = await self._push(stage, full, desired.resources if last else None) and ok
                if self._rejected():
                    # An Envoy refused this stage: the later stages build on it, so stop.
                    # The quarantine's rejection listener has asked for a new push already.
                    return False
            self._finished = True
            return ok

    def _rejected(self) -> bool:
        """True when a connected Envoy NACKed the current snapshot."""
        snapshot = self._cache.snapshot()
        return snapshot is not None and any(
            r.version == snapshot.version for r in self._ads.rejections())

    async def _push(self, stage: Stage | Resources, full: bool,
                    whole: Resources | None) -> bool:
        """One stage: a whole content (type -> resources) when `full`, else a delta
        (type -> Delta) of the cache's content; waits until every connected Envoy applied
        it. `whole`: the build the last stage completes."""
        started = time.monotonic()
        if full:
            snapshot = self._cache.set_resources(cast(Resources, stage))
        else:
            snapshot = self._cache.apply(cast(Stage, stage), whole)
        resources = snapshot.resources
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
