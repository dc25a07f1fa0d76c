"""Runs the activator's HTTP server on `activator.listen` (start/stop for `torpor up`
and `torpor activator`)."""

from __future__ import annotations

from aiohttp import web

from activator.handler import ActivatorHandler, make_app
from torpor.config import Config
from torpor.errors import TorporError


class ActivatorServer:
    def __init__(self, config: Config) -> None:
        self._config = config
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        listen = self._config.activator.listen
        self._runner = web.AppRunner(make_app(ActivatorHandler(self._config.services)),
                                     access_log=None)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, listen.host, listen.port).start()
        except OSError as exc:
            await self._runner.cleanup()
            raise TorporError(f"cannot listen for the activator on {listen}: {exc.strerror}") \
                from exc

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
