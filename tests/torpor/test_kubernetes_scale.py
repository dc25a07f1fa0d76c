"""Kubernetes at scale: with 10,000 Deployments (and as many EndpointSlices) in one
namespace, an event about one Deployment or one EndpointSlice costs work for that service
only. The official client runs unchanged against the fake API server; no pod runs (the
Deployments are at zero, the slices are written directly)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_kube import FakeKube
from tests.support.kube_objects import PORT, model_deployment
from tests.support.net import wait_until
from torpor.catalog import ServiceCatalog
from torpor.config import WorkloadsConfig
from torpor.model import Endpoint
from torpor.workloads import discovery, kubernetes
from torpor.workloads.kubernetes import KubernetesWorkloads

NS = "models"
SERVICES = 10_000


def name(i: int) -> str:
    return f"m{i:05d}"


def address(i: int) -> str:
    return f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"


def endpoint_slice(i: int, ready: bool = True) -> dict[str, Any]:
    """The EndpointSlice of Service `name(i)`, one endpoint (as the endpoint controller
    writes it)."""
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{name(i)}-abcde", "namespace": NS,
                     "labels": {"kubernetes.io/service-name": name(i)}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
        "endpoints": [{"addresses": [address(i)], "conditions": {"ready": ready}}],
    }


@pytest.fixture(scope="module")
def kube() -> Iterator[FakeKube]:
    with FakeKube() as fake:
        fake.create_many([
            model_deployment(name(i), NS, replicas=0, labels={"torpor.io/enabled": "true"})
            for i in range(SERVICES)])
        fake.create_many([endpoint_slice(i) for i in range(SERVICES)])
        yield fake


class Counted:
    """Wraps a function and counts the service each call was about."""

    def __init__(self, fn: Any, about: Any) -> None:
        self.fn, self.about, self.calls = fn, about, Counter[str]()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls[self.about(*args)] += 1
        return self.fn(*args, **kwargs)


async def test_one_event_costs_work_for_its_own_service_only(
    kube: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    fingerprints = Counted(discovery.fingerprint,
                           lambda d: d["metadata"]["name"])
    readiness = Counted(kubernetes.ready_endpoints, lambda slices, service, port: service)
    monkeypatch.setattr(discovery, "fingerprint", fingerprints)
    monkeypatch.setattr(kubernetes, "ready_endpoints", readiness)
    catalog = ServiceCatalog()
    settings = WorkloadsConfig(kind="kubernetes", discover=True, poll_every=0.5,
                               kubeconfig=kube.write_kubeconfig(tmp_path / "kubeconfig"))
    workloads = KubernetesWorkloads([], settings)
    started = time.monotonic()
    await workloads.start()
    found = await workloads.discover(catalog)
    assert found is not None
    try:
        await wait_until(lambda: len(catalog.services()) == SERVICES, 60, "every service")
        await wait_until(lambda: all(workloads.ready_endpoints(name(i))
                                     for i in (0, SERVICES - 1)), 30, "endpoints known")
        synced = time.monotonic() - started
        assert workloads.ready_endpoints(name(42)) == (Endpoint(address(42), PORT),)

        # One EndpointSlice changes: only its service's endpoints are recomputed.
        fingerprints.calls.clear()
        readiness.calls.clear()
        before = time.monotonic()
        kube.patch_object("discovery.k8s.io/v1", "EndpointSlice", NS, f"{name(42)}-abcde",
                          {"endpoints": endpoint_slice(42, ready=False)["endpoints"]})
        await wait_until(lambda: workloads.ready_endpoints(name(42)) == (), 10,
                         "the slice's change seen")
        slice_seconds = time.monotonic() - before
        assert set(readiness.calls) == {name(42)}
        assert not fingerprints.calls

        # One Deployment's annotation changes: only that Deployment is looked at.
        readiness.calls.clear()
        before = time.monotonic()
        kube.patch_object("apps/v1", "Deployment", NS, name(7),
                          {"metadata": {"annotations": {"torpor.io/idle-after": "5m"}}})

        def updated() -> bool:
            service = catalog.get(name(7))
            return service is not None and service.policy.idle_after == 300.0

        await wait_until(updated, 10, "the annotation's change seen")
        deployment_seconds = time.monotonic() - before
        assert set(fingerprints.calls) == {name(7)}
        assert set(readiness.calls) <= {name(7)}
        print(f"\n{SERVICES} Deployments + slices: discovered and synced in {synced:.1f} s; "
              f"one slice change seen in {slice_seconds * 1000:.0f} ms, one annotation "
              f"change in {deployment_seconds * 1000:.0f} ms (the fake API's own pass over "
              f"every Deployment included)")
    finally:
        await found.stop()
        await workloads.close()
