"""The activator's HTTP surface: what a request for a sleeping or unknown service gets.

Owns: finding the service by Host and answering. This first version only answers: an
unknown host gets 404 with a body that says so; a known service gets 503 with Retry-After
while holding and waking arrive with the hibernation work (holding.py, waker.py). It never
proxies to anything outside the service table.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from aiohttp import web

from torpor.config import ServiceConfig
from torpor.logs import event

log = logging.getLogger("torpor.activator")


class ActivatorHandler:
    """Maps Host → service and answers requests that Envoy routed to the activator."""

    def __init__(self, services: Iterable[ServiceConfig]) -> None:
        self._by_host = {s.host.lower(): s for s in services}

    def lookup(self, host_header: str) -> ServiceConfig | None:
        """The service for a Host header (port and case ignored), or None."""
        host = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
        return self._by_host.get(host.lower())

    async def handle(self, request: web.Request) -> web.Response:
        host = request.headers.get("Host", "")
        service = self.lookup(host)
        if service is None:
            event(log, "activator.unknown_host", host=host, path=request.path)
            return web.json_response(
                {"error": "unknown_host", "host": host,
                 "message": f"no torpor service is configured for host {host!r}"},
                status=404,
            )
        event(log, "activator.not_ready", service=service.name, path=request.path)
        return web.json_response(
            {"error": "service_unavailable", "service": service.name,
             "message": f"service {service.name!r} has no ready replica yet; retry shortly"},
            status=503,
            headers={"Retry-After": "1"},
        )


def make_app(handler: ActivatorHandler) -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler.handle)
    return app
