"""The small interfaces the lifecycle procedures depend on, beside store, workloads and locks.

Why here: the hibernation and wake procedures must not know who pushes Envoy config or who
counts calls, so that the same code runs in `torpor up`, in a control plane of a fleet and
in a standalone activator. Each component implements the ports it can (xds_server: Routing
and CallTimes; the activator: nothing, it only uses Wakes and RouteConfirmation).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from torpor.model import Endpoint


class Routing(Protocol):
    """Envoy as the lifecycle sees it: push the table as it is now and wait until applied."""

    async def push(self) -> bool:
        """True once every connected Envoy applied the table as it is now (False on a NACK
        or when an Envoy did not answer in time)."""
        ...


class RouteConfirmation(Protocol):
    """"The flip back is applied everywhere": what a held HTTP/2 request waits for before
    Envoy is asked to replay it to the replicas."""

    async def wait_routed(self, name: str) -> None:
        """Return once every Envoy sends `name`'s traffic to its replicas; raises
        TorporError when that could not be confirmed."""
        ...


class CallTimes(Protocol):
    """When a service was last called (from Envoy's access logs)."""

    def last_call(self, name: str) -> float | None: ...


class Wakes(Protocol):
    """Ready endpoints of a service, waking it first if it sleeps."""

    async def wake(self, name: str, reason: str) -> tuple[Endpoint, ...]:
        """Raises UnknownServiceError, or WakeFailedError (outcome "failed" or "timeout")."""
        ...


@dataclasses.dataclass(frozen=True)
class WakeProgress:
    """How far a running wake is: replicas ready now, of those it starts."""

    ready: int
    replicas: int


class WakeProgressSource(Protocol):
    """Wakes whose progress can be read while they run (the waking page shows it)."""

    def progress(self, name: str) -> WakeProgress | None:
        """The running wake of `name` in this process, or None when there is none."""

