"""Fleet mode: 100 different sleeping services woken at once, over 3 activators and 2
control planes. Each must be woken exactly once (one scale-up call each), every request
answered."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.etcd import EtcdServer
from tests.support.fake_kube import FakeKube
from tests.support.fleet import NS, Fleet, send
from tests.support.kube_objects import PORT, kube_service_yaml, model_deployment, model_service
from tests.support.net import wait_until
from torpor.workloads.annotations import RECORDED_REPLICAS

pytestmark = pytest.mark.envoy

SERVICES = 100
TINY_POD = Path(__file__).parents[1] / "support" / "tiny_pod.py"


def sleeping_deployment(name: str) -> dict[str, Any]:
    """A Deployment torpor put to sleep before (at 0, its count annotated): registered as
    HIBERNATED, no pod running. Its pod is tests/support/tiny_pod.py."""
    deployment = model_deployment(name, NS, replicas=0,
                                  annotations={RECORDED_REPLICAS: "1"})
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["command"] = [sys.executable, str(TINY_POD), "--host",
                            "$(POD_IP)", "--port", str(PORT), "--name", name]
    return deployment


@pytest.fixture
async def fleet(tmp_path: Path, etcd: EtcdServer, kube: FakeKube) -> AsyncIterator[Fleet]:
    names = [f"svc{i:03d}" for i in range(SERVICES)]
    for name in names:
        kube.create(sleeping_deployment(name))
        kube.create(model_service(name, NS))
    # A longer lease and wake timeout than the other fleet tests: five torpor processes,
    # etcd, Envoy, the fake API server and a hundred pods share two cores here.
    fleet = Fleet(tmp_path, etcd, kube, "".join(kube_service_yaml(n, NS) for n in names),
                  lease_ttl="6s", wake_timeout="150s")
    try:
        await fleet.start()
        yield fleet
    finally:
        problems = await fleet.stop()
    assert not problems, problems


async def test_100_sleeping_services_woken_at_once(fleet: Fleet) -> None:
    names = [f"svc{i:03d}" for i in range(SERVICES)]
    activators = fleet.activator_addresses()
    await wait_until(lambda: _all_on_activators(fleet, names, activators), 60,
                     "every service HIBERNATED and routed to the activators in Envoy")
    connector = aiohttp.TCPConnector(limit=0)
    started = asyncio.get_running_loop().time()
    async with aiohttp.ClientSession(connector=connector) as session:
        results = await asyncio.gather(*(
            send(session, fleet, f"{name}.localhost", "/hello", timeout=200)
            for name in names for _ in range(3)))
    took = asyncio.get_running_loop().time() - started
    codes = Counter(code for code, _, _ in results)
    scale_ups = {name: fleet.kube.count("patch", "deployments", "scale", name)
                 for name in names}
    print(f"\n{SERVICES} services x 3 requests at once: {dict(codes)} in {took:.1f}s; "
          f"scale-up calls per service: {dict(Counter(scale_ups.values()))}")
    ready = await asyncio.to_thread(_ready_slices, fleet.kube)
    print(f"pods running: {len(fleet.kube.pod_processes(NS))}, ready in EndpointSlices: "
          f"{ready}")
    assert codes == {200: 3 * SERVICES}
    for (_, body, _), name in zip(results, [n for n in names for _ in range(3)], strict=True):
        assert body == name.encode()
    assert set(scale_ups.values()) == {1}, scale_ups
    for name in names[:5]:
        await fleet.wait_state(name, "ACTIVE", 15)


async def _all_on_activators(fleet: Fleet, names: list[str], activators: set[str]) -> bool:
    assert fleet.envoy is not None
    hosts = await fleet.envoy.cluster_hosts()
    return all(hosts.get(name) == activators for name in names)


def _ready_slices(kube: FakeKube) -> int:
    from kubernetes import client

    slices = client.DiscoveryV1Api(kube.api_client()).list_namespaced_endpoint_slice(NS)
    return sum(1 for s in slices.items for e in (s.endpoints or []) if e.conditions.ready)
