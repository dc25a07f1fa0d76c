"""Kubernetes workloads through the official client against the fake API server.

Every pod is a real model-server process started by the fake's kubelet; readiness comes
from that process's /healthz through EndpointSlices, as in a cluster.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.fake_kube import FakeKube
from tests.support.kube_objects import PORT, hpa, model_deployment, model_service
from tests.support.net import wait_until
from torpor import metrics
from torpor.catalog import ServiceCatalog
from torpor.config import KubernetesServiceConfig, ServiceConfig, WorkloadsConfig
from torpor.errors import WorkloadError
from torpor.workloads.annotations import RECORDED_MIN_REPLICAS, RECORDED_REPLICAS
from torpor.workloads.kubernetes import KubernetesWorkloads

NS = "models"


def service(name: str) -> ServiceConfig:
    return ServiceConfig(name=name, host=f"{name}.localhost",
                         kubernetes=KubernetesServiceConfig(NS, name, PORT))


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube(hpa_scale_to_zero=True) as fake:
        yield fake


def settings(kube: FakeKube, tmp_path: Path, discover: bool = False) -> WorkloadsConfig:
    return WorkloadsConfig(kind="kubernetes", kubeconfig=kube.write_kubeconfig(
        tmp_path / "kubeconfig"), discover=discover, poll_every=0.5)


@pytest.fixture
async def workloads(kube: FakeKube, tmp_path: Path) -> AsyncIterator[KubernetesWorkloads]:
    kube.create(model_deployment("echo", NS, replicas=2))
    kube.create(model_service("echo", NS))
    w = KubernetesWorkloads([service("echo")], settings(kube, tmp_path))
    await w.start()
    try:
        yield w
    finally:
        await w.close()


def deployment(kube: FakeKube, name: str = "echo") -> dict:  # type: ignore[type-arg]
    found = kube.get("apps/v1", "Deployment", NS, name)
    assert found is not None
    return found


def annotations(kube: FakeKube, name: str = "echo") -> dict[str, str]:
    return deployment(kube, name)["metadata"].get("annotations") or {}


async def healthz(host: str) -> int:
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://{host}:{PORT}/healthz") as response:
        return response.status


async def test_hibernate_annotates_and_scales_to_zero_and_wake_restores(
        kube: FakeKube, workloads: KubernetesWorkloads) -> None:
    ready = await workloads.wait_ready("echo", 2, 20)
    assert len({e.host for e in ready}) == 2 and {e.port for e in ready} == {PORT}
    assert [await healthz(e.host) for e in ready] == [200, 200]  # real processes
    assert workloads.desired_replicas("echo") == 2
    assert len(kube.pod_processes(NS)) == 2

    await workloads.scale("echo", 0)
    assert deployment(kube)["spec"]["replicas"] == 0
    assert annotations(kube)[RECORDED_REPLICAS] == "2"
    await wait_until(lambda: not kube.pod_processes(NS), 15, "pod processes to stop")
    await wait_until(lambda: workloads.ready_endpoints("echo") == (), 10, "no endpoint")
    await wait_until(lambda: workloads.recorded_replicas("echo") == 2, 5, "recorded count")

    await workloads.scale("echo", 2)
    woken = await workloads.wait_ready("echo", 2, 20)
    assert len(woken) == 2 and len(kube.pod_processes(NS)) == 2
    assert RECORDED_REPLICAS not in annotations(kube)
    await wait_until(lambda: workloads.recorded_replicas("echo") is None, 5, "no record")


async def test_ready_endpoints_follow_the_endpoint_slices(
        kube: FakeKube, workloads: KubernetesWorkloads) -> None:
    changes: list[int] = []
    workloads.add_listener(lambda name, endpoints: changes.append(len(endpoints)))
    await workloads.wait_ready("echo", 2, 20)
    kube.patch_object("apps/v1", "Deployment", NS, "echo", {"spec": {"replicas": 3}})
    await workloads.wait_ready("echo", 3, 20)
    assert changes[-1] == 3
    with pytest.raises(TimeoutError, match="EndpointSlices of models/echo: 3 of 4 ready"):
        await workloads.wait_ready("echo", 4, 0.5)


async def test_an_expired_watch_resyncs(kube: FakeKube,
                                        workloads: KubernetesWorkloads) -> None:
    await workloads.wait_ready("echo", 2, 20)
    expired = metrics.KUBERNETES_WATCH_RESTARTS.labels("endpointslices/models", "expired")
    before = expired._value.get()
    kube.expire_watches()
    await wait_until(lambda: expired._value.get() > before, 10, "a resync after 410 Gone")
    # Changes made after the expiry still arrive: the reflector listed and watched again.
    kube.patch_object("apps/v1", "Deployment", NS, "echo", {"spec": {"replicas": 1}})
    await wait_until(lambda: len(workloads.ready_endpoints("echo")) == 1, 20, "1 endpoint")
    assert workloads.desired_replicas("echo") == 1


async def test_forbidden_is_a_clear_error_and_changes_nothing(
        kube: FakeKube, workloads: KubernetesWorkloads) -> None:
    await workloads.wait_ready("echo", 2, 20)
    kube.inject(403, verb="patch", resource="deployments", subresource="scale")
    with pytest.raises(WorkloadError, match=r"403.*Forbidden.*RBAC") as caught:
        await workloads.scale("echo", 0)
    assert "patch deployments/scale models/echo" in str(caught.value)
    assert kube.count("patch", "deployments", "scale", "echo") == 1  # not retried
    assert deployment(kube)["spec"]["replicas"] == 2
    assert workloads.recorded_replicas("echo") is None  # running: no record to restore
    assert len(kube.pod_processes(NS)) == 2


async def test_conflicts_and_server_errors_are_retried_with_backoff(
        kube: FakeKube, workloads: KubernetesWorkloads) -> None:
    await workloads.wait_ready("echo", 2, 20)
    kube.inject(409, verb="patch", resource="deployments", subresource=None, name="echo")
    kube.inject(500, verb="patch", resource="deployments", subresource="scale", times=2)
    await workloads.scale("echo", 0)
    assert kube.count("patch", "deployments", "scale", "echo") == 3
    assert deployment(kube)["spec"]["replicas"] == 0
    assert annotations(kube)[RECORDED_REPLICAS] == "2"


async def test_errors_that_do_not_pass_give_up_after_the_attempts(
        kube: FakeKube, workloads: KubernetesWorkloads) -> None:
    await workloads.wait_ready("echo", 2, 20)
    kube.inject(500, verb="patch", resource="deployments", subresource="scale", times=50)
    with pytest.raises(WorkloadError, match=r"after 5 attempts: 500"):
        await workloads.scale("echo", 1)
    assert deployment(kube)["spec"]["replicas"] == 2


async def test_hpa_min_zero_is_set_aside_while_hibernated(
        kube: FakeKube, workloads: KubernetesWorkloads) -> None:
    """An HPA with minReplicas 0 would scale the hibernated Deployment back up on its own
    metrics (desired 2 here); torpor sets minReplicas to 1 while it sleeps (the HPA then
    stands still, ScalingDisabled) and gives 0 back at the wake."""
    kube.create(hpa("echo", NS, "echo", min_replicas=0, max_replicas=4, desired=2))
    await wait_until(lambda: workloads._hpa is not None and
                     workloads._hpa.find(NS, "echo") == "echo", 10, "the HPA seen")
    await workloads.scale("echo", 0)
    found = kube.get("autoscaling/v2", "HorizontalPodAutoscaler", NS, "echo")
    assert found is not None
    assert found["spec"]["minReplicas"] == 1
    assert found["metadata"]["annotations"][RECORDED_MIN_REPLICAS] == "0"
    await wait_until(lambda: _hpa_disabled(kube), 10, "HPA condition ScalingDisabled")
    await asyncio.sleep(1.5)  # a control check: the fake HPA runs every second
    assert deployment(kube)["spec"]["replicas"] == 0

    await workloads.scale("echo", 2)
    restored = kube.get("autoscaling/v2", "HorizontalPodAutoscaler", NS, "echo")
    assert restored is not None and restored["spec"]["minReplicas"] == 0
    assert RECORDED_MIN_REPLICAS not in (restored["metadata"].get("annotations") or {})
    await workloads.wait_ready("echo", 2, 20)


async def test_hpa_bounds_apply_to_the_restored_count(
        kube: FakeKube, workloads: KubernetesWorkloads) -> None:
    """Recorded 2, but the HPA's minReplicas was raised to 3 while it slept: the wake
    scales straight to 3 (where the HPA would move it), in one step."""
    kube.create(hpa("echo", NS, "echo", min_replicas=1, max_replicas=5))
    await wait_until(lambda: workloads._hpa is not None and
                     workloads._hpa.find(NS, "echo") == "echo", 10, "the HPA seen")
    await workloads.scale("echo", 0)
    kube.patch_object("autoscaling/v2", "HorizontalPodAutoscaler", NS, "echo",
                      {"spec": {"minReplicas": 3}})
    await workloads.scale("echo", 2)
    assert deployment(kube)["spec"]["replicas"] == 3
    await workloads.wait_ready("echo", 3, 20)


def _hpa_disabled(kube: FakeKube) -> bool:
    found = kube.get("autoscaling/v2", "HorizontalPodAutoscaler", NS, "echo") or {}
    conditions = (found.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "ScalingActive" and c.get("reason") == "ScalingDisabled"
               for c in conditions)


async def test_discovery_adds_updates_rejects_and_removes(kube: FakeKube,
                                                           tmp_path: Path) -> None:
    kube.create(model_deployment("plain", NS, replicas=1))
    kube.create(model_deployment("labelled", NS, replicas=1,
                                 labels={"torpor.io/enabled": "true"},
                                 annotations={"torpor.io/host": "labelled.example",
                                              "torpor.io/idle-after": "10m"}))
    catalog = ServiceCatalog()
    workloads = KubernetesWorkloads([], settings(kube, tmp_path, discover=True))
    await workloads.start()
    discovery = await workloads.discover(catalog)
    assert discovery is not None
    try:
        found = catalog.get("labelled")
        assert found is not None and "plain" not in catalog
        assert found.host == "labelled.example" and found.policy.idle_after == 600
        assert workloads.desired_replicas("labelled") == 1

        # Labelling a Deployment makes it a service, without a restart.
        kube.patch_object("apps/v1", "Deployment", NS, "plain",
                          {"metadata": {"labels": {"torpor.io/enabled": "true"}}})
        await wait_until(lambda: "plain" in catalog, 10, "plain discovered")

        # A bad annotation is reported and changes nothing.
        kube.patch_object("apps/v1", "Deployment", NS, "labelled", {"metadata": {
            "annotations": {"torpor.io/idle-after": "ten minutes", "torpor.io/hots": "x"}}})
        await wait_until(lambda: bool(discovery.problems()), 10, "the problem reported")
        problem = discovery.problems()[0]
        assert "torpor.io/idle-after" in problem and "torpor.io/hots" in problem, problem
        assert catalog.get("labelled") == found
        gauge = metrics.DISCOVERY_ERRORS.labels(namespace=NS, deployment="labelled")
        assert gauge._value.get() == 1

        # Fixed: the new value applies and the problem clears.
        kube.patch_object("apps/v1", "Deployment", NS, "labelled", {"metadata": {
            "annotations": {"torpor.io/idle-after": "20m", "torpor.io/hots": None}}})
        await wait_until(lambda: not discovery.problems(), 10, "the problem cleared")
        updated = catalog.get("labelled")
        assert updated == dataclasses.replace(
            found, policy=dataclasses.replace(found.policy, idle_after=1200.0))

        # A host taken by another service is a clash: reported, nothing changes.
        kube.patch_object("apps/v1", "Deployment", NS, "plain", {"metadata": {
            "annotations": {"torpor.io/host": "labelled.example"}}})
        await wait_until(lambda: bool(discovery.problems()), 10, "the clash reported")
        assert "already used" in discovery.problems()[0]
        assert catalog.get("plain") is not None
        assert catalog.get("plain").host == "plain.models"  # type: ignore[union-attr]

        # Unlabelled: the service leaves the catalog.
        kube.patch_object("apps/v1", "Deployment", NS, "plain",
                          {"metadata": {"labels": {"torpor.io/enabled": None}}})
        await wait_until(lambda: "plain" not in catalog, 10, "plain removed")
        assert not discovery.problems()
    finally:
        await discovery.stop()
        await workloads.close()
