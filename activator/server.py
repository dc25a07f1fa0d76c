"""Runs the activator's HTTP server on `activator.listen` (start/stop for `torpor up`
and `torpor activator`).

`torpor up` passes the control plane's waker, so that one process has one wake in flight
per service. aiohttp is told to cancel a handler whose client hung up: that is how a held
request notices the disconnect and leaves its queue.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from activator.edge_server import EdgeAppRunner
from activator.h2_holder import H2Holder
from activator.handler import ActivatorHandler, make_app
from activator.holding import HeldRequests, Holding, ServiceLookup
from activator.proxy import Proxy
from torpor.catalog import ServiceCatalog
from torpor.clock import Clock
from torpor.config import Config
from torpor.errors import TorporError
from torpor.lifecycle.ports import Wakes


class ActivatorServer:
    def __init__(self, config: Config, waker: Wakes, clock: Clock | None = None,
                 on_held: Callable[[str], None] | None = None,
                 after_wake: Callable[[str], Awaitable[None]] | None = None,
                 catalog: ServiceCatalog | None = None,
                 on_miss: Callable[[], Awaitable[None]] | None = None) -> None:
        """`after_wake(name)` returns once every Envoy sends `name`'s traffic to its
        replicas: the HTTP/2 holder asks Envoy to replay a held request only then.
        `catalog` maps hosts to services (default: the config's); `on_miss` refreshes it
        when a host is not found."""
        self._config = config
        self._catalog = catalog if catalog is not None else ServiceCatalog(config.services)
        self._on_miss = on_miss
        self._waker = waker
        self._clock = clock
        self._on_held = on_held
        self._after_wake = after_wake
        self._h2: H2Holder | None = None
        self.port_h2 = 0
        self._runner: web.AppRunner | None = None
        self._proxy = Proxy()
        self.held = HeldRequests(config.activator.max_held_per_service)
        self.port = 0

    async def start(self) -> int:
        """Listen; returns the bound port (the config's may be 0 in tests)."""
        listen = self._config.activator.listen
        await self._proxy.start()
        # One lookup and one way of holding for both fronts: an HTTP/1 and an HTTP/2 request
        # of the same service find it, queue, time out and fail alike.
        lookup = ServiceLookup(self._catalog.by_host, self._on_miss)
        holding = Holding(self.held, self._waker, self._config.activator.wake_timeout,
                          self._clock, self._on_held)
        handler = ActivatorHandler(lookup, holding, self._proxy)
        # Parser limits from the edge limits Envoy's listener has too (torpor/edge.py).
        self._runner = EdgeAppRunner(make_app(handler), self._config.gateway.edge,
                                     access_log=None,
                                     handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, listen.host, listen.port, backlog=4096)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise TorporError(f"cannot listen for the activator on {listen}: {exc.strerror}") \
                from exc
        server = site._server  # aiohttp exposes the bound socket only here
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else listen.port
        self._h2 = H2Holder(lookup, holding, self._after_wake)
        h2_listen = self._config.activator.listen_h2
        try:
            self.port_h2 = await self._h2.start(h2_listen.host, h2_listen.port)
        except TorporError:
            await self.stop()
            raise
        return self.port

    async def stop(self) -> None:
        if self._h2 is not None:
            await self._h2.stop()
            self._h2 = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._proxy.close()
