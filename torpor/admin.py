"""The admin surface the control plane offers, independent of its transport.

`xds_server/admin_api.py` serves this over gRPC (protos/admin.proto); the CLI reaches it
through `torpor/admin_client.py`. Keeping the interface here lets the gRPC layer be tested
with a fake and lets the control plane implement it without knowing gRPC.
"""

from __future__ import annotations

from typing import Any, Protocol

from torpor.model import ServiceStatus, TrafficChange


class ServiceAdmin(Protocol):
    """Operations on the service table. Errors are torpor.errors exceptions:
    UnknownServiceError for an unknown name, NotSupportedError for what is not built yet,
    InvalidTransitionError when the service's state does not allow the operation."""

    async def statuses(self) -> list[ServiceStatus]:
        """Every service, sorted by name."""
        ...

    def problems(self) -> list[str]:
        """Why some discovered Deployments are not (or not updated as) services."""
        ...

    async def status(self, name: str) -> ServiceStatus:
        """One service."""
        ...

    async def hibernate(self, name: str) -> ServiceStatus:
        """Put a service to sleep now (make-before-break); returns its new status."""
        ...

    async def wake(self, name: str) -> ServiceStatus:
        """Wake a sleeping service now; returns its new status."""
        ...

    async def wait_routed(self, name: str) -> ServiceStatus:
        """Return once every Envoy of the control plane sends `name`'s traffic to its
        replicas (a standalone activator's HTTP/2 holder waits for this before Envoy
        replays a held request); raises TorporError when that cannot be confirmed."""
        ...


class TrafficAdmin(Protocol):
    """The split between a service's versions. Errors: UnknownServiceError (not a service
    with versions), InvalidArgumentError (an unknown version, every weight 0, nothing to
    roll back to)."""

    async def set_traffic(self, name: str, weights: dict[str, int]) -> TrafficChange:
        ...

    async def promote(self, name: str, version: str) -> TrafficChange:
        ...

    async def rollback(self, name: str) -> TrafficChange:
        ...


class ServiceRegistry(Protocol):
    """Services added and removed at run time (`torpor register` / `unregister`). Errors:
    InvalidArgumentError for a spec that fails the config's checks (or a service that was
    not registered), AlreadyExistsError for a name or host taken, UnknownServiceError."""

    async def register(self, name: str, host: str, spec: dict[str, Any]) -> ServiceStatus:
        """Add or replace a registered service (`spec`: the rest of a `services:` entry);
        returns its status once it is in the table."""
        ...

    async def unregister(self, name: str) -> None:
        """Remove a registered service: route first, then its replicas."""
        ...
