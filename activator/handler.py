"""The activator's HTTP/1 surface: what a request for a sleeping or unknown service gets.

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
import itertools
import logging

from aiohttp import web

from activator.answers import (
    RETRY_AFTER_SECONDS,
    Answer,
    answer_for,
    unknown_host,
    upstream_failed,
)
from activator.holding import Holding, Lookup, Ready
from activator.proxy import Proxy, ProxyError
from torpor import metrics
from torpor.logs import event
from torpor.model import Endpoint

log = logging.getLogger("torpor.activator")

#: Response header with how long the request waited for its service to wake.
COLD_START_HEADER = "x-torpor-cold-start-ms"


class ActivatorHandler:
    """Maps Host → service; holds, wakes and proxies what Envoy routed to the activator."""

    def __init__(self, lookup: Lookup, holding: Holding, proxy: Proxy) -> None:
        self._lookup = lookup
        self._holding = holding
        self._proxy = proxy
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
        service = await self._lookup(host)
        if service is None:
            event(log, "activator.unknown_host", host=host, path=request.path)
            return json_answer(unknown_host(host), host=host)
        name = service.name
        # aiohttp cancels this handler when the client hangs up: holding counts it and
        # re-raises, and the request is never proxied later.
        outcome = await self._holding.hold(name)
        if isinstance(outcome, Ready):
            return await self._forward(request, name, outcome.endpoints,
                                       round(outcome.waited * 1000))
        return json_answer(answer_for(outcome), service=name)

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
