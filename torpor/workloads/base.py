"""The workloads interface: how many replicas run, scaling, and ready endpoints.

Owns the contract that local processes (one machine) and Kubernetes Deployments (clusters)
implement alike, so that callers never branch on the backend. Ready endpoints are what EDS
serves; `wait_ready` is what a wake waits on.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from typing import Protocol

from torpor.catalog import ServiceCatalog
from torpor.config import ServiceConfig
from torpor.errors import NotSupportedError
from torpor.model import Endpoint

#: Called with (service name, its ready endpoints now) whenever the ready set changes.
EndpointListener = Callable[[str, tuple[Endpoint, ...]], None]


async def wait_for_ready(ready: Callable[[], tuple[Endpoint, ...]],
                         changed: Callable[[], asyncio.Event], check: Callable[[], None],
                         min_ready: int, timeout: float, what: str) -> tuple[Endpoint, ...]:
    """Wait until `ready()` holds `min_ready` endpoints, waking on each `changed()` event
    (backends replace the event after setting it, so every waiter sees every change);
    `check()` raises when the backend closed. TimeoutError says how far it got."""
    try:
        async with asyncio.timeout(timeout):
            while len(ready()) < min_ready:
                check()
                await changed().wait()
    except TimeoutError:
        raise TimeoutError(
            f"{what}: {len(ready())} of {min_ready} ready after {timeout}s") from None
    return ready()


class Discovery(Protocol):
    """A running discovery of services."""

    def problems(self) -> list[str]:
        """Why some found objects are not services (as they read now), one line each."""
        ...

    async def stop(self) -> None: ...


class Workloads(abc.ABC):
    """Replicas of the services named in the config."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin managing; no replica is started until `scale` asks for it."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop every process this object started (SIGTERM, then SIGKILL after the grace)."""

    @abc.abstractmethod
    def running_replicas(self, name: str) -> int:
        """Replicas whose process runs now (ready or not). Raises UnknownServiceError."""

    @abc.abstractmethod
    def desired_replicas(self, name: str) -> int:
        """The count last asked for by `scale` (0 before any). Raises UnknownServiceError."""

    @abc.abstractmethod
    async def scale(self, name: str, replicas: int) -> None:
        """Ask for `replicas` replicas. Returns once started/stopped, without waiting for
        readiness. Raises UnknownServiceError or WorkloadError."""

    @abc.abstractmethod
    def ready_endpoints(self, name: str) -> tuple[Endpoint, ...]:
        """Endpoints that answer their readiness probe now, sorted."""

    @abc.abstractmethod
    async def wait_ready(self, name: str, min_ready: int, timeout: float) -> tuple[Endpoint, ...]:
        """Wait until at least `min_ready` endpoints are ready; raises TimeoutError."""

    def problem(self, name: str) -> str | None:
        """Why `name`'s replicas do not run as they should (crash-looping, say), for
        `torpor status`; None when nothing is known to be wrong."""
        return None

    def recorded_replicas(self, name: str) -> int | None:
        """The replica count the workload itself recorded when torpor scaled it to zero
        (a Kubernetes Deployment's torpor.io/recorded-replicas annotation), if it is at zero
        now; None when it keeps no such record. Lets a lost store be rebuilt."""
        return None

    async def put_service(self, service: ServiceConfig) -> None:
        """Manage `service` from now on, or take its changed entry (a config reload,
        `torpor register`); replicas are started by `scale` as for any service. Local
        replicas running an old command are replaced (make-before-break)."""
        raise NotSupportedError(f"{type(self).__name__} cannot add services at run time")

    async def drop_service(self, name: str) -> None:
        """Stop managing `name` (a removed service): local replicas are stopped; a
        Kubernetes Deployment is left as it is. Unknown names are no error."""
        raise NotSupportedError(f"{type(self).__name__} cannot remove services at run time")

    async def discover(self, catalog: ServiceCatalog) -> Discovery | None:
        """Start adding services found in the platform (Kubernetes Deployments labelled
        torpor.io/enabled) to `catalog`, once the first look is done; None when this
        backend does not discover services."""
        return None

    @abc.abstractmethod
    def add_listener(self, listener: EndpointListener) -> Callable[[], None]:
        """Call `listener(name, endpoints)` on every change of a service's ready set;
        returns a function that removes it. Listeners run on the event loop, must not block."""
