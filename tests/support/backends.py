"""In-test HTTP backends on loopback that say who answered (for convergence checks)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from tests.support.net import free_port
from torpor.model import Endpoint


class Backend:
    """An aiohttp server answering every path with its own name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.requests = 0
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.port)

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.read()
        return web.Response(text=self.name, headers={
            "x-backend": self.name, "x-body-bytes": str(len(body)),
            # What the gateway sent on (routing tests: rewrites and headers it adds).
            "x-path": request.path_qs,
            "x-seen-service": request.headers.get("x-torpor-service", "")})

    async def start(self) -> Backend:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def start_backends(*names: str) -> list[Backend]:
    return list(await asyncio.gather(*(Backend(n).start() for n in names)))
