"""The admin operations of a control plane (torpor.admin.ServiceAdmin and ServiceRegistry),
over its parts.

Owns what `torpor status`, `hibernate`, `wake`, `register`, `unregister` and a standalone
activator's "is the flip applied?" mean for this process: read the table, run the
lifecycle procedure or the registration, push, answer with the service's status. Must not
speak gRPC (admin_api.py) nor decide states (torpor.lifecycle).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from torpor.errors import NotSupportedError, TorporError, UnknownServiceError, WorkloadError
from torpor.lifecycle.hibernation import Hibernation
from torpor.lifecycle.wake import Waker
from torpor.model import ServiceState, ServiceStatus, Transition, VersionStatus
from torpor.registrations import Registrations
from torpor.service_table import ServiceTable
from torpor.wake_settings import SettingsOf
from xds_server.collector import CallCollector
from xds_server.routing import EnvoyRouting


class Outlook(Protocol):
    """What the policy expects of a service (xds_server.policy_loop.Outlook)."""

    @property
    def keep_alive(self) -> float | None: ...

    @property
    def next_call(self) -> float | None: ...


class ControlPlaneAdmin:
    """Implements torpor.admin.ServiceAdmin for one control plane."""

    def __init__(self, table: ServiceTable, collector: CallCollector, hibernation: Hibernation,
                 waker: Waker, routing: EnvoyRouting,
                 problems: Callable[[], list[str]] = list,
                 outlook: Callable[[str], Outlook] | None = None,
                 quarantine: Callable[[str], str | None] | None = None,
                 left_out: Callable[[str], str | None] | None = None,
                 registrations: Registrations | None = None,
                 register_timeout: float = 10.0,
                 settings: SettingsOf | None = None,
                 weights: Callable[[str], tuple[dict[str, int], Sequence[dict[str, Any]]]]
                 | None = None) -> None:
        """`outlook(name)`: the policy's keep-alive and next predicted call of a service
        (None: status shows neither). `quarantine(name)`: why Envoy's config leaves the
        service out (or at its last good config), None when it does not; `left_out(name)`:
        the same, only for a service Envoy does not route at all. `registrations`: what
        `torpor register` changes (None: this process registers nothing). `settings(name)`:
        its wake settings and group, shown as they apply."""
        self._registrations = registrations
        self._register_timeout = register_timeout
        self._settings = settings
        # A service with versions → (version → weight now, the traffic changes so far).
        self._weights = weights
        self._quarantine = quarantine
        self._left_out = left_out
        self._outlook = outlook
        self._table = table
        self._collector = collector
        self._hibernation = hibernation
        self._waker = waker
        self._routing = routing
        self._problems = problems

    async def statuses(self) -> list[ServiceStatus]:
        """Every service, and every service with versions (its versions are services of
        their own too), sorted by name."""
        out = [self._status(name) for name in self._table.records]
        if self._weights is not None:
            out += [self._versioned(parent) for parent in self._table.catalog.parents()]
        return sorted(out, key=lambda s: s.name)

    def problems(self) -> list[str]:
        return self._problems()

    async def status(self, name: str) -> ServiceStatus:
        if name not in self._table.records:
            if self._weights is not None and self._table.catalog.versions(name):
                return self._versioned(name)
            raise UnknownServiceError(f"unknown service {name!r}")
        return self._status(name)

    def _versioned(self, parent: str) -> ServiceStatus:
        """A service with versions, from its versions: the most awake state of any, the
        replicas of all, each version's weight now, and the traffic changes as history."""
        assert self._weights is not None
        weights, changes = self._weights(parent)
        members = [v for v in self._table.catalog.versions(parent)
                   if v.name in self._table.records]
        versions = [self._status(v.name) for v in members]
        if not versions:
            raise UnknownServiceError(f"service {parent!r} has no versions in the table")
        state = min((v.state for v in versions), key=_AWAKE_ORDER.index)
        history = tuple(Transition(float(c["at"]), state, state, str(c["reason"]))
                        for c in changes)
        first = versions[0]
        return dataclasses.replace(
            first, name=parent, state=state, replicas=sum(v.replicas for v in versions),
            desired_replicas=sum(v.desired_replicas for v in versions),
            recorded_replicas=sum(v.recorded_replicas for v in versions),
            ready_endpoints=tuple(e for v in versions for e in v.ready_endpoints),
            last_call=max((v.last_call for v in versions if v.last_call), default=None),
            created_at=min(v.created_at for v in versions),
            updated_at=max(v.updated_at for v in versions), history=history,
            problem=None, replica_problem=None, keep_alive=None, next_call=None,
            versions=tuple(VersionStatus(str(m.version), weights.get(str(m.version), 0),
                                         v.state, v.replicas, v.recorded_replicas)
                           for m, v in zip(members, versions, strict=True)))

    async def hibernate(self, name: str) -> ServiceStatus:
        """Raises WorkloadError when the hibernation was abandoned (the service is ACTIVE
        again, on its running replicas), so `torpor hibernate` does not report success."""
        await self.status(name)
        record = await self._hibernation.hibernate(name, "torpor hibernate")
        if record.state is ServiceState.ACTIVE:
            raise WorkloadError(f"service {name!r} stays ACTIVE: {record.history[-1].reason}")
        return self._status(name)

    async def wake(self, name: str) -> ServiceStatus:
        await self.status(name)
        await self._waker.wake(name, "torpor wake")
        await self._routing.push()  # the answer shows the service routed to its replicas
        return self._status(name)

    async def wait_routed(self, name: str) -> ServiceStatus:
        """Once every Envoy of this control plane routes `name` to its replicas (raises
        TorporError when that could not be confirmed in time)."""
        await self.status(name)
        await self._routing.wait_routed(name)
        problem = self._left_out(name) if self._left_out is not None else None
        if problem is not None:
            raise TorporError(f"service {name!r} is quarantined, Envoy does not route it: "
                              f"{problem}")
        return self._status(name)

    async def register(self, name: str, host: str, spec: dict[str, Any]) -> ServiceStatus:
        """torpor.admin.ServiceRegistry.register: stored, in the catalog, then answered
        once the table holds its record (the push follows as for any change)."""
        service = await self._registry().register({**spec, "name": name, "host": host})
        if not await self._table.wait_for(lambda: service.name in self._table.records,
                                          self._register_timeout):
            raise TorporError(f"service {name!r} is registered but not yet in the table "
                              f"after {self._register_timeout:g}s; torpor status shows it "
                              "when it is")
        return self._status(service.name)

    async def unregister(self, name: str) -> None:
        await self._registry().unregister(name)

    def _registry(self) -> Registrations:
        if self._registrations is None:
            raise NotSupportedError("this control plane registers no services")
        return self._registrations

    def _status(self, name: str) -> ServiceStatus:
        status = self._table.status(name, self._collector.last_call(name))
        if self._quarantine is not None:
            status = dataclasses.replace(status, problem=self._quarantine(name))
        if self._settings is not None:
            own = self._settings(name)
            status = dataclasses.replace(
                status, group=own.group, wake_timeout=own.wake_timeout, max_held=own.max_held,
                activation_replicas=own.activation_replicas, min_awake=own.min_awake)
        if self._outlook is None:
            return status
        outlook = self._outlook(name)
        return dataclasses.replace(status, keep_alive=outlook.keep_alive,
                                   next_call=outlook.next_call)


#: A service with versions shows the most awake state of its versions.
_AWAKE_ORDER = [ServiceState.ACTIVE, ServiceState.WAKING, ServiceState.HIBERNATING,
                ServiceState.HIBERNATED, ServiceState.EVICTED]
