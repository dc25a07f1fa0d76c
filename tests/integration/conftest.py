"""Fixtures that start real processes and always stop them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.support.aborting import AbortingUpstream, EchoUpstream
from tests.support.backends import Backend
from tests.support.envoy import Envoy, stop_envoy
from tests.support.net import free_port
from tests.support.xds import XdsHarness


@pytest.fixture
async def activator_backend() -> AsyncIterator[Backend]:
    """Stands in for the activator: answers 'activator' for hosts with no route."""
    backend = await Backend("activator").start()
    yield backend
    await backend.stop()


@pytest.fixture
async def harness(activator_backend: Backend) -> AsyncIterator[XdsHarness]:
    h = XdsHarness(activator_backend.endpoint)
    yield h
    await h.stop()


@pytest.fixture
def xds_protocol() -> str:
    """The ADS variant the `envoys` speak: delta, the bootstrap's default. A test module
    whose tests must pass with both overrides this fixture with
    `@pytest.fixture(params=XDS_PROTOCOLS)` (torpor.config)."""
    return "delta"


@pytest.fixture
async def envoys(tmp_path: Path, xds_protocol: str
                 ) -> AsyncIterator[Callable[[int, str], Envoy]]:
    """Factory: envoys(xds_port, node_id) starts an Envoy speaking `xds_protocol`; all are
    stopped at teardown."""
    started: list[Envoy] = []

    def start(xds_port: int, node_id: str = "test-envoy") -> Envoy:
        envoy = Envoy(tmp_path, node_id, free_port(), xds_port, xds_protocol=xds_protocol)
        started.append(envoy)
        envoy.start()
        return envoy

    yield start
    for envoy in started:
        await stop_envoy(envoy)


@pytest.fixture(params=["fin", "rst"])
async def replica_a(request: pytest.FixtureRequest) -> AsyncIterator[AbortingUpstream]:
    """An upstream that reads each request whole, then closes unanswered (FIN, or RST)."""
    a = await AbortingUpstream("A", reset=request.param == "rst").start()
    yield a
    await a.stop()


@pytest.fixture
async def replica_b() -> AsyncIterator[EchoUpstream]:
    """An upstream that answers and logs every request."""
    b = EchoUpstream("B")
    await b.start()
    yield b
    await b.stop()
