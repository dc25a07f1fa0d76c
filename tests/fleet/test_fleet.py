"""Fleet mode end to end: 2 control planes and 3 activators on a real etcd, one real Envoy,
Kubernetes workloads on the fake API (real pod processes).

The promise under test: a sleeping service is woken exactly once however many activator
replicas hold its requests, and nothing is lost when one of them dies.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.etcd import EtcdServer
from tests.support.fake_kube import FakeKube
from tests.support.fleet import NS, Fleet, send
from tests.support.kube_objects import kube_service_yaml, model_deployment, model_service
from tests.support.net import wait_until
from torpor import admin_client

pytestmark = pytest.mark.envoy


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube() as fake:
        yield fake


@pytest.fixture
async def fleet(tmp_path: Path, etcd: EtcdServer, kube: FakeKube) -> AsyncIterator[Fleet]:
    kube.create(model_deployment("sleepy", NS, replicas=2, load_seconds=1.5))
    kube.create(model_service("sleepy", NS))
    await asyncio.to_thread(kube.wait_for, lambda: len(kube.pod_processes(NS)) == 2)
    fleet = Fleet(tmp_path, etcd, kube, kube_service_yaml("sleepy", NS, replicas=2))
    try:
        await fleet.start()
        yield fleet
    finally:
        problems = await fleet.stop()
    assert not problems, problems


async def hibernate(fleet: Fleet, name: str) -> None:
    """`torpor hibernate` through the first control plane; then wait until Envoy sends the
    service's traffic to every activator."""
    api = f"127.0.0.1:{fleet.ports(fleet.cp_configs[0])['api']}"
    await asyncio.to_thread(admin_client.hibernate, api, name, 60)
    await fleet.wait_state(name, "HIBERNATED", 30)
    await wait_until(lambda: _targets_activators(fleet, name), 15,
                     f"Envoy's {name} endpoints = every activator")
    await wait_until(lambda: not fleet.kube.pod_processes(NS), 15, "no pod process left")


async def _targets_activators(fleet: Fleet, name: str) -> bool:
    return await fleet.envoy_endpoints(name) == fleet.activator_addresses()


def scale_ups(kube: FakeKube, name: str) -> int:
    return kube.count("patch", "deployments", "scale", name)


async def test_300_requests_over_3_activators_wake_once(fleet: Fleet) -> None:
    assert await fleet.envoy_endpoints("torpor_activator") == fleet.activator_addresses()
    await hibernate(fleet, "sleepy")
    before = scale_ups(fleet.kube, "sleepy")
    held_before = await fleet.held_by_activator("sleepy")

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        bodies = [os.urandom(2048) if i % 3 == 0 else None for i in range(300)]
        results = await asyncio.gather(*(
            send(session, fleet, "sleepy.localhost", "/echo" if b else "/predict?text=hi", b)
            for b in bodies))

    codes = [code for code, _, _ in results]
    held = {k: v - held_before.get(k, 0) for k, v in (await fleet.held_by_activator(
        "sleepy")).items()}
    woke = scale_ups(fleet.kube, "sleepy") - before
    print(f"\n300 concurrent requests: {codes.count(200)} × 200, scale-up calls: {woke}, "
          f"held per activator: {held}, slowest {max(t for _, _, t in results):.2f}s")
    assert codes.count(200) == 300, sorted(set(codes))
    for (_, answer, _), sent in zip(results, bodies, strict=True):
        if sent is not None:
            assert answer == sent
    assert woke == 1
    assert all(count > 0 for count in held.values()) and len(held) == 3, held
    record = await fleet.wait_state("sleepy", "ACTIVE", 10)
    assert record["recorded_replicas"] == 2
