"""The activator's HTTP/1 surface: what a request for a sleeping or unknown service gets
(a browser's page request: the waking page at once, waking_page.py).

Owns: the HTTP/1 side of one request: finding its service (holding.ServiceLookup), holding
it (holding.Holding, without a route confirmation: this front proxies to the ready endpoints
itself), rendering what holding answers.py says as a JSON body (`{"error", "service",
"message"}`, Retry-After where the answer asks for it), and then handing a ready request to
the proxy with its cold-start time. Must not wake (the waker), bound queues or decide what a
failure means (holding.py, answers.py) or forward bytes (proxy.py) itself, and never proxies
to anything outside the service table.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import statistics
import string
from collections.abc import Callable

from aiohttp import web

from activator.answers import (
    RETRY_AFTER_SECONDS,
    Answer,
    answer_for,
    unknown_host,
    upstream_failed,
)
from activator.async_calls import AsyncCalls
from activator.holding import Holding, Lookup, Ready
from activator.proxy import Proxy, ProxyError
from activator.waking_page import WAKING_HEADER, WakeView, render, wants_waking_page
from torpor import metrics
from torpor.async_calls import call_id_of, wants_async
from torpor.config import ServiceConfig
from torpor.lifecycle.ports import WakeProgress, Wakes
from torpor.logs import event
from torpor.model import Endpoint
from torpor.routes import SERVICE_HEADER, VERSION_HEADER

log = logging.getLogger("torpor.activator")

#: Response header with how long the request waited for its service to wake.
COLD_START_HEADER = "x-torpor-cold-start-ms"


#: How long a browser's request waits for a wake that may be done at once (the service was
#: awake already, Envoy had not flipped yet) before it gets the waking page instead.
READY_NOW_SECONDS = 0.25


class Wakings:
    """The wakes started for waking pages: one background wake per service (a reload joins
    it), when it started, and how long this service's last wakes took (the page's
    "usually takes"). A wake's failure is logged here; the next request is held as usual
    and gets the failure's own answer."""

    def __init__(self, wakes: Wakes, progress: Callable[[str], WakeProgress | None],
                 template: string.Template) -> None:
        self._wakes = wakes
        self._progress = progress
        self._template = template
        self._running: dict[str, tuple[asyncio.Task[tuple[Endpoint, ...]], float]] = {}
        self._took: dict[str, collections.deque[float]] = {}

    def start(self, name: str) -> asyncio.Task[tuple[Endpoint, ...]]:
        """The background wake of `name` (started now, or the one already running)."""
        running = self._running.get(name)
        if running is not None:
            return running[0]
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._wakes.wake(name, "a browser's request (waking page)"))
        self._running[name] = (task, loop.time())
        task.add_done_callback(lambda done: self._finished(name, done))
        return task

    def page(self, name: str) -> web.Response:
        """The waking page of `name` as it stands now."""
        _, started = self._running.get(name, (None, asyncio.get_running_loop().time()))
        now = self._progress(name)
        took = self._took.get(name)
        view = WakeView(
            service=name, elapsed=asyncio.get_running_loop().time() - started,
            ready=now.ready if now else None, replicas=now.replicas if now else None,
            typical=statistics.median(took) if took else None)
        return web.Response(
            status=503, text=render(view, self._template), content_type="text/html",
            headers={"Retry-After": str(view.refresh), "Cache-Control": "no-store",
                     WAKING_HEADER: "1"})

    def _finished(self, name: str, task: asyncio.Task[tuple[Endpoint, ...]]) -> None:
        _, started = self._running.pop(name, (None, 0.0))
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            event(log, "activator.page_wake_failed", service=name, error=str(error),
                  level=logging.WARNING)
            return
        self._took.setdefault(name, collections.deque(maxlen=5)).append(
            asyncio.get_running_loop().time() - started)


class ActivatorHandler:
    """Maps Host → service; holds, wakes and proxies what Envoy routed to the activator;
    a browser's page request to a sleeping service gets the waking page at once."""

    def __init__(self, lookup: Lookup, holding: Holding, proxy: Proxy,
                 wakings: Wakings | None = None, calls: AsyncCalls | None = None) -> None:
        self._lookup = lookup
        self._holding = holding
        self._proxy = proxy
        self._wakings = wakings
        self._calls = calls
        self._turn = itertools.count()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Until no request is being held, answered or proxied (the activator's drain)."""
        await self._idle.wait()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._handle(request)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        host = request.headers.get("Host", "")
        service = await self._lookup(host, request.path, request.headers.get(SERVICE_HEADER),
                                     request.headers.get(VERSION_HEADER))
        if service is None:
            event(log, "activator.unknown_host", host=host, path=request.path)
            return json_answer(unknown_host(host), host=host)
        name = service.name
        if self._calls is not None:
            call_id = call_id_of(request.path)
            if call_id is not None and request.method in ("GET", "HEAD"):
                keeper = self._calls.kept_elsewhere(call_id, request.headers)
                if keeper is not None:  # another replica of the fleet took the call
                    return await self._calls.fetch_status(request, keeper, name)
                return self._calls.status(call_id, await self._call_owner(request, call_id,
                                                                          service))
            if wants_async(request.headers) and not self._holding.draining:
                return await self._calls.submit(request, name)
        if (self._wakings is not None and service.waking_page and not self._holding.draining
                and wants_waking_page(request.method, request.headers)):
            page = await self._waking_page(name)
            if page is not None:
                return page
        # aiohttp cancels this handler when the client hangs up: holding counts it and
        # re-raises, and the request is never proxied later.
        outcome = await self._holding.hold(name)
        if isinstance(outcome, Ready):
            return await self._forward(request, name, outcome.endpoints,
                                       round(outcome.waited * 1000))
        return json_answer(answer_for(outcome), service=name)

    async def _call_owner(self, request: web.Request, call_id: str,
                          service: ServiceConfig) -> str:
        """Whose status a GET of a call's location may see: the call's own service when it
        is a version of the service this request's host reaches (the split picked it when
        the call was made), else the service the host reaches."""
        owner = self._calls.service_of(call_id) if self._calls is not None else None
        if owner is None or owner == service.name:
            return service.name
        sibling = await self._lookup(request.headers.get("Host", ""), request.path,
                                     request.headers.get(SERVICE_HEADER), owner)
        return owner if sibling is not None and sibling.name == owner else service.name

    async def _waking_page(self, name: str) -> web.Response | None:
        """The waking page, unless the wake is over at once (the service was awake, or the
        wake failed: then the request is held as usual and gets the real answer)."""
        assert self._wakings is not None
        task = self._wakings.start(name)
        done, _ = await asyncio.wait({task}, timeout=READY_NOW_SECONDS)
        if done:
            return None
        self._holding.note_call(name)
        event(log, "activator.waking_page", service=name)
        return self._wakings.page(name)

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
        return json_answer(upstream_failed(name, str(last_error)), service=name)


def json_answer(answer: Answer, **fields: str) -> web.Response:
    """`answer` as HTTP/1 clients get it: `{"error": code, **fields, "message": ...}` with
    its status, and Retry-After when the answer asks for it."""
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if answer.retry_after else None
    return web.json_response({"error": answer.code, **fields, "message": answer.message},
                             status=answer.status, headers=headers)


def make_app(handler: ActivatorHandler) -> web.Application:
    app = web.Application(client_max_size=0)  # bodies are streamed, never read whole here
    app.router.add_route("*", "/{tail:.*}", handler.handle)
    return app
