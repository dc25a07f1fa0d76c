"""`gateway.routing: host_header` through a real Envoy, over delta and state-of-the-world
ADS: a service with the gateway's default routes is the cluster its request's Host names
(no virtual host of its own), so adding one changes no route table; a service with routes
of its own keeps its virtual host; a Host no cluster has is Envoy's 404, counted as an
unknown host; calls are counted under the service's name."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.support.backends import Backend, start_backends
from tests.support.envoy import Envoy, stop_envoy
from tests.support.net import free_port, wait_until
from tests.support.xds import XdsHarness, hibernated, svc
from torpor.config import XDS_PROTOCOLS
from torpor.model import Endpoint
from xds_server.resources import RoutedService

FLUSH = 1.0


@pytest.fixture(params=XDS_PROTOCOLS)
def xds_protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def harness(activator_backend: Backend) -> AsyncIterator[XdsHarness]:
    h = XdsHarness(activator_backend.endpoint, routing="host_header")
    yield h
    await h.stop()


@pytest.fixture
async def backends() -> AsyncIterator[tuple[Backend, Backend]]:
    a, b = await start_backends("awake", "paths")
    yield a, b
    await a.stop()
    await b.stop()


@pytest.fixture
async def envoy(tmp_path: Path, harness: XdsHarness, xds_protocol: str
                ) -> AsyncIterator[Callable[[], Envoy]]:
    started: list[Envoy] = []

    def start() -> Envoy:
        e = Envoy(tmp_path, "by-host", free_port(), harness.xds_port, stats_flush=FLUSH,
                  xds_protocol=xds_protocol)
        started.append(e)
        e.start()
        return e

    yield start
    for e in started:
        await stop_envoy(e)


def table(harness: XdsHarness, a: Endpoint, b: Endpoint) -> list[RoutedService]:
    return [svc("awake", a), hibernated(harness, "sleepy"),
            RoutedService("paths", "paths.test", (b,), paths=("/v2",))]


async def get(port: int, host: str, path: str = "/v1/predict") -> tuple[int, str, str]:
    """(status, the answering backend's name or the body, content type)."""
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{port}{path}", headers={"Host": host}) as r:
        body = await r.text()
        return r.status, r.headers.get("x-backend", body), r.headers.get("content-type", "")


async def route_updates(envoy: Envoy) -> int:
    _, text = await envoy.admin_get("/stats?filter=rds.torpor_routes.update_success")
    return sum(int(line.rsplit(": ", 1)[1]) for line in text.splitlines() if ": " in line)


async def test_services_are_reached_by_host_and_an_add_changes_no_route(
        harness: XdsHarness, envoy: Callable[[], Envoy], backends: tuple[Backend, Backend],
        activator_backend: Backend) -> None:
    a, b = backends
    services = table(harness, a.endpoint, b.endpoint)
    await harness.start(services)
    e = envoy()
    await e.wait_ready()
    port = harness.listen_port
    assert (await get(port, "awake.test"))[:2] == (200, "awake")
    assert (await get(port, f"awake.test:{port}"))[:2] == (200, "awake")  # port stripped
    assert (await get(port, "sleepy.test"))[:2] == (200, "activator")
    # a service with a path of its own keeps its virtual host: its path, and nothing else
    assert (await get(port, "paths.test", "/v2/x"))[:2] == (200, "paths")
    assert (await get(port, "paths.test", "/v1/x"))[0] == 404
    # nobody's host: Envoy's own 404, with the activator's JSON words
    code, body, kind = await get(port, "stranger.test")
    assert code == 404 and kind == "application/json"
    assert json.loads(body)["error"] == "unknown_host" and "stranger.test" in body

    routes_before = await route_updates(e)
    assert routes_before >= 1
    added = svc("added", a.endpoint)
    assert await harness.publish([*services, added])
    assert (await get(port, "added.test"))[:2] == (200, "awake")
    assert await route_updates(e) == routes_before  # clusters and endpoints only

    # a flip: the endpoints of the host-named cluster, as hibernation does it
    assert await harness.publish([*services, hibernated(harness, "added")])
    assert (await get(port, "added.test"))[:2] == (200, "activator")
    assert await harness.publish([*services, added])
    assert (await get(port, "added.test"))[:2] == (200, "awake")
    # removed: the Host names no cluster any more
    assert await harness.publish(services)
    assert (await get(port, "added.test"))[0] == 404
    assert await route_updates(e) == routes_before
    # a service that gains a route of its own gets a virtual host (and its cluster by name)
    assert await harness.publish([*services[:2], services[2],
                                  RoutedService("awake", "awake.test", (a.endpoint,),
                                                paths=("/v1",))])
    assert (await get(port, "awake.test"))[:2] == (200, "awake")
    assert (await get(port, "awake.test", "/other"))[0] == 404
    assert await route_updates(e) > routes_before
    assert activator_backend.requests == 2


async def test_calls_are_counted_by_service_and_unknown_hosts_by_host(
        harness: XdsHarness, envoy: Callable[[], Envoy],
        backends: tuple[Backend, Backend]) -> None:
    a, b = backends
    await harness.start(table(harness, a.endpoint, b.endpoint))
    collector = harness.collector
    for name in ("awake", "sleepy", "paths"):
        collector.ensure(name, created_at=time.time() - 3600)
    collector.set_hosts({f"{n}.test": n for n in ("awake", "sleepy", "paths")})
    e = envoy()
    await e.wait_ready()
    port = harness.listen_port
    for _ in range(4):
        assert (await get(port, "awake.test"))[0] == 200
    assert (await get(port, "sleepy.test"))[0] == 200
    for _ in range(3):
        assert (await get(port, "stranger.test"))[0] == 404

    def total(name: str) -> int:
        stats = collector.stats(name)
        return 0 if stats is None else stats.total

    await wait_until(lambda: total("awake") >= 4 and total("sleepy") >= 1
                     and collector.unknown_hosts.get("stranger.test", 0) >= 3, 20,
                     "the counters' flush and the access log")
    assert (total("awake"), total("sleepy")) == (4, 1)
    assert collector.unknown_hosts == {"stranger.test": 3}
    # the host-named cluster's statistics carry the service's name (alt_stat_name)
    _, text = await e.admin_get("/stats?filter=upstream_rq_total")
    assert "cluster.awake.upstream_rq_total: 4" in text
    assert "awake.test" not in text
