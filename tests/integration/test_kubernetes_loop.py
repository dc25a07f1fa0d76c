"""The hibernate-and-wake loop with `workloads: {kind: kubernetes}`, end to end.

`torpor up` (real Envoy, the control plane, the activator) drives the fake API server
through the official client; the fake's kubelet runs each pod as a real model-server
process on its own loopback IP, and readiness reaches torpor through EndpointSlices.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.test_hibernate_wake import send, status, vhosts_in_envoy, wait_state
from tests.support.configs import write_config
from tests.support.fake_kube import FakeKube
from tests.support.kube_objects import kube_service_yaml, model_deployment, model_service
from tests.support.net import wait_until
from tests.support.up import Up, UpRuns
from torpor import admin_client
from torpor.config import Config, load_config
from torpor.credentials import admin_target
from torpor.workloads.annotations import RECORDED_REPLICAS

pytestmark = pytest.mark.envoy

NS = "models"
FAST_POLICY = ("policy: {kind: fixed, idle_after: 5s, evict_after: 12s, creation_grace: 0s, "
               "check_every: 250ms}")


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube() as fake:
        yield fake


@pytest.fixture
async def start_up(tmp_path: Path, kube: FakeKube
                   ) -> AsyncIterator[Callable[..., Awaitable[tuple[Up, Config]]]]:
    """start_up(services_yaml, extra=..., discover=...) runs `torpor up` on kubernetes
    workloads against the fake; always stopped."""
    runs = UpRuns()
    kube.write_kubeconfig(tmp_path / "kubeconfig")

    async def start(services: str, extra: str = "", discover: bool = False) -> tuple[Up, Config]:
        workloads = ("{kind: kubernetes, kubeconfig: ./kubeconfig, poll_every: 1s, "
                     f"discover: {str(discover).lower()}, namespaces: [{NS}]}}")
        path = write_config(tmp_path, services, extra, workloads=workloads)
        return await runs.start(path), load_config(path)

    yield start
    await runs.stop_all()


def replicas_of(kube: FakeKube, name: str) -> int:
    found = kube.get("apps/v1", "Deployment", NS, name)
    assert found is not None
    return int(found["spec"]["replicas"])


def annotation(kube: FakeKube, name: str) -> str | None:
    found = kube.get("apps/v1", "Deployment", NS, name) or {}
    return ((found.get("metadata") or {}).get("annotations") or {}).get(RECORDED_REPLICAS)


async def test_whole_loop_on_kubernetes_workloads(kube: FakeKube, start_up: Any) -> None:
    kube.create(model_deployment("sleepy", NS, replicas=2, load_seconds=2.0))
    kube.create(model_service("sleepy", NS))
    await asyncio.to_thread(kube.wait_for, lambda: len(kube.pod_processes(NS)) == 2)
    up, config = await start_up(kube_service_yaml("sleepy", NS), FAST_POLICY)
    async with aiohttp.ClientSession() as session:
        code, body, _ = await send(session, config, "sleepy.localhost", "/predict?text=good")
        assert code == 200, body

        # Idle → hibernated: the Deployment at 0 with its count annotated, no pod left.
        hibernated = await wait_state(config, "sleepy", "HIBERNATED", 30)
        assert hibernated["recorded_replicas"] == 2
        assert replicas_of(kube, "sleepy") == 0 and annotation(kube, "sleepy") == "2"
        await wait_until(lambda: not kube.pod_processes(NS), 15, "no pod process")
        assert "sleepy" in await vhosts_in_envoy(config)

        # 50 concurrent requests: held, one scale-up to the recorded 2, all answered.
        scale_patches = kube.count("patch", "deployments", "scale", "sleepy")
        bodies = [os.urandom(4096) if i % 2 else None for i in range(50)]
        results = await asyncio.gather(*(
            send(session, config, "sleepy.localhost", "/echo" if b else "/predict?text=nice",
                 b) for b in bodies))
        for (code, answer, _), sent in zip(results, bodies, strict=True):
            assert code == 200, answer[:300]
            if sent is not None:
                assert hashlib.sha256(answer).digest() == hashlib.sha256(sent).digest()
        cold = [int(h["x-torpor-cold-start-ms"]) for _, _, h in results
                if "x-torpor-cold-start-ms" in h]
        assert cold and max(cold) >= 1500, cold  # they waited for real pods to load
        assert kube.count("patch", "deployments", "scale", "sleepy") == scale_patches + 1

        awake = await wait_state(config, "sleepy", "ACTIVE", 10)
        assert replicas_of(kube, "sleepy") == 2
        await wait_until(lambda: annotation(kube, "sleepy") is None, 10, "annotation dropped")
        await wait_until(lambda: len(kube.pod_processes(NS)) == 2, 15, "2 pods")
        assert [h["to"] for h in awake["history"]][-4:] == ["HIBERNATING", "HIBERNATED",
                                                            "WAKING", "ACTIVE"]

        # Silent → evicted: the virtual host leaves Envoy; a request wakes it again.
        await wait_state(config, "sleepy", "EVICTED", 45)
        await wait_until(lambda: _vhost_gone(config), 10, "vhost removed")
        code, body, _ = await send(session, config, "sleepy.localhost", "/echo", b"again")
        assert code == 200 and body == b"again", body
        await wait_state(config, "sleepy", "ACTIVE", 10)
    del up


async def _vhost_gone(config: Config) -> bool:
    return "sleepy" not in await vhosts_in_envoy(config)


async def test_api_errors_leave_a_consistent_state(kube: FakeKube, start_up: Any) -> None:
    """403 on the scale subresource: `torpor hibernate` fails with the API's reason, the
    service stays ACTIVE on its running pods. 500s at a wake are retried and it succeeds."""
    kube.create(model_deployment("guarded", NS, replicas=1))
    kube.create(model_service("guarded", NS))
    _, config = await start_up(kube_service_yaml("guarded", NS))
    kube.inject(403, verb="patch", resource="deployments", subresource="scale", times=1)
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "assembly.cli", "hibernate", "guarded",
                         "--config", str(config.path)], capture_output=True, timeout=60)
    assert result.returncode != 0
    assert b"403" in result.stderr and b"Forbidden" in result.stderr, result.stderr
    after = status(config, "guarded")
    assert after["state"] == "ACTIVE" and replicas_of(kube, "guarded") == 1
    assert [h["to"] for h in after["history"]][-2:] == ["HIBERNATING", "ACTIVE"]
    async with aiohttp.ClientSession() as session:
        code, _, _ = await send(session, config, "guarded.localhost", "/predict")
        assert code == 200

        await asyncio.to_thread(admin_client.hibernate, admin_target(config),
                                "guarded")
        kube.inject(500, verb="patch", resource="deployments", subresource="scale", times=2)
        code, _, _ = await send(session, config, "guarded.localhost", "/predict")
        assert code == 200
    assert status(config, "guarded")["state"] == "ACTIVE"


async def test_discovery_and_a_lost_store(kube: FakeKube, start_up: Any,
                                          tmp_path: Path) -> None:
    """A labelled Deployment becomes a routed service without a restart; a bad annotation
    is reported by `torpor status` and changes nothing. After the store is lost, the
    Deployment's annotation brings a hibernated service back as HIBERNATED."""
    kube.create(model_deployment("found", NS, replicas=1))
    kube.create(model_service("found", NS))
    up, config = await start_up("  []", discover=True)
    assert status_names(config) == []

    kube.patch_object("apps/v1", "Deployment", NS, "found", {"metadata": {
        "labels": {"torpor.io/enabled": "true"},
        "annotations": {"torpor.io/host": "found.localhost"}}})
    await wait_until(lambda: status_names(config) == ["found"], 15, "found discovered")
    async with aiohttp.ClientSession() as session:
        async def answered() -> bool:
            return (await send(session, config, "found.localhost", "/predict"))[0] == 200
        await wait_until(answered, 20, "found served through Envoy")

    kube.patch_object("apps/v1", "Deployment", NS, "found", {"metadata": {
        "annotations": {"torpor.io/never-sleep": "maybe"}}})
    out: Any = None

    async def reported() -> bool:
        nonlocal out
        out = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "assembly.cli", "status", "--config",
                             str(config.path)], capture_output=True, timeout=30, text=True)
        return "torpor.io/never-sleep" in out.stdout
    await wait_until(reported, 15, "the bad annotation in torpor status")
    assert "problem: deployment models/found" in out.stdout
    metrics_text = await _get(f"http://{config.control_plane.metrics}/metrics")
    assert 'torpor_discovery_errors{deployment="found",namespace="models"} 1.0' in metrics_text
    assert status(config, "found")["state"] == "ACTIVE"  # the service is left as it was

    kube.patch_object("apps/v1", "Deployment", NS, "found", {"metadata": {
        "annotations": {"torpor.io/never-sleep": "false"}}})
    await wait_until(lambda: not admin_client.list_services(
        admin_target(config))[1], 15, "the problem cleared")
    await asyncio.to_thread(admin_client.hibernate, admin_target(config), "found")
    assert annotation(kube, "found") == "1"
    assert await up.stop() == 0
    (tmp_path / "state.db").unlink()  # the store is lost
    up.start()
    await up.wait_ready()
    again = status(config, "found")
    assert again["state"] == "HIBERNATED" and again["recorded_replicas"] == 1, again


def status_names(config: Config) -> list[str]:
    return [s["name"] for s in admin_client.list_statuses(admin_target(config))]


async def _get(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        return await r.text()
