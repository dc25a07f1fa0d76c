"""The activator's HTTP surface: what a request for a sleeping or unknown service gets.

Owns: finding the service by Host, and the life of one held request: admitted or refused
(queue full → 503 + Retry-After), waiting for the wake until its deadline (→ 504), leaving
when the client hangs up (counted, never proxied later), and then handed to the proxy with
its cold-start time. Must not wake (waker.py), bound queues (holding.py) or forward bytes
(proxy.py) itself, and never proxies to anything outside the service table.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from activator.holding import HeldRequests, QueueFullError, abandoned
from activator.proxy import Proxy, ProxyError
from activator.waker import Wakes
from torpor import metrics
from torpor.catalog import ServiceCatalog
from torpor.clock import Clock, SystemClock
from torpor.config import ServiceConfig
from torpor.errors import UnknownServiceError, WakeFailedError
from torpor.logs import event
from torpor.model import Endpoint

log = logging.getLogger("torpor.activator")

#: Response header with how long the request waited for its service to wake.
COLD_START_HEADER = "x-torpor-cold-start-ms"
#: Seconds a client is asked to wait before retrying a refused request.
RETRY_AFTER_SECONDS = 1


class ActivatorHandler:
    """Maps Host → service; holds, wakes and proxies what Envoy routed to the activator."""

    def __init__(self, catalog: ServiceCatalog, waker: Wakes, held: HeldRequests,
                 proxy: Proxy, wake_timeout: float, clock: Clock | None = None,
                 on_held: Callable[[str], None] | None = None,
                 on_miss: Callable[[], Awaitable[None]] | None = None) -> None:
        self._catalog = catalog
        # Refreshes the catalog when a host is not in it (a service discovered elsewhere).
        self._on_miss = on_miss
        self._waker = waker
        self._held = held
        self._proxy = proxy
        self._wake_timeout = wake_timeout
        self._clock = clock or SystemClock()
        self._on_held = on_held or (lambda name: None)
        self._turn = itertools.count()

    def lookup(self, host_header: str) -> ServiceConfig | None:
        """The service for a Host header (port and case ignored), or None."""
        return self._catalog.by_host(host_header)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        host = request.headers.get("Host", "")
        service = self.lookup(host)
        if service is None and self._on_miss is not None:
            await self._on_miss()
            service = self.lookup(host)
        if service is None:
            event(log, "activator.unknown_host", host=host, path=request.path)
            return _error(404, "unknown_host", f"no torpor service is configured for host "
                                               f"{host!r}", host=host)
        name = service.name
        arrived = self._clock.monotonic()
        self._on_held(name)
        try:
            endpoints = await self._hold(name)
        except QueueFullError as exc:
            event(log, "activator.queue_full", service=name, level=logging.WARNING)
            return _error(503, "queue_full", str(exc), service=name,
                          headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        except TimeoutError:
            abandoned(name, "deadline")
            event(log, "activator.deadline", service=name, level=logging.WARNING,
                  waited=round(self._clock.monotonic() - arrived, 3))
            return _error(504, "wake_timeout", f"service {name!r} did not become ready within "
                                               f"{self._wake_timeout:g}s", service=name)
        except WakeFailedError as exc:
            abandoned(name, "deadline" if exc.outcome == "timeout" else "failed")
            return _error(504 if exc.outcome == "timeout" else 503, f"wake_{exc.outcome}",
                          str(exc), service=name,
                          headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        except UnknownServiceError as exc:
            return _error(404, "unknown_service", str(exc), service=name)
        cold_start_ms = round((self._clock.monotonic() - arrived) * 1000)
        return await self._forward(request, name, endpoints, cold_start_ms)

    async def _hold(self, name: str) -> tuple[Endpoint, ...]:
        """Wait in `name`'s queue for its ready endpoints, at most wake_timeout."""
        with self._held.slot(name):
            try:
                async with asyncio.timeout(self._wake_timeout):
                    return await self._waker.wake(name, "first request")
            except asyncio.CancelledError:
                # aiohttp cancels the handler when the client hangs up: leave the queue,
                # count it; the wake goes on for the others.
                abandoned(name, "disconnected")
                event(log, "activator.client_gone", service=name)
                raise

    async def _forward(self, request: web.Request, name: str, endpoints: tuple[Endpoint, ...],
                       cold_start_ms: int) -> web.StreamResponse:
        """Proxy to the ready endpoints in turn; another endpoint only while nothing was sent."""
        headers = {COLD_START_HEADER: str(cold_start_ms)}
        first = next(self._turn)
        last_error: ProxyError | None = None
        for i in range(len(endpoints)):
            endpoint = endpoints[(first + i) % len(endpoints)]
            try:
                return await self._proxy.forward(request, endpoint, headers)
            except ProxyError as exc:
                last_error = exc
                if not exc.retryable:
                    break
        metrics.PROXY_ERRORS.labels(service=name).inc()
        event(log, "activator.proxy_failed", service=name, error=str(last_error),
              level=logging.WARNING)
        return _error(502, "upstream_failed", f"service {name!r} is ready but the request "
                                              f"could not be forwarded: {last_error}",
                      service=name)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None,
           **fields: str) -> web.Response:
    return web.json_response({"error": code, **fields, "message": message}, status=status,
                             headers=headers)


def make_app(handler: ActivatorHandler) -> web.Application:
    app = web.Application(client_max_size=0)  # bodies are streamed, never read whole here
    app.router.add_route("*", "/{tail:.*}", handler.handle)
    return app
