"""An in-process xDS control plane (cache, ADS, publisher, builder) for Envoy tests.

It drives the real server modules with service tables a test chooses, the way
go-control-plane's integration harness pushes snapshots at a real Envoy.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc

from tests.support.net import free_port
from torpor.model import Endpoint
from xds_server.cache import SnapshotCache
from xds_server.collector import CallCollector
from xds_server.publisher import Publisher
from xds_server.resources import GatewaySettings, ResourceBuilder, RoutedService
from xds_server.server import AdsServer
from xds_server.serving import start_xds_listener


class XdsHarness:
    """`XdsHarness(activator)` for one activator, `XdsHarness(a, b, ...)` for a fleet.

    `settings` overrides GatewaySettings' other fields (e.g. retry_buffer_bytes)."""

    def __init__(self, *activators: Endpoint, ack_timeout: float = 10.0,
                 **settings: Any) -> None:
        self.listen_port = free_port()
        self.settings = GatewaySettings(listen=Endpoint("127.0.0.1", self.listen_port),
                                        activators=activators, **settings)
        self.builder = ResourceBuilder(self.settings)
        self.cache = SnapshotCache()
        self.ads = AdsServer(self.cache)
        self.collector = CallCollector()
        self.publisher = Publisher(self.cache, self.ads, ack_timeout=ack_timeout)
        self.xds_port = 0
        self._server: grpc.aio.Server | None = None

    async def start(self, services: Iterable[RoutedService]) -> None:
        """Load the first table, then accept streams (never serve an empty snapshot)."""
        table = list(services)
        self.cache.set_resources(self.builder.build(table))
        self._server, self.xds_port = await start_xds_listener(
            f"127.0.0.1:{self.xds_port or free_port()}", self.ads, self.collector
        )

    async def publish(self, services: Iterable[RoutedService]) -> bool:
        table = list(services)
        return await self.publisher.publish(lambda: self.builder.build(table))

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None


def svc(name: str, *endpoints: Endpoint) -> RoutedService:
    return RoutedService(name=name, host=f"{name}.test", endpoints=tuple(endpoints))


def hibernated(harness: XdsHarness, name: str, http2: bool = False) -> RoutedService:
    """`name` asleep: its cluster points at the activators, as the control plane does it."""
    return RoutedService(name=name, host=f"{name}.test",
                         endpoints=harness.builder.activator_targets(http2), http2=http2)


def with_xds_protocol(path: Path, protocol: str) -> Path:
    """The config file at `path` (as tests/support/configs.py writes it) with
    `control_plane.xds_protocol: protocol`: the Envoy `torpor up` starts speaks it."""
    text = path.read_text()
    assert "control_plane: {" in text, text
    path.write_text(text.replace("control_plane: {", f"control_plane: {{xds_protocol: {protocol}, ",
                                 1))
    return path
