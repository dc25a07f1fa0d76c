"""Waking and confirming the flip through the control plane's admin API, for an activator in
its own process.

`torpor activator` next to a control plane that owns the replicas (local workloads can only
be scaled by the process that started them) asks that control plane to wake the service
and gets its ready endpoints back. Whichever way a standalone activator wakes, only a
control plane knows when its Envoys applied the switch back to the replicas: the HTTP/2
holder asks it (WaitRouted) before telling Envoy to replay a held request. Owns: single
flight per service in this process and mapping admin errors to the lifecycle's. With
Kubernetes workloads and the etcd lock, an activator wakes services itself
(torpor.lifecycle.wake) instead.
"""

from __future__ import annotations

import asyncio

from torpor import admin_client
from torpor.errors import TorporError, UnknownServiceError, WakeFailedError
from torpor.lifecycle.wake import SingleFlight
from torpor.model import Endpoint
from torpor.wake_settings import SettingsOf, WakeSettings


class AdminWaker:
    """Implements torpor.lifecycle.ports.Wakes over the admin API at `address`."""

    def __init__(self, address: admin_client.Target, wake_timeout: float,
                 settings: SettingsOf | None = None) -> None:
        """`settings(name)`: the service's own wake_timeout (default: `wake_timeout`)."""
        self._address = address
        self._settings: SettingsOf = settings or (lambda name: WakeSettings(wake_timeout, 1))
        self._flights: SingleFlight[tuple[Endpoint, ...]] = SingleFlight()

    async def wake(self, name: str, reason: str) -> tuple[Endpoint, ...]:
        return await self._flights.join(name, lambda: asyncio.to_thread(self._wake, name))

    def _wake(self, name: str) -> tuple[Endpoint, ...]:
        # The control plane's own wake gives up after the service's wake_timeout; allow
        # for the call.
        timeout = self._settings(name).wake_timeout + 10.0
        try:
            status = admin_client.wake(self._address, name, timeout=timeout)
        except admin_client.AdminError as exc:
            if exc.code == "NOT_FOUND":
                raise UnknownServiceError(str(exc)) from exc
            outcome = "timeout" if exc.code == "DEADLINE_EXCEEDED" else "failed"
            raise WakeFailedError(str(exc), outcome) from exc
        return tuple(admin_client.parse_endpoint(e) for e in status["ready_endpoints"])


class AdminRouteConfirmation:
    """Implements torpor.lifecycle.ports.RouteConfirmation over the admin API at
    `address`: the control plane answers once its Envoys route the service to its
    replicas. The holder's own deadline bounds the wait; `timeout` bounds one call.

    One call per service at a time, shared by all its held streams: a thousand held gRPC
    calls must not become a thousand blocking RPCs queued on the thread pool."""

    def __init__(self, address: admin_client.Target, timeout: float) -> None:
        self._address = address
        self._timeout = timeout
        self._flights: SingleFlight[None] = SingleFlight()

    async def wait_routed(self, name: str) -> None:
        await self._flights.join(name, lambda: self._wait_routed(name))

    async def _wait_routed(self, name: str) -> None:
        try:
            await asyncio.to_thread(admin_client.wait_routed, self._address, name,
                                    self._timeout)
        except admin_client.AdminError as exc:
            raise TorporError(f"the control plane at {self._address} did not confirm that "
                              f"Envoy routes {name!r} to its replicas: {exc}") from exc
