"""Waking through the control plane's admin API, for an activator in its own process.

`torpor activator` next to a control plane that owns the replicas (local workloads can only
be scaled by the process that started them) asks that control plane to wake the service
and gets its ready endpoints back. Owns: single flight per service in this process and
mapping admin errors to the waker's. With Kubernetes workloads and the etcd lock, an
activator can wake services directly with activator/waker.py instead.
"""

from __future__ import annotations

import asyncio

from activator.waker import SingleFlight
from torpor import admin_client
from torpor.errors import UnknownServiceError, WakeFailedError
from torpor.model import Endpoint


class AdminWaker:
    """Implements activator.waker.Wakes over the admin API at `address`."""

    def __init__(self, address: str, wake_timeout: float) -> None:
        self._address = address
        # The control plane's own wake gives up after wake_timeout; allow for the call.
        self._call_timeout = wake_timeout + 10.0
        self._flights = SingleFlight()

    async def wake(self, name: str, reason: str) -> tuple[Endpoint, ...]:
        return await self._flights.join(name, lambda: asyncio.to_thread(self._wake, name))

    def _wake(self, name: str) -> tuple[Endpoint, ...]:
        try:
            status = admin_client.wake(self._address, name, timeout=self._call_timeout)
        except admin_client.AdminError as exc:
            if exc.code == "NOT_FOUND":
                raise UnknownServiceError(str(exc)) from exc
            outcome = "timeout" if exc.code == "DEADLINE_EXCEEDED" else "failed"
            raise WakeFailedError(str(exc), outcome) from exc
        return tuple(admin_client.parse_endpoint(e) for e in status["ready_endpoints"])
