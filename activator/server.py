"""Runs the activator's HTTP server on `activator.listen` (start/stop for `torpor up`
and `torpor activator`).

`torpor up` passes the control plane's waker, so that one process has one wake in flight
per service. aiohttp is told to cancel a handler whose client hung up: that is how a held
request notices the disconnect and leaves its queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from activator.async_calls import AsyncCalls, ResultSpool
from activator.async_owners import Replicas
from activator.edge_server import EdgeAppRunner
from activator.h2_holder import H2Holder
from activator.handler import ActivatorHandler, Wakings, make_app
from activator.holding import HeldRequests, Holding, ServiceLookup
from activator.proxy import Proxy
from activator.waking_page import load_template
from torpor import metrics
from torpor.catalog import ServiceCatalog
from torpor.clock import Clock
from torpor.config import Config
from torpor.errors import ConfigError, TorporError
from torpor.lifecycle.ports import Wakes
from torpor.logs import event
from torpor.wake_settings import settings_lookup

log = logging.getLogger("torpor.activator")

#: After the drain grace: how long the answers to the requests still held (and requests
#: still being proxied) get before the server closes.
ANSWER_SECONDS = 5.0


class ActivatorServer:
    def __init__(self, config: Config, waker: Wakes, clock: Clock | None = None,
                 on_held: Callable[[str], None] | None = None,
                 after_wake: Callable[[str], Awaitable[None]] | None = None,
                 catalog: ServiceCatalog | None = None,
                 on_miss: Callable[[], Awaitable[None]] | None = None,
                 replicas: Replicas | None = None) -> None:
        """`after_wake(name)` returns once every Envoy sends `name`'s traffic to its
        replicas: the HTTP/2 holder asks Envoy to replay a held request only then.
        `catalog` maps hosts to services (default: the config's); `on_miss` refreshes it
        when a host is not found. `replicas`: this activator's name in a fleet and where
        the other activators are (asynchronous calls are fetched from the one that took
        them); None: one activator."""
        self._config = config
        self._catalog = catalog if catalog is not None else ServiceCatalog(config.services)
        self._on_miss = on_miss
        self._waker = waker
        self._clock = clock
        self._on_held = on_held
        self._after_wake = after_wake
        self._replicas = replicas
        self._h2: H2Holder | None = None
        self._handler: ActivatorHandler | None = None
        self._site: web.TCPSite | None = None
        self._holding: Holding | None = None
        self._grace_over = asyncio.Event()
        self.port_h2 = 0
        self._runner: web.AppRunner | None = None
        self._proxy = Proxy()
        self._calls: AsyncCalls | None = None
        self.held = HeldRequests(config.activator.max_held_per_service,
                                 config.activator.max_held)
        self.port = 0

    async def start(self) -> int:
        """Listen; returns the bound port (the config's may be 0 in tests)."""
        listen = self._config.activator.listen
        await self._proxy.start()
        # One lookup and one way of holding for both fronts: an HTTP/1 and an HTTP/2 request
        # of the same service find it, queue, time out and fail alike.
        lookup = ServiceLookup(self._catalog.by_host, self._on_miss, self._catalog.get)
        holding = Holding(self.held, self._waker, self._config.activator.wake_timeout,
                          self._clock, self._on_held,
                          settings_lookup(self._config.activator, self._catalog.get))
        activator = self._config.activator
        if activator.async_calls:
            self._calls = AsyncCalls(
                ResultSpool(activator.async_spool or self._config.log_dir() / "async",
                            activator.async_result_ttl, activator.async_max_calls,
                            owner=self._replicas.me if self._replicas else None),
                holding, activator.async_max_bytes, replicas=self._replicas)
            await self._calls.start()
        handler = ActivatorHandler(lookup, holding, self._proxy, self._wakings(), self._calls)
        self._handler, self._holding = handler, holding
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
        self._site = site
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
        metrics.ACTIVATOR_SERVING.set(1)  # the no-activator alert looks for a 1
        return self.port

    def _wakings(self) -> Wakings:
        """The waking pages' wakes, with the configured template (a bad one is a config
        error) and the waker's progress where it has one (a waker that wakes through the
        control plane's admin API does not: the page then shows the time only)."""
        path = self._config.activator.waking_page_template
        try:
            template = load_template(path)
        except ValueError as exc:
            raise ConfigError(str(self._config.path), "activator.waking_page_template",
                              str(exc)) from exc
        progress = getattr(self._waker, "progress", None)
        return Wakings(self._waker, progress if callable(progress) else (lambda name: None),
                       template)

    def refuse_new(self) -> None:
        """From now on no new connection is accepted and every new request is refused at
        once: HTTP/1 503 "draining" + Retry-After, HTTP/2 RST_STREAM REFUSED_STREAM (`drain`
        does this first; the assembly calls it before closing Envoy's listeners)."""
        if self._holding is not None:
            self._holding.start_drain()
        # No new connection either: in a fleet, Envoy's retry (connect-failure) takes a
        # new request to another activator; open connections stay for the held requests.
        if self._site is not None:
            server = self._site._server  # aiohttp exposes the listening server only here
            if server is not None:
                server.close()
        if self._h2 is not None:
            self._h2.stop_listening()

    def end_grace(self) -> None:
        """End a drain's grace now (a second SIGTERM/SIGINT): what is held is answered
        503 + Retry-After at once."""
        self._grace_over.set()

    async def drain(self, grace: float | None = None) -> None:
        """The first half of a graceful stop: refuse new connections and requests
        (`refuse_new`), let the held ones wait for their wake and be
        answered (proxied, or replayed by Envoy) for up to `grace` seconds (default
        `activator.drain_grace`), then answer those still held 503 + Retry-After and give
        the answers a moment to be written. Nothing is cut here; `stop` follows."""
        holding, handler = self._holding, self._handler
        if holding is None or handler is None:
            return
        grace = self._config.activator.drain_grace if grace is None else grace
        loop = asyncio.get_running_loop()
        started = loop.time()
        held = holding.held.total()
        self.refuse_new()
        event(log, "activator.draining", held=held, grace=grace)
        if not await self._idle_within(grace, self._grace_over):
            holding.end_drain()
            await self._idle_within(ANSWER_SECONDS)
        event(log, "activator.drained", left=holding.held.total(),
              seconds=round(loop.time() - started, 3))

    async def _idle_within(self, seconds: float, cut: asyncio.Event | None = None) -> bool:
        """Whether both fronts are done with every request within `seconds` (and before
        `cut` is set)."""
        assert self._handler is not None
        waits = [self._handler.wait_idle()]
        if self._h2 is not None:
            waits.append(self._h2.wait_idle())
        idle: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*waits))
        cut_wait: asyncio.Future[Any] = asyncio.ensure_future((cut or asyncio.Event()).wait())
        try:
            await asyncio.wait({idle, cut_wait}, timeout=seconds,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            cut_wait.cancel()
            if not idle.done():
                idle.cancel()
        return idle.done() and not idle.cancelled()

    async def stop(self) -> None:
        if self._runner is not None:
            metrics.ACTIVATOR_SERVING.set(0)
        if self._calls is not None:
            await self._calls.stop()
            self._calls = None
        if self._h2 is not None:
            await self._h2.stop()
            self._h2 = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._proxy.close()
