"""Services registered at run time (`torpor register`, admin RPC RegisterService).

Owns: checking a registration (the config's own checks; the config file wins every name
clash), keeping it in the store (documents of kind "registered", so sqlite and etcd alike
keep it across a restart), putting it in the catalog with source "registered", and
following registrations another control plane of a fleet wrote (`sync`). The arrival and
departure themselves are torpor.reload.ServiceChanges'. Must not know gRPC or Envoy.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from torpor.catalog import CONFIG, REGISTERED, CatalogConflictError, ServiceCatalog
from torpor.config import Config, ServiceConfig, load_service
from torpor.errors import (
    AlreadyExistsError,
    ConfigError,
    InvalidArgumentError,
    TorporError,
    UnknownServiceError,
)
from torpor.logs import event
from torpor.reload import ServiceChanges
from torpor.store.base import Store

log = logging.getLogger("torpor.registrations")

#: The store's document kind: service name → its spec, as a `services:` entry.
KIND = "registered"
#: How often a process that did not write a registration looks for new ones (seconds).
FOLLOW_EVERY = 2.0


class Registrations:
    """The registered services of one control plane, kept in its store."""

    def __init__(self, config: Config, store: Store, catalog: ServiceCatalog,
                 changes: ServiceChanges, writes: bool = True) -> None:
        """`writes`: False for a process that only follows the registrations (an activator
        that wakes services itself): it never deletes one, even one its config wins."""
        self._writes = writes
        self._config = config
        self._store = store
        self._catalog = catalog
        self._changes = changes
        self._specs: dict[str, dict[str, Any]] = {}  # what the catalog has, by name

    def set_config(self, config: Config) -> None:
        """A reloaded config: later registrations are checked against it."""
        self._config = config

    def parse(self, spec: dict[str, Any]) -> ServiceConfig:
        """Raises InvalidArgumentError with the config's words."""
        name = spec.get("name")
        try:
            return load_service(spec, f"registered service {name!r}", self._config)
        except ConfigError as exc:
            raise InvalidArgumentError(str(exc)) from None

    async def load(self) -> None:
        """At start, before the table loads: every stored registration joins the catalog
        (a restarted control plane routes them from its first snapshot)."""
        await self.sync()

    async def register(self, spec: dict[str, Any]) -> ServiceConfig:
        """Add (or replace) a registered service; raises InvalidArgumentError or
        AlreadyExistsError, leaving everything as it was."""
        service = self.parse(spec)
        owner = self._catalog.source(service.name)
        if owner == CONFIG:
            raise AlreadyExistsError(
                f"service {service.name!r} is in the config file {self._config.path}; the "
                "config wins: change it there (a reload applies it)")
        if owner is not None and owner != REGISTERED:
            raise AlreadyExistsError(f"service name {service.name!r} is already used by "
                                     f"{owner}")
        try:
            self._catalog.check(service, REGISTERED)
        except CatalogConflictError as exc:
            raise AlreadyExistsError(str(exc)) from None
        await self._store.save_documents(KIND, {service.name: spec})
        await self._put(service, spec)
        event(log, "service.registration_saved", service=service.name, host=service.host)
        return service

    async def unregister(self, name: str) -> None:
        """Remove a registered service (route first, then replicas) and its stored spec."""
        owner = self._catalog.source(name)
        if owner is None and name not in self._specs:
            raise UnknownServiceError(f"unknown service {name!r}")
        if owner is not None and owner != REGISTERED:
            where = f"the config file {self._config.path}" if owner == CONFIG else owner
            raise InvalidArgumentError(
                f"service {name!r} was not registered: it comes from {where}; remove it there")
        await self._store.delete_documents(KIND, [name])
        await self._drop(name)
        event(log, "service.registration_deleted", service=name)

    async def displace(self, name: str) -> None:
        """The config file now has this name (or its host): the config wins, and the
        registration is deleted."""
        await self._store.delete_documents(KIND, [name])
        await self._drop(name)
        event(log, "service.registration_displaced", level=logging.WARNING, service=name,
              why="the config file now has a service of this name or host; the config wins")

    async def follow(self, every: float = FOLLOW_EVERY) -> None:
        """Until cancelled: `sync` every `every` seconds (a fleet's other control planes
        and activators that wake services themselves see a registration within it)."""
        while True:
            await asyncio.sleep(every)
            try:
                await self.sync()
            except TorporError as exc:
                event(log, "registrations.sync_failed", level=logging.WARNING, error=str(exc))

    async def sync(self) -> list[str]:
        """Make the catalog hold exactly the stored registrations (another control plane
        of a fleet may have changed them). Returns why some could not join, one line each."""
        stored = await self._store.load_documents(KIND)
        problems = []
        for name in [n for n in self._specs if n not in stored]:
            await self._drop(name)
        for name, spec in sorted(stored.items()):
            if self._specs.get(name) == spec:
                continue
            problem = await self._join(name, spec)
            if problem:
                problems.append(problem)
        return problems

    async def _join(self, name: str, spec: dict[str, Any]) -> str | None:
        """A stored registration that the catalog lacks (or holds at another spec)."""
        try:
            service = self.parse(spec)
            owner = self._catalog.source(name)
            if owner == CONFIG and self._writes:
                await self.displace(name)
                return f"registered service {name!r}: the config file has it; the config wins"
            if owner is not None and owner != REGISTERED:
                raise AlreadyExistsError(f"the name is used by {owner}, which wins")
            self._catalog.check(service, REGISTERED)
        except (InvalidArgumentError, AlreadyExistsError, CatalogConflictError) as exc:
            if self._specs.get(name) is None:
                event(log, "service.registration_refused", level=logging.WARNING,
                      service=name, error=str(exc))
            self._specs[name] = spec  # said once; not retried until the spec changes
            return f"registered service {name!r}: {exc}"
        await self._put(service, spec)
        return None

    async def _put(self, service: ServiceConfig, spec: dict[str, Any]) -> None:
        await self._changes.put(service, REGISTERED)
        self._specs[service.name] = spec

    async def _drop(self, name: str) -> None:
        self._specs.pop(name, None)
        await self._changes.remove(name, REGISTERED)
