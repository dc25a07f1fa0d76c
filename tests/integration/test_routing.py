"""Hosts, wildcards and path prefixes against Envoy's real matching: a real Envoy, given
torpor's routes for services that share hosts, answer on wildcards and paths and rewrite
them, says which service each request line reaches; that is what torpor's own rule
(torpor/routes.py, used by the activator and the collector) says too, line by line.
A client cannot name the service itself: Envoy drops its `x-torpor-service`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.support.backends import Backend, start_backends
from tests.support.configs import model_service, write_config
from tests.support.envoy import Envoy
from tests.support.up import UpRuns, status_json
from tests.support.xds import XdsHarness
from torpor import admin_client
from torpor.config import load_config
from torpor.credentials import admin_target
from torpor.model import Endpoint
from torpor.routes import SERVICE_HEADER, Routes, RouteTable
from xds_server.resources import RoutedService

pytestmark = pytest.mark.envoy

SERVICES = {
    "api": dict(host="api.example.com"),
    "sentiment": dict(host="api.example.com", paths=("/v1/models/sentiment",), rewrite="/"),
    "models": dict(host="api.example.com", paths=("/v1/models",)),
    "tenants": dict(host="tenants.example.com", hosts=("*.tenants.example.com",)),
    "acme": dict(host="acme.tenants.example.com", hosts=("acme.test",)),
    "docs": dict(host="docs.example.com", hosts=("*.example.com",), paths=("/docs",),
                 rewrite="/manual"),
}
#: (Host, path, service that answers or None, path the replica sees)
LINES: list[tuple[str, str, str | None, str | None]] = [
    ("api.example.com", "/", "api", "/"),
    ("api.example.com", "/health?x=1", "api", "/health?x=1"),
    ("api.example.com", "/v1/models/sentiment", "sentiment", "/"),
    ("api.example.com", "/v1/models/sentiment/", "sentiment", "/"),
    ("api.example.com", "/v1/models/sentiment/predict", "sentiment", "/predict"),
    ("api.example.com", "/v1/models/sentiment/predict?q=good", "sentiment", "/predict?q=good"),
    ("api.example.com", "/v1/models/sentiment-2", "models", "/v1/models/sentiment-2"),
    ("api.example.com", "/v1/models", "models", "/v1/models"),
    ("api.example.com", "/v1/models/other", "models", "/v1/models/other"),
    ("api.example.com", "/v1/modelsx", "api", "/v1/modelsx"),
    ("API.Example.com:8080", "/v1/models/x", "models", "/v1/models/x"),
    ("api.example.com", "/docs", "api", "/docs"),
    ("x.tenants.example.com", "/", "tenants", "/"),
    ("a.b.tenants.example.com", "/any/path", "tenants", "/any/path"),
    ("tenants.example.com", "/t", "tenants", "/t"),
    ("acme.tenants.example.com", "/", "acme", "/"),
    ("acme.test", "/", "acme", "/"),
    ("acme.test:443", "/deep/x", "acme", "/deep/x"),
    ("docs.example.com", "/docs", "docs", "/manual"),
    ("docs.example.com", "/docs/intro", "docs", "/manual/intro"),
    ("www.example.com", "/docs/a/b", "docs", "/manual/a/b"),
    ("www.example.com", "/", None, None),
    ("docs.example.com", "/manual", None, None),
    ("nobody.test", "/", None, None),
]


def routed(backends: dict[str, Backend]) -> list[RoutedService]:
    return [RoutedService(name, endpoints=(backends[name].endpoint,), **fields)
            for name, fields in SERVICES.items()]  # type: ignore[arg-type]


@pytest.fixture
async def gateway(envoys: Callable[[int, str], Envoy]) -> AsyncIterator[str]:
    backends = {b.name: b for b in await start_backends(*SERVICES)}
    harness = XdsHarness(Endpoint("127.0.0.1", 9))  # no activator: the catch-all fails
    try:
        await harness.start(routed(backends))
        envoy = envoys(harness.xds_port, "routing")
        await envoy.wait_ready()
        yield f"http://127.0.0.1:{harness.listen_port}"
    finally:
        await harness.stop()
        for backend in backends.values():
            await backend.stop()


async def test_envoy_routes_each_line_as_torpor_says(gateway: str) -> None:
    table = RouteTable(Routes(name, (f["host"], *f.get("hosts", ())), f.get("paths") or ("/",))
                       for name, f in SERVICES.items())  # type: ignore[misc]
    seen = []
    async with aiohttp.ClientSession() as session:
        for host, path, service, replica_path in LINES:
            async with session.get(gateway + path, headers={"Host": host}) as r:
                got = (r.headers.get("x-backend"), r.headers.get("x-path"))
            seen.append(f"{host}{path} -> {got[0]} {got[1]}")
            assert got == (service, replica_path), f"{host}{path}"
            assert table.find(host, path.split("?")[0]) == service, f"{host}{path}"
    print("\n" + "\n".join(seen))


async def test_a_client_cannot_name_the_service(gateway: str) -> None:
    """The activator trusts `x-torpor-service` for rewritten paths: Envoy drops a client's
    own before routing and sets it only on those routes."""
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway + "/", headers={
                "Host": "api.example.com", SERVICE_HEADER: "sentiment"}) as r:
            assert (r.headers["x-backend"], r.headers["x-seen-service"]) == ("api", "")
        async with session.get(gateway + "/v1/models/sentiment/x", headers={
                "Host": "api.example.com", SERVICE_HEADER: "api"}) as r:
            assert (r.headers["x-backend"], r.headers["x-seen-service"]) == (
                "sentiment", "sentiment")


async def test_a_sleeping_service_under_a_shared_host_is_woken_with_its_path_rewritten(
        tmp_path: Path) -> None:
    """Through `torpor up`: two services on one host, the second under a path that Envoy
    rewrites. Asleep, its request reaches the activator with the rewritten path; the
    activator knows the service from Envoy's header, wakes it, and the replica answers
    the rewritten path. `status --json` shows hosts and paths."""
    services = (model_service("front", 1).replace(
        "host: front.localhost", "host: api.localhost")
        + model_service("sentiment", 1).replace(
            "host: sentiment.localhost",
            "host: api.localhost\n    paths: [/v1/models/sentiment]\n    rewrite: /"))
    path = write_config(tmp_path, services)
    config = load_config(path)
    gateway = f"http://{config.gateway.listen}"
    runs = UpRuns()
    try:
        await runs.start(path)
        await asyncio.to_thread(admin_client.hibernate, admin_target(config), "sentiment")
        async with aiohttp.ClientSession() as session:
            async with session.post(gateway + "/v1/models/sentiment/predict",
                                    data=b"a good day", headers={"Host": "api.localhost"}) as r:
                body = await r.json()
                assert r.status == 200, body
                assert r.headers["x-served-by"].startswith("sentiment:")
                assert body["label"] == "positive"
            async with session.get(gateway + "/healthz", headers={"Host": "api.localhost"}) as r:
                assert (r.status, r.headers["x-served-by"].split(":")[0]) == (200, "front")
        by_name = {s["name"]: s for s in status_json(path)}
        assert by_name["sentiment"]["state"] == "ACTIVE"
        assert (by_name["sentiment"]["hosts"], by_name["sentiment"]["paths"],
                by_name["sentiment"]["rewrite"]) == (["api.localhost"],
                                                     ["/v1/models/sentiment"], "/")
        assert (by_name["front"]["hosts"], by_name["front"]["paths"]) == (["api.localhost"],
                                                                          ["/"])
    finally:
        await runs.stop_all()
