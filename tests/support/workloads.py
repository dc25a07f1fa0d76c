"""A Workloads backend over endpoints a test already runs (no process management).

Used where a test must restart the control plane while replicas keep serving, which is
what happens in Kubernetes: the replicas are not the control plane's children.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torpor.model import Endpoint
from torpor.workloads.base import EndpointListener, Workloads


class FixedWorkloads(Workloads):
    def __init__(self, endpoints: Mapping[str, tuple[Endpoint, ...]]) -> None:
        self.endpoints = dict(endpoints)
        self.scaled: dict[str, int] = {}
        self._listeners: list[EndpointListener] = []

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def running_replicas(self, name: str) -> int:
        return len(self.endpoints.get(name, ()))

    def desired_replicas(self, name: str) -> int:
        return self.scaled.get(name, 0)

    async def scale(self, name: str, replicas: int) -> None:
        self.scaled[name] = replicas

    def ready_endpoints(self, name: str) -> tuple[Endpoint, ...]:
        return self.endpoints.get(name, ())

    async def wait_ready(self, name: str, min_ready: int, timeout: float) -> tuple[Endpoint, ...]:
        return self.ready_endpoints(name)

    def set_endpoints(self, name: str, endpoints: tuple[Endpoint, ...]) -> None:
        self.endpoints[name] = endpoints
        for listener in list(self._listeners):
            listener(name, endpoints)

    def add_listener(self, listener: EndpointListener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)
