"""The fake Kubernetes API, seen only through the official client (as torpor's workloads see it).

Each test starts and stops its own FakeKube; conditions are awaited with deadlines.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from tests.support.fake_kube import DESIRED_ANNOTATION, FakeKube

NS = "ns1"
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]
STUBBORN = [sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"]


def deployment(name: str, replicas: int, command: list[str] | None = None,
               probe: bool = False) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": "example:test"}
    if command is not None:
        container["command"] = command
    if probe:
        container.update(
            command=[sys.executable, "-m", "torpor.examples.model_server"],
            args=["--host", "$(POD_IP)", "--port", "8080", "--load-seconds", "0.3"],
            env=[{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
            ports=[{"name": "http", "containerPort": 8080}],
            readinessProbe={"httpGet": {"path": "/healthz", "port": 8080}})
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"terminationGracePeriodSeconds": 2,
                                           "containers": [container]}}}}


def hpa(name: str, target: str, low: int, high: int, desired: int | None = None) -> dict[str, Any]:
    annotations = {} if desired is None else {DESIRED_ANNOTATION: str(desired)}
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": name, "namespace": NS, "annotations": annotations},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                        "name": target},
                     "minReplicas": low, "maxReplicas": high}}


@pytest.fixture
def make_fake() -> Iterator[Callable[..., FakeKube]]:
    """Started fakes, each stopped at the end whatever happened."""
    started: list[FakeKube] = []

    def make(**options: Any) -> FakeKube:
        fake = FakeKube(**options)
        started.append(fake)
        fake.start()
        return fake

    try:
        yield make
    finally:
        for fake in started:
            fake.stop()


@pytest.fixture
def fake(make_fake: Callable[..., FakeKube]) -> FakeKube:
    return make_fake()


def http_get(url: str) -> int:
    """Straight to the pod, never through a proxy from the environment."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


def raw(fake: FakeKube, method: str, path: str, body: bytes | None = None,
        content_type: str = "application/json") -> tuple[int, dict[str, Any]]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(fake.url + path, data=body, method=method,
                                     headers={"Content-Type": content_type})
    try:
        with opener.open(request, timeout=5) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def slice_endpoints(discovery: client.DiscoveryV1Api, service: str) -> list[Any]:
    found = discovery.list_namespaced_endpoint_slice(
        NS, label_selector=f"kubernetes.io/service-name={service}").items
    return [e for s in found for e in s.endpoints or []]


def status_body(err: ApiException) -> dict[str, Any]:
    body = json.loads(err.body)
    assert body["kind"] == "Status" and body["apiVersion"] == "v1"
    assert body["status"] == "Failure" and body["code"] == err.status
    return dict(body)


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# ---------------------------------------------------------------------------------------


def test_pods_run_as_processes_behind_endpoint_slices(fake: FakeKube, tmp_path: Path) -> None:
    configuration = client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(fake.write_kubeconfig(
        tmp_path / "kubeconfig", NS)), client_configuration=configuration)
    api = client.ApiClient(configuration)
    apps, core, discovery = client.AppsV1Api(api), client.CoreV1Api(api), client.DiscoveryV1Api(api)
    apps.create_namespaced_deployment(NS, deployment("web", 2, probe=True))
    core.create_namespaced_service(NS, {"metadata": {"name": "web"}, "spec": {
        "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})

    fake.wait_for(lambda: len(fake.pod_processes(NS)) == 2, what="2 pod processes")
    fake.wait_for(lambda: sum(e.conditions.ready for e in slice_endpoints(discovery, "web")) == 2,
                  what="2 ready endpoints")
    slices = discovery.list_namespaced_endpoint_slice(NS).items
    assert len(slices) == 1 and slices[0].address_type == "IPv4"
    assert slices[0].metadata.owner_references[0].kind == "Service"
    assert [(p.name, p.port, p.protocol) for p in slices[0].ports] == [("http", 8080, "TCP")]
    addresses = [e.addresses[0] for e in slices[0].endpoints]
    assert len(set(addresses)) == 2 and all(a.startswith("127.") for a in addresses)
    for address in addresses:
        assert http_get(f"http://{address}:8080/healthz") == 200
    pods = core.list_namespaced_pod(NS, label_selector="app=web").items
    assert {p.status.pod_ip for p in pods} == set(addresses)
    assert all(p.status.phase == "Running" and p.status.container_statuses[0].ready for p in pods)
    assert all(p.metadata.name.startswith("web-") and p.metadata.labels["pod-template-hash"]
               for p in pods)
    status = apps.read_namespaced_deployment("web", NS).status
    assert (status.ready_replicas, status.available_replicas, status.observed_generation) == (
        2, 2, 1)


def test_scale_to_zero_and_back(fake: FakeKube) -> None:
    api = fake.api_client()
    apps, discovery = client.AppsV1Api(api), client.DiscoveryV1Api(api)
    apps.create_namespaced_deployment(NS, deployment("web", 1, probe=True))
    client.CoreV1Api(api).create_namespaced_service(NS, {"metadata": {"name": "web"}, "spec": {
        "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}})
    fake.wait_for(lambda: any(e.conditions.ready for e in slice_endpoints(discovery, "web")))
    pids = list(fake.pod_processes(NS).values())

    apps.patch_namespaced_deployment_scale("web", NS, {"spec": {"replicas": 0}})
    fake.wait_for(lambda: all(pid_gone(p) for p in pids) and not fake.pod_processes(NS))
    fake.wait_for(lambda: not slice_endpoints(discovery, "web"), what="an empty slice")
    scale = apps.read_namespaced_deployment_scale("web", NS)
    assert scale.spec.replicas is None  # ScaleSpec.replicas is omitempty: 0 is left out
    assert scale.status.selector == "app=web"
    assert not client.CoreV1Api(api).list_namespaced_pod(NS).items

    apps.patch_namespaced_deployment_scale("web", NS, {"spec": {"replicas": 1}})
    fake.wait_for(lambda: any(e.conditions.ready for e in slice_endpoints(discovery, "web")))
    assert apps.read_namespaced_deployment_scale("web", NS).spec.replicas == 1
    assert fake.count("patch", "deployments", "scale", "web") == 2

    client.CoreV1Api(api).delete_namespaced_service("web", NS)  # its slice is collected
    fake.wait_for(lambda: not discovery.list_namespaced_endpoint_slice(NS).items)
    apps.delete_namespaced_deployment("web", NS)  # and so are its pods
    fake.wait_for(lambda: not client.CoreV1Api(api).list_namespaced_pod(NS).items)
    assert not fake.pod_processes()


def _consume(stream: Iterator[dict[str, Any]], into: queue.Queue[Any]) -> threading.Thread:
    def run() -> None:
        try:
            for event in stream:
                into.put(event)
        except ApiException as err:
            into.put(err)
        into.put("end")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_watch_then_expiry_then_relist(fake: FakeKube) -> None:
    apps = client.AppsV1Api(fake.api_client())
    apps.create_namespaced_deployment(NS, deployment("w", 0))
    rv = apps.list_namespaced_deployment(NS).metadata.resource_version
    events: queue.Queue[Any] = queue.Queue()
    # No timeout_seconds: the client retries a 410 once from its last RV, then raises.
    _consume(watch.Watch().stream(apps.list_namespaced_deployment, NS, resource_version=rv),
             events)
    apps.patch_namespaced_deployment("w", NS, {"metadata": {"labels": {"seen": "yes"}}})
    event = events.get(timeout=10)
    assert event["type"] == "MODIFIED" and event["object"].metadata.labels == {"seen": "yes"}
    assert event["raw_object"]["kind"] == "Deployment"

    fake.expire_watches()
    err = events.get(timeout=10)
    assert isinstance(err, ApiException) and err.status == 410
    assert err.reason.startswith("Expired: too old resource version")
    assert fake.count("watch", "deployments") == 2  # the first watch and the client's retry

    with pytest.raises(ApiException) as stale:  # with timeout_seconds: no retry at all
        next(iter(watch.Watch().stream(apps.list_namespaced_deployment, NS, resource_version=rv,
                                       timeout_seconds=5)))
    assert stale.value.status == 410

    listed = apps.list_namespaced_deployment(NS)
    assert [d.metadata.name for d in listed.items] == ["w"]
    again: queue.Queue[Any] = queue.Queue()
    _consume(watch.Watch().stream(apps.list_namespaced_deployment, NS, timeout_seconds=2,
                                  allow_watch_bookmarks=True,
                                  resource_version=listed.metadata.resource_version), again)
    apps.patch_namespaced_deployment_scale("w", NS, {"spec": {"replicas": 0}})  # a no-op
    apps.delete_namespaced_deployment("w", NS)
    deleted = again.get(timeout=10)
    assert deleted["type"] == "DELETED" and deleted["object"].metadata.name == "w"
    assert int(deleted["object"].metadata.resource_version) > int(
        listed.metadata.resource_version)
    assert again.get(timeout=10)["type"] == "BOOKMARK"  # when the stream times out
    assert again.get(timeout=10) == "end"


def test_synthetic_added_events_and_selectors(fake: FakeKube) -> None:
    apps = client.AppsV1Api(fake.api_client())
    for name, tier in (("a", "web"), ("b", "batch"), ("c", "web")):
        body = deployment(name, 0)
        body["metadata"]["labels"] = {"tier": tier}
        apps.create_namespaced_deployment(NS, body)
    listed = apps.list_namespaced_deployment(NS, label_selector="tier in (web),tier!=batch")
    assert [d.metadata.name for d in listed.items] == ["a", "c"]
    assert [d.metadata.name for d in apps.list_deployment_for_all_namespaces(
        field_selector="metadata.name=b").items] == ["b"]
    stream = watch.Watch().stream(apps.list_namespaced_deployment, NS, label_selector="tier=web",
                                  timeout_seconds=1)
    assert [(e["type"], e["object"].metadata.name) for e in stream] == [("ADDED", "a"),
                                                                        ("ADDED", "c")]


def test_errors_look_like_the_real_api(fake: FakeKube) -> None:
    apps = client.AppsV1Api(fake.api_client())
    created = apps.create_namespaced_deployment(NS, deployment("e", 1))

    fake.inject(403, verb="patch", resource="deployments", subresource="scale")
    with pytest.raises(ApiException) as forbidden:
        apps.patch_namespaced_deployment_scale("e", NS, {"spec": {"replicas": 0}})
    assert (forbidden.value.status, forbidden.value.reason) == (403, "Forbidden")
    body = status_body(forbidden.value)
    assert body["reason"] == "Forbidden" and 'cannot patch resource "deployments/scale"' in (
        body["message"])
    assert apps.patch_namespaced_deployment_scale("e", NS, {"spec": {"replicas": 0}})  # once

    apps.patch_namespaced_deployment("e", NS, {"metadata": {"labels": {"moved": "on"}}})
    conflict = 'Operation cannot be fulfilled on deployments.apps "e": the object has been modified'
    with pytest.raises(ApiException) as stale:
        apps.replace_namespaced_deployment("e", NS, created)
    assert stale.value.status == 409 and status_body(stale.value)["reason"] == "Conflict"
    assert status_body(stale.value)["message"].startswith(conflict)
    scale = apps.read_namespaced_deployment_scale("e", NS)
    scale.metadata.resource_version = created.metadata.resource_version
    with pytest.raises(ApiException) as stale_scale:
        apps.replace_namespaced_deployment_scale("e", NS, scale)
    assert stale_scale.value.status == 409
    with pytest.raises(ApiException) as stale_patch:
        apps.patch_namespaced_deployment("e", NS, {"metadata": {
            "resourceVersion": created.metadata.resource_version, "labels": {"x": "y"}}})
    assert stale_patch.value.status == 409

    fake.inject(500, verb="get", resource="deployments", name="e")
    with pytest.raises(ApiException) as internal:
        apps.read_namespaced_deployment("e", NS)
    assert internal.value.status == 500 and status_body(internal.value)["reason"] == (
        "InternalError")

    with pytest.raises(ApiException) as negative:
        apps.patch_namespaced_deployment_scale("e", NS, {"spec": {"replicas": -1}})
    assert negative.value.status == 422 and status_body(negative.value)["message"] == (
        'Scale.autoscaling "e" is invalid: spec.replicas: Invalid value: -1:'
        " must be greater than or equal to 0")
    with pytest.raises(ApiException) as invalid:
        apps.create_namespaced_deployment(NS, {**deployment("neg", 0), "spec": {
            **deployment("neg", 0)["spec"], "replicas": -1}})
    assert status_body(invalid.value)["message"] == (
        'Deployment.apps "neg" is invalid: spec.replicas: Invalid value: -1:'
        " must be greater than or equal to 0")
    assert status_body(invalid.value)["reason"] == "Invalid"

    with pytest.raises(ApiException) as missing:
        apps.read_namespaced_deployment("nope", NS)
    assert status_body(missing.value) == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'deployments.apps "nope" not found', "reason": "NotFound",
        "details": {"name": "nope", "group": "apps", "kind": "deployments"}, "code": 404}
    with pytest.raises(ApiException) as exists:
        apps.create_namespaced_deployment(NS, deployment("e", 1))
    assert status_body(exists.value)["reason"] == "AlreadyExists"

    code, body = raw(fake, "GET", "/apis/nothing/v1/things")
    assert (code, body["reason"], body["message"]) == (
        404, "NotFound", "the server could not find the requested resource")
    assert raw(fake, "PUT", f"/apis/apps/v1/namespaces/{NS}/deployments", b"{}")[0] == 405
    assert raw(fake, "PATCH", f"/apis/apps/v1/namespaces/{NS}/deployments/e", b"{}",
               "text/plain")[1]["reason"] == "UnsupportedMediaType"
    annotated = deployment("notes", 0)
    annotated["metadata"]["annotations"] = {"n": 1}
    code, body = raw(fake, "POST", f"/apis/apps/v1/namespaces/{NS}/deployments",
                     json.dumps(annotated).encode())
    assert (code, body["reason"]) == (400, "BadRequest")


def test_merge_strategic_and_json_patches(fake: FakeKube) -> None:
    api = fake.api_client()
    apps = client.AppsV1Api(api)
    apps.create_namespaced_deployment(NS, deployment("p", 0, command=SLEEPER))

    apps.patch_namespaced_deployment("p", NS, {"metadata": {"annotations": {"a": "1", "b": "2"}},
                                               "spec": {"template": {"spec": {"containers": [
                                                   {"name": "main", "image": "other:2"}]}}}})
    sent = [r for r in fake.requests if r.verb == "patch"][-1]
    assert sent.content_type == "application/strategic-merge-patch+json"  # the client's default
    patched = apps.read_namespaced_deployment("p", NS)
    assert patched.metadata.annotations == {"a": "1", "b": "2"}
    container = patched.spec.template.spec.containers[0]
    assert (container.image, container.command) == ("other:2", SLEEPER)  # merged by name

    apps.patch_namespaced_deployment("p", NS, {"metadata": {"annotations": {"a": None}}},
                                     _content_type="application/merge-patch+json")
    assert [r for r in fake.requests if r.verb == "patch"][-1].content_type == (
        "application/merge-patch+json")
    assert apps.read_namespaced_deployment("p", NS).metadata.annotations == {"b": "2"}
    apps.patch_namespaced_deployment("p", NS, {"metadata": {"annotations": {"b": None}}})
    assert not apps.read_namespaced_deployment("p", NS).metadata.annotations

    ops = [{"op": "test", "path": "/spec/replicas", "value": 0},
           {"op": "replace", "path": "/spec/replicas", "value": 1},
           {"op": "add", "path": "/metadata/annotations", "value": {"c/d": "3"}},
           {"op": "remove", "path": "/metadata/annotations/c~1d"}]
    result = apps.patch_namespaced_deployment("p", NS, ops)
    assert [r for r in fake.requests if r.verb == "patch"][-1].content_type == (
        "application/json-patch+json")
    assert result.spec.replicas == 1 and result.metadata.annotations is None
    assert result.metadata.generation == 3  # the image and the replicas were spec changes
    with pytest.raises(ApiException) as failed:
        apps.patch_namespaced_deployment("p", NS, [{"op": "test", "path": "/spec/replicas",
                                                    "value": 7}])
    assert failed.value.status == 422 and status_body(failed.value)["reason"] == "Invalid"
    with pytest.raises(ApiException) as unsupported:
        apps.patch_namespaced_deployment("p", NS, {"spec": {"replicas": 2}},
                                         _content_type="application/apply-patch+yaml")
    assert unsupported.value.status == 415


def test_hpa_follows_upstream_rules(make_fake: Callable[..., FakeKube]) -> None:
    fake = make_fake()
    api = fake.api_client()
    apps, autoscaling = client.AppsV1Api(api), client.AutoscalingV2Api(api)
    apps.create_namespaced_deployment(NS, deployment("h", 1, command=SLEEPER))
    autoscaling.create_namespaced_horizontal_pod_autoscaler(NS, hpa("h", "h", 2, 5))
    fake.wait_for(lambda: apps.read_namespaced_deployment("h", NS).spec.replicas == 2)
    fake.wait_for(lambda: len(fake.pod_processes(NS)) == 2)

    apps.patch_namespaced_deployment_scale("h", NS, {"spec": {"replicas": 0}})

    def disabled() -> bool:
        found = autoscaling.read_namespaced_horizontal_pod_autoscaler("h", NS)
        return any((c.type, c.status, c.reason) == ("ScalingActive", "False", "ScalingDisabled")
                   for c in found.status.conditions or [])

    fake.wait_for(disabled)
    assert apps.read_namespaced_deployment("h", NS).spec.replicas == 0
    with pytest.raises(ApiException) as gated:
        autoscaling.create_namespaced_horizontal_pod_autoscaler(NS, hpa("z", "h", 0, 3))
    assert status_body(gated.value)["message"] == (
        'HorizontalPodAutoscaler.autoscaling "z" is invalid: spec.minReplicas: Invalid value: 0:'
        " must be greater than or equal to 1")
    with pytest.raises(ApiException) as inverted:
        autoscaling.create_namespaced_horizontal_pod_autoscaler(NS, hpa("z", "h", 3, 2))
    assert inverted.value.status == 422

    zero = make_fake(hpa_scale_to_zero=True)
    apps = client.AppsV1Api(zero.api_client())
    apps.create_namespaced_deployment(NS, deployment("s", 0))
    zero.create(hpa("s", "s", 0, 3, desired=2))
    zero.wait_for(lambda: apps.read_namespaced_deployment("s", NS).spec.replicas == 2)
    status = zero.get("autoscaling/v2", "HorizontalPodAutoscaler", NS, "s")["status"]
    assert status["desiredReplicas"] == 2 and "lastScaleTime" in status
    zero.patch_object("autoscaling/v2", "HorizontalPodAutoscaler", NS, "s",
                      {"metadata": {"annotations": {DESIRED_ANNOTATION: "0"}}})
    zero.wait_for(lambda: apps.read_namespaced_deployment("s", NS).spec.replicas == 0)


def test_an_exiting_process_is_restarted(fake: FakeKube) -> None:
    core = client.CoreV1Api(fake.api_client())
    fake.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "brief", "namespace": NS},
                 "spec": {"containers": [{"name": "main", "image": "x", "command": [
                     sys.executable, "-c", "import time; time.sleep(0.3)"]}]}})

    def restarted() -> bool:
        found = core.read_namespaced_pod("brief", NS).status.container_statuses
        return bool(found) and found[0].restart_count >= 1 and found[0].last_state.terminated

    fake.wait_for(restarted)
    status = core.read_namespaced_pod("brief", NS).status
    assert status.phase == "Running"
    assert status.container_statuses[0].last_state.terminated.exit_code == 0
    assert (fake.log_dir / f"{NS}_brief.log").exists()


def test_graceful_deletion_and_stop_leave_no_process(make_fake: Callable[..., FakeKube]) -> None:
    fake = make_fake()
    core = client.CoreV1Api(fake.api_client())
    fake.create(deployment("sleepy", 2, command=SLEEPER))
    for name in ("stubborn", "holdout"):
        fake.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS},
                     "spec": {"terminationGracePeriodSeconds": 1,
                              "containers": [{"name": "main", "image": "x", "command": STUBBORN}]}})
    fake.wait_for(lambda: len(fake.pod_processes(NS)) == 4)
    pids = fake.pod_processes(NS)

    started = time.monotonic()
    deleted = core.delete_namespaced_pod("stubborn", NS)
    assert deleted.metadata.deletion_timestamp is not None  # still there, terminating
    assert core.read_namespaced_pod("stubborn", NS).metadata.deletion_grace_period_seconds == 1
    fake.wait_for(lambda: pid_gone(pids["stubborn"]))
    assert time.monotonic() - started >= 0.9  # SIGTERM ignored: killed after the grace period
    fake.wait_for(lambda: "stubborn" not in [p.metadata.name for p in
                                             core.list_namespaced_pod(NS).items])

    fake.stop()  # "holdout" ignores SIGTERM too: stop() must SIGKILL it after 5 s
    fake.stop()  # idempotent
    assert all(pid_gone(pid) for pid in pids.values())
    assert fake.pod_processes() == {}
