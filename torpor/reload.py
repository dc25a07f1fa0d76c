"""Changing the services at run time: what a reloaded config changes, and carrying one
service's arrival, change or departure out.

Owns the decision (pure: `plan_reload(old, new)` → services added, removed and changed,
the changed ones whose replicas must be replaced, settings applied at run time and those
that keep their old value until a restart) and `ServiceChanges`, the thin effects on the
catalog and the workloads that a config reload and `torpor register` share. Must not read
files or parse (torpor.config does), nor know Envoy: the control plane reacts to the
catalog's changes; `routed()` only waits until Envoy applied one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from torpor import metrics
from torpor.catalog import CONFIG, REGISTERED, CatalogConflictError, ServiceCatalog
from torpor.config import Address, Config, ServiceConfig
from torpor.errors import TorporError
from torpor.logs import event
from torpor.workloads.base import Workloads

log = logging.getLogger("torpor.reload")

#: Sections applied at run time besides `services`: the policy loop reads them each pass.
LIVE_SECTIONS = ("policy",)
#: Never compared: where the config came from.
_NOT_SETTINGS = ("path", "services")


@dataclasses.dataclass(frozen=True)
class ReloadPlan:
    """What applying a new config changes; empty when nothing does."""

    added: tuple[ServiceConfig, ...] = ()
    removed: tuple[str, ...] = ()
    # The new entries of services whose entry changed.
    changed: tuple[ServiceConfig, ...] = ()
    # Changed services whose running replicas are replaced (command, cwd or env changed).
    replaced: tuple[str, ...] = ()
    # Dotted keys applied at run time (e.g. "policy.idle_after").
    live: tuple[str, ...] = ()
    # Dotted keys that keep their old value until torpor restarts (e.g. "gateway.listen").
    needs_restart: tuple[str, ...] = ()

    @property
    def applies_anything(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.live)

    def summary(self) -> str:
        """One line for a person, e.g. "added: b; removed: c; changed: a (replicas
        replaced); applied: policy.idle_after; needs a restart: gateway.listen"."""
        parts = []
        if self.added:
            parts.append("added: " + ", ".join(s.name for s in self.added))
        if self.removed:
            parts.append("removed: " + ", ".join(self.removed))
        if self.changed:
            parts.append("changed: " + ", ".join(
                f"{s.name} (replicas replaced)" if s.name in self.replaced else s.name
                for s in self.changed))
        if self.live:
            parts.append("applied: " + ", ".join(self.live))
        if self.needs_restart:
            parts.append(needs_restart_text(self.needs_restart))
        return "; ".join(parts) or "nothing changed"


def needs_restart_text(keys: tuple[str, ...]) -> str:
    return ("needs a restart: " + ", ".join(keys)
            + " (the running value stays until torpor restarts)")


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    """The difference between the running config and a newly loaded one. Services are
    matched by name (a renamed service is one removed and one added)."""
    live: list[str] = []
    fixed: list[str] = []
    for field in dataclasses.fields(old):
        if field.name in _NOT_SETTINGS:
            continue
        keys = changed_keys(field.name, getattr(old, field.name), getattr(new, field.name))
        (live if field.name in LIVE_SECTIONS else fixed).extend(keys)
    if old.workloads.kind != new.workloads.kind:
        # Each service's block is the other kind's: none of them can be applied.
        return ReloadPlan(live=tuple(live), needs_restart=(*fixed, "services"))
    before = {s.name: s for s in old.services}
    after = {s.name: s for s in new.services}
    changed = tuple(s for s in new.services if s.name in before and before[s.name] != s)
    return ReloadPlan(
        added=tuple(s for s in new.services if s.name not in before),
        removed=tuple(s.name for s in old.services if s.name not in after),
        changed=changed,
        replaced=tuple(s.name for s in changed if replaces_replicas(before[s.name], s)),
        live=tuple(live),
        needs_restart=tuple(fixed),
    )


def changed_keys(key: str, old: Any, new: Any) -> list[str]:
    """The dotted keys under `key` whose values differ (nested sections field by field; an
    address is one value: "gateway.listen", not its port)."""
    if old == new:
        return []
    if (dataclasses.is_dataclass(old) and dataclasses.is_dataclass(new)
            and type(old) is type(new) and not isinstance(old, Address)):
        return [k for f in dataclasses.fields(old)
                for k in changed_keys(f"{key}.{f.name}", getattr(old, f.name),
                                      getattr(new, f.name))]
    return [key]


def replaces_replicas(before: ServiceConfig, after: ServiceConfig) -> bool:
    """Whether running local replicas must be replaced: what starts the process changed.
    Other local keys (ready_path, stop_grace, liveness...) apply to replicas started later."""
    if before.local is None or after.local is None:
        return False
    old, new = before.local, after.local
    return (old.command, old.cwd, old.env) != (new.command, new.cwd, new.env)


def without_refused(before: Config, running: Config, refused: Iterable[str]) -> Config:
    """`running` with the services that could not be applied back as in `before` (an
    addition left out, a change undone), so that the next reload tries them again."""
    names = set(refused)
    if not names:
        return running
    old = {s.name: s for s in before.services}
    services = [old.get(s.name) if s.name in names else s for s in running.services]
    return dataclasses.replace(running, services=tuple(s for s in services if s is not None))


def applied(old: Config, new: Config, plan: ReloadPlan) -> Config:
    """The config a process runs after a reload: the new services (unless `plan` cannot
    apply them) and live sections; every other setting keeps its old value."""
    live = {name: getattr(new, name) for name in LIVE_SECTIONS}
    if "services" in plan.needs_restart:
        return dataclasses.replace(old, **live)
    return dataclasses.replace(old, services=new.services, **live)


# --------------------------------------------------------------------------------------
# Effects
# --------------------------------------------------------------------------------------


class ServiceChanges:
    """One service arriving, changing or leaving at run time, on the catalog and the
    workloads. The control plane follows the catalog (table, Envoy push)."""

    def __init__(self, catalog: ServiceCatalog, workloads: Workloads,
                 routed: Callable[[], Awaitable[object]]) -> None:
        """`routed()`: push the table now and wait until Envoy applied it (a removed
        service's route goes before its replicas stop)."""
        self._catalog = catalog
        self._workloads = workloads
        self._routed = routed

    async def put(self, service: ServiceConfig, source: str) -> None:
        """A new service, or a service's new entry: the workloads first (local replicas
        are replaced, make-before-break, when their command changed), then the catalog,
        which the table and Envoy follow. Raises CatalogConflictError, changing nothing,
        when the name or host is another's."""
        self._catalog.check(service, source)
        await self._workloads.put_service(service)
        self._catalog.put(service, source)

    async def remove(self, name: str, source: str) -> bool:
        """Route gone (applied by Envoy), then replicas stopped; False when `source` did
        not add `name`."""
        if not self._catalog.remove(name, source):
            return False
        await self._routed()
        await self._workloads.drop_service(name)
        metrics.forget_service(name)
        return True

    async def apply(self, plan: ReloadPlan,
                    displace: Callable[[str], Awaitable[None]]) -> dict[str, str]:
        """Carry a config reload's service changes out: removals first (their hosts may be
        reused), then changes, then additions. `displace(name)`: a name or host the config
        now has belongs to a registered service; the config wins. Returns the services
        that could not be applied, name → why (e.g. a host a discovered service answers)."""
        problems: dict[str, str] = {}
        for name in plan.removed:
            await self.remove(name, CONFIG)
        for service in (*plan.changed, *plan.added):
            for owner in self._owners(service):
                await displace(owner)
            try:
                await self.put(service, CONFIG)
            except (CatalogConflictError, TorporError) as exc:
                problems[service.name] = str(exc)
                event(log, "config.service_refused", level=logging.WARNING,
                      service=service.name, error=str(exc))
        return problems

    def _owners(self, service: ServiceConfig) -> list[str]:
        """Registered services whose name or host `service` takes."""
        found = []
        if self._catalog.source(service.name) == REGISTERED:
            found.append(service.name)
        for other in self._catalog.clashing(service):
            if self._catalog.source(other) == REGISTERED and other not in found:
                found.append(other)
        return found
