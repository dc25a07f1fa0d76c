"""A Workloads backend over endpoints a test already runs (no process management).

Used where a test must restart the control plane while replicas keep serving, which is
what happens in Kubernetes: the replicas are not the control plane's children.
"""

from __future__ import annotations

import asyncio
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


class SimulatedWorkloads(Workloads):
    """Replicas that become ready `load_seconds` after a scale-up (or never, with None),
    recording every scale call: the waker and reconciler tests watch what they asked for."""

    def __init__(self, load_seconds: dict[str, float | None]) -> None:
        self.load_seconds = dict(load_seconds)
        self.calls: list[tuple[str, int]] = []
        self._desired: dict[str, int] = {}
        self._ready: dict[str, tuple[Endpoint, ...]] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._timers: list[asyncio.TimerHandle] = []
        self._listeners: list[EndpointListener] = []

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        for timer in self._timers:
            timer.cancel()

    def running_replicas(self, name: str) -> int:
        return self._desired.get(name, 0)

    def desired_replicas(self, name: str) -> int:
        return self._desired.get(name, 0)

    async def scale(self, name: str, replicas: int) -> None:
        self.calls.append((name, replicas))
        self._desired[name] = replicas
        if replicas == 0:
            self._set_ready(name, 0)
            return
        delay = self.load_seconds.get(name)
        if delay is not None:
            loop = asyncio.get_running_loop()
            self._timers.append(loop.call_later(delay, self._set_ready, name, replicas))

    def _set_ready(self, name: str, count: int) -> None:
        count = min(count, self._desired.get(name, 0))
        self._ready[name] = tuple(Endpoint("127.0.0.1", 40000 + i) for i in range(count))
        self._changed.setdefault(name, asyncio.Event()).set()
        self._changed[name] = asyncio.Event()
        for listener in list(self._listeners):
            listener(name, self._ready[name])

    def ready_endpoints(self, name: str) -> tuple[Endpoint, ...]:
        return self._ready.get(name, ())

    async def wait_ready(self, name: str, min_ready: int, timeout: float) -> tuple[Endpoint, ...]:
        async with asyncio.timeout(timeout):
            while len(self.ready_endpoints(name)) < min_ready:
                await self._changed.setdefault(name, asyncio.Event()).wait()
        return self.ready_endpoints(name)

    def add_listener(self, listener: EndpointListener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)
