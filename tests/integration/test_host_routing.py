"""`gateway.routing: host_header` through a real Envoy, over delta and state-of-the-world
ADS: a service with the gateway's default routes is the cluster its request's Host names
(no virtual host of its own), so adding one changes no route table; a service with routes
of its own keeps its virtual host; a Host no cluster has is Envoy's 404, counted as an
unknown host; calls are counted under the service's name."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.support.backends import Backend, start_backends
from tests.support.configs import model_service, write_config
from tests.support.envoy import Envoy
from tests.support.net import wait_until
from tests.support.up import Up, UpRuns, wait_state
from tests.support.xds import XdsHarness, hibernated, svc
from torpor.config import XDS_PROTOCOLS, Config, load_config
from torpor.gateway import admin_session, admin_url
from torpor.model import Endpoint
from xds_server.resources import ApiKeys, RoutedService


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
        harness: XdsHarness, envoys: Callable[[int, str], Envoy], backends: tuple[Backend, Backend],
        activator_backend: Backend) -> None:
    a, b = backends
    services = table(harness, a.endpoint, b.endpoint)
    await harness.start(services)
    e = envoys(harness.xds_port, "by-host")
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


@pytest.mark.parametrize("xds_protocol", ["delta"])  # counting does not depend on it
async def test_calls_are_counted_by_service_and_unknown_hosts_by_host(
        harness: XdsHarness, envoys: Callable[[int, str], Envoy],
        backends: tuple[Backend, Backend]) -> None:
    a, b = backends
    await harness.start(table(harness, a.endpoint, b.endpoint))
    collector = harness.collector
    for name in ("awake", "sleepy", "paths"):
        collector.ensure(name, created_at=time.time() - 3600)
    collector.set_hosts({f"{n}.test": n for n in ("awake", "sleepy", "paths")})
    e = envoys(harness.xds_port, "by-host")
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


# --- the whole loop through `torpor up` ---------------------------------------------------


@pytest.fixture
async def up_by_host(tmp_path: Path) -> AsyncIterator[tuple[Up, Config]]:
    path = write_config(tmp_path, model_service("sleepy", 2, load_seconds=1.0),
                        "policy: {kind: fixed, idle_after: 3s, evict_after: 6s, "
                        "creation_grace: 0s, check_every: 250ms}")
    text = path.read_text()
    assert "gateway: {listen:" in text
    path.write_text(text.replace("gateway: {listen:", "gateway: {routing: host_header, listen:"))
    runs = UpRuns()
    try:
        yield await runs.start(path), load_config(path)
    finally:
        await runs.stop_all()


async def envoy_names(config: Config, resource: str, key: str) -> set[str]:
    """Names in Envoy's config dump: virtual hosts (`dynamic_route_configs`) or clusters
    (`dynamic_active_clusters`)."""
    url = admin_url(config.gateway.admin, f"/config_dump?resource={resource}")
    async with admin_session(config.gateway.admin, 10) as session, session.get(url) as r:
        dump = await r.json()
    if key == "vhosts":
        return {v["name"] for c in dump.get("configs", [])
                for v in c.get("route_config", {}).get("virtual_hosts", [])}
    return {c["cluster"]["name"] for c in dump.get("configs", []) if "cluster" in c}


async def test_whole_loop_by_host_hibernate_wake_evict_wake(
        up_by_host: tuple[Up, Config]) -> None:
    _, config = up_by_host
    url = f"http://{config.gateway.listen}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/predict?text=good",
                               headers={"Host": "sleepy.localhost"}) as r:
            assert r.status == 200, await r.text()
        # no virtual host of its own; its cluster is named by its host
        assert await envoy_names(config, "dynamic_route_configs", "vhosts") == {
            "torpor_by_host"}
        assert "sleepy.localhost" in await envoy_names(
            config, "dynamic_active_clusters", "clusters")

        hibernated = await wait_state(config, "sleepy", "HIBERNATED", 30)
        assert hibernated["replicas"] == 0 and hibernated["recorded_replicas"] == 2

        async def one(i: int) -> tuple[int, str]:
            async with session.post(f"{url}/echo", data=f"held {i}".encode(),
                                    headers={"Host": f"sleepy.localhost:{i}"}) as r:
                return r.status, await r.text()

        results = await asyncio.gather(*(one(i) for i in range(1, 21)))
        assert results == [(200, f"held {i}") for i in range(1, 21)]
        awake = await wait_state(config, "sleepy", "ACTIVE", 10)
        assert awake["recorded_replicas"] == 2

        # evicted: the cluster stays, pointed at the activator (no catch-all in this mode)
        await wait_state(config, "sleepy", "EVICTED", 45)
        assert "sleepy.localhost" in await envoy_names(
            config, "dynamic_active_clusters", "clusters")
        async with session.post(f"{url}/echo", data=b"again",
                                headers={"Host": "sleepy.localhost"}) as r:
            assert (r.status, await r.read()) == (200, b"again")
            assert "x-torpor-cold-start-ms" in r.headers
        await wait_state(config, "sleepy", "ACTIVE", 10)

        async with session.get(f"{url}/predict", headers={"Host": "nobody.localhost"}) as r:
            assert r.status == 404
            assert (await r.json())["error"] == "unknown_host"


@pytest.mark.parametrize("xds_protocol", ["delta"])  # Envoy checks it, not the protocol
async def test_gateway_auth_is_asked_by_the_host_route(
        harness: XdsHarness, envoys: Callable[[int, str], Envoy],
        backends: tuple[Backend, Backend]) -> None:
    """gateway.auth with host_header: a service that asks the gateway's keys is found by
    Host and Envoy asks for the keys first; an unknown Host is asked for them too (a
    caller without a key learns nothing of which hosts exist)."""
    a, _ = backends
    keys = ApiKeys((("client", "s3cret"),))
    harness.builder.set_gateway_auth(keys)
    await harness.start([RoutedService("awake", "awake.test", (a.endpoint,), auth=keys)])
    e = envoys(harness.xds_port, "by-host-auth")
    await e.wait_ready()
    port = harness.listen_port

    async def status(host: str, key: str | None) -> int:
        headers = {"Host": host, **({"x-api-key": key} if key else {})}
        async with aiohttp.ClientSession() as s, s.get(
                f"http://127.0.0.1:{port}/v1/predict", headers=headers) as r:
            return r.status

    assert await status("awake.test", None) == 401
    assert await status("awake.test", "wrong") == 401
    assert await status("awake.test", "s3cret") == 200
    assert await status("stranger.test", None) == 401
    assert await status("stranger.test", "s3cret") == 404
