"""The service catalog: which services torpor manages right now, and how they are reached.

Owns the one current answer to "which service is this name / this Host header?" for every
component in a process. Services come from two sources: the config file (fixed for the
life of the process) and discovery (Kubernetes Deployments labelled torpor.io/enabled,
which come and go without a restart). Config services win every clash: a discovered
service whose name or host is already taken is refused with a clear reason and nothing
changes. Must not touch the store or the workloads: listeners (the control plane, the
collector, the workloads) react to changes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable

from torpor.config import ServiceConfig
from torpor.listeners import Listeners
from torpor.logs import event
from torpor.routes import ROOT, RouteTable, describe_clash

log = logging.getLogger("torpor.catalog")

CONFIG = "config"
#: The source of services added at run time through the admin API (`torpor register`).
REGISTERED = "registered"


@dataclasses.dataclass(frozen=True)
class CatalogChange:
    """A service added, changed (`before` set) or removed (`after` None)."""

    name: str
    before: ServiceConfig | None
    after: ServiceConfig | None


CatalogListener = Callable[[CatalogChange], None]


class CatalogConflictError(ValueError):
    """A discovered service's name or host is already taken by another service."""


class ServiceCatalog:
    """Services by name and by host, with the source each came from."""

    def __init__(self, services: Iterable[ServiceConfig] = ()) -> None:
        self._by_name: dict[str, ServiceConfig] = {}
        self._source: dict[str, str] = {}
        self._routes = RouteTable()
        self._versions: dict[str, set[str]] = {}  # a service with versions -> their names
        self._listeners: Listeners[[CatalogChange]] = Listeners("catalog.listener_failed")
        for service in services:
            self._insert(service, CONFIG)

    # --- reading --------------------------------------------------------------------

    def services(self) -> tuple[ServiceConfig, ...]:
        """Every service, sorted by name."""
        return tuple(self._by_name[name] for name in sorted(self._by_name))

    def get(self, name: str) -> ServiceConfig | None:
        return self._by_name.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._by_name)

    def source(self, name: str) -> str | None:
        """"config", or the discovery source's key (e.g. "deployment/models/echo")."""
        return self._source.get(name)

    def by_host(self, host_header: str, path: str = ROOT) -> ServiceConfig | None:
        """The service a request with this Host header and path reaches (port, case and a
        trailing dot of the host ignored; torpor/routes.py)."""
        name = self._routes.find(host_header, path)
        if name in self._versions:  # a service with versions: Envoy names the version
            name = min(self._versions[name])
        return None if name is None else self._by_name[name]

    def route_name(self, host_header: str, path: str = ROOT) -> str | None:
        """`by_host`, as the service's name (what the access-log collector counts by)."""
        return self._routes.find(host_header, path)

    def hosts(self) -> dict[str, str]:
        """Main host → service name."""
        return {s.host: name for name, s in self._by_name.items()}

    def clashing(self, service: ServiceConfig) -> list[str]:
        """Other services that hold one of `service`'s hosts and paths."""
        return sorted({other for _, _, other in self._routes.clashes(service.routes())})

    def versions(self, name: str) -> list[ServiceConfig]:
        """The versions of service `name` (sorted by version), [] for a plain service."""
        return sorted((self._by_name[n] for n in self._versions.get(name, ())),
                      key=lambda s: s.version or "")

    def parents(self) -> list[str]:
        """The services that have versions."""
        return sorted(self._versions)

    def shares_host(self, name: str) -> bool:
        """Whether another service is reached under one of `name`'s hosts."""
        return self._routes.shares_host(name)

    # --- changing (discovery) -------------------------------------------------------

    def put(self, service: ServiceConfig, source: str) -> bool:
        """Add or replace a service from `source`; True when something changed.

        Raises CatalogConflictError when the name belongs to another source or the host to
        another service: the catalog is left exactly as it was."""
        self.check(service, source)
        before = self._by_name.get(service.name)
        if before == service:
            return False
        self._insert(service, source)
        event(log, "catalog.service_updated" if before else "catalog.service_added",
              service=service.name, host=service.host, source=source)
        self._listeners.notify(CatalogChange(service.name, before, service))
        return True

    def check(self, service: ServiceConfig, source: str) -> None:
        """Raise CatalogConflictError if `put(service, source)` would clash."""
        owner = self._source.get(service.name)
        if owner is not None and owner != source:
            raise CatalogConflictError(
                f"service name {service.name!r} is already used by {owner}")
        for host, path, other in self._routes.clashes(service.routes())[:1]:
            raise CatalogConflictError(
                f"{describe_clash(host, path)} is already used by service {other!r} "
                f"({self._source[other]})")

    def remove(self, name: str, source: str) -> bool:
        """Remove a service that `source` added; config services are never removed."""
        if self._source.get(name) != source:
            return False
        before = self._by_name.pop(name)
        del self._source[name]
        self._unroute(before)
        event(log, "catalog.service_removed", service=name, source=source)
        self._listeners.notify(CatalogChange(name, before, None))
        return True

    def names_from(self, source_prefix: str) -> list[str]:
        """Names of the services whose source starts with `source_prefix`."""
        return [n for n, s in self._source.items() if s.startswith(source_prefix)]

    def add_listener(self, listener: CatalogListener) -> Callable[[], None]:
        """Call `listener(change)` after every change; returns a function that removes it."""
        return self._listeners.add(listener)

    # --- helpers ----------------------------------------------------------------------

    def _insert(self, service: ServiceConfig, source: str) -> None:
        self._by_name[service.name] = service
        self._source[service.name] = source
        if service.version_of is not None:
            self._versions.setdefault(service.version_of, set()).add(service.name)
        self._routes.put(service.routes())

    def _unroute(self, service: ServiceConfig) -> None:
        """Its routes go, unless other versions of its service remain."""
        parent = service.version_of
        if parent is None:
            self._routes.remove(service.name)
            return
        members = self._versions.get(parent, set())
        members.discard(service.name)
        if not members:
            self._versions.pop(parent, None)
            self._routes.remove(parent)
