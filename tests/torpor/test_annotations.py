"""Deployment annotations → ServiceConfig: defaults, each annotation, every problem reported
at once, and a fingerprint that moves with config but not with status."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from torpor.config import KubernetesServiceConfig, ServicePolicyConfig
from torpor.workloads.annotations import (
    ENABLED_LABEL,
    RECORDED_REPLICAS,
    AnnotationError,
    fingerprint,
    is_enabled,
    service_from_deployment,
)


def deployment(
    annotations: dict[str, Any] | None = None,
    ports: list[dict[str, Any]] | None = None,
    name: str = "echo",
    namespace: str = "models",
    enabled: str | None = "true",
) -> dict[str, Any]:
    """A Deployment as `sanitize_for_serialization` returns it, with one container."""
    labels = {"app": name} | ({ENABLED_LABEL: enabled} if enabled is not None else {})
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": annotations or {},
            "resourceVersion": "1",
        },
        "spec": {
            "replicas": 2,
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "server",
                            "image": "echo:1",
                            "ports": [{"containerPort": 8080, "name": "http"}]
                            if ports is None
                            else ports,
                        }
                    ]
                }
            },
        },
        "status": {"replicas": 2, "readyReplicas": 2},
    }


def problems(dep: dict[str, Any]) -> tuple[str, ...]:
    with pytest.raises(AnnotationError) as info:
        service_from_deployment(dep)
    return info.value.problems


# -- defaults and each annotation ----------------------------------------------------------


def test_minimal_labelled_deployment_takes_every_default() -> None:
    service = service_from_deployment(deployment(), replicas_default=3)
    assert service.name == "echo"
    assert service.host == "echo.models"
    assert service.replicas == 3
    assert service.local is None
    assert service.kubernetes == KubernetesServiceConfig(
        namespace="models", deployment="echo", port=8080, service="echo"
    )
    assert service.kubernetes.service_name == "echo"
    assert service.protocol == "http1"
    assert service.never_sleep is False
    assert service.retry_non_idempotent is False
    assert service.policy == ServicePolicyConfig()


def test_each_annotation_is_read() -> None:
    service = service_from_deployment(
        deployment(
            {
                "torpor.io/name": "echo-svc",
                "torpor.io/host": "echo.example.com",
                "torpor.io/port": "9000",
                "torpor.io/service": "echo-endpoints",
                "torpor.io/protocol": "http2",
                "torpor.io/never-sleep": "true",
                "torpor.io/idle-after": "10m",
                "torpor.io/evict-after": "24h",
                "torpor.io/creation-grace": "90",
                "torpor.io/policy": "learned",
                "torpor.io/cold-start-price": "30m",
                "torpor.io/prewake": "false",
                "torpor.io/retry-non-idempotent": "true",
            }
        )
    )
    assert service.retry_non_idempotent is True
    assert service.name == "echo-svc"
    assert service.host == "echo.example.com"
    assert service.kubernetes is not None
    assert service.kubernetes.port == 9000
    assert service.kubernetes.service_name == "echo-endpoints"
    assert service.kubernetes.deployment == "echo"
    assert service.protocol == "http2"
    assert service.never_sleep is True
    assert service.policy == ServicePolicyConfig(
        idle_after=600.0, evict_after=86400.0, creation_grace=90.0, kind="learned",
        cold_start_price=1800.0, prewake=False,
    )


def test_never_sleep_false_and_torpor_written_annotations_are_accepted() -> None:
    service = service_from_deployment(
        deployment(
            {
                "torpor.io/never-sleep": "false",
                RECORDED_REPLICAS: "4",
                "torpor.io/hibernated": "2024-01-01T00:00:00Z",
                "torpor.io/recorded-min-replicas": "1",
                "kubectl.kubernetes.io/last-applied-configuration": "{}",
            }
        )
    )
    assert service.never_sleep is False


def test_host_is_lowercased_given_or_defaulted() -> None:
    assert service_from_deployment(deployment({"torpor.io/host": "Echo.Example.COM"})).host == (
        "echo.example.com"
    )
    assert service_from_deployment(deployment(name="echo", namespace="models")).host == (
        "echo.models"
    )


def test_annotations_may_be_null_as_the_api_returns_them() -> None:
    dep = deployment()
    dep["metadata"]["annotations"] = None
    assert service_from_deployment(dep).name == "echo"


# -- ports ---------------------------------------------------------------------------------

TWO_PORTS = [{"containerPort": 8080, "name": "http"}, {"containerPort": 9090, "name": "metrics"}]


def test_port_by_name() -> None:
    service = service_from_deployment(deployment({"torpor.io/port": "metrics"}, TWO_PORTS))
    assert service.kubernetes is not None
    assert service.kubernetes.port == 9090


def test_port_by_number_need_not_be_declared() -> None:
    service = service_from_deployment(deployment({"torpor.io/port": "7000"}, TWO_PORTS))
    assert service.kubernetes is not None
    assert service.kubernetes.port == 7000


def test_default_port_is_the_only_one_even_unnamed() -> None:
    service = service_from_deployment(deployment(ports=[{"containerPort": 5000}]))
    assert service.kubernetes is not None
    assert service.kubernetes.port == 5000


def test_default_port_counts_ports_across_containers() -> None:
    dep = deployment()
    containers = dep["spec"]["template"]["spec"]["containers"]
    containers.append({"name": "sidecar", "ports": [{"containerPort": 15090, "name": "stats"}]})
    (problem,) = problems(dep)
    assert problem.startswith("torpor.io/port: ")
    assert "declares 2 container ports (http=8080, stats=15090)" in problem


def test_ambiguous_ports_ask_for_the_annotation() -> None:
    (problem,) = problems(deployment(ports=TWO_PORTS))
    assert problem.startswith("torpor.io/port: not set")
    assert "2 container ports (http=8080, metrics=9090)" in problem
    assert "set torpor.io/port" in problem


def test_no_ports_ask_for_the_annotation() -> None:
    (problem,) = problems(deployment(ports=[]))
    assert "declares 0 container ports" in problem


def test_unknown_port_name_suggests_the_closest() -> None:
    (problem,) = problems(deployment({"torpor.io/port": "htp"}, TWO_PORTS))
    assert problem.startswith("torpor.io/port: 'htp' is neither a port number")
    assert "did you mean 'http'?" in problem
    assert "http, metrics" in problem


@pytest.mark.parametrize("value", ["0", "65536", "-1", "80.5"])
def test_port_out_of_range_or_not_a_number(value: str) -> None:
    (problem,) = problems(deployment({"torpor.io/port": value}))
    assert problem.startswith("torpor.io/port: ")
    assert repr(value) in problem


# -- problems ------------------------------------------------------------------------------


def test_every_problem_is_reported_together() -> None:
    with pytest.raises(AnnotationError) as info:
        service_from_deployment(
            deployment(
                {
                    "torpor.io/name": "Echo_Svc",
                    "torpor.io/host": "echo.example.com:8080",
                    "torpor.io/port": "web",
                    "torpor.io/service": "echo.svc",
                    "torpor.io/protocol": "http3",
                    "torpor.io/never-sleep": "yes",
                    "torpor.io/idle-after": "10 minutes",
                    "torpor.io/evict-after": "-1h",
                    "torpor.io/creation-grace": "1h30m",
                    "torpor.io/idle_after": "10m",
                    "torpor.io/policy": "smart",
                    "torpor.io/cold-start-price": "soon",
                    "torpor.io/prewake": "yes",
                },
                TWO_PORTS,
            )
        )
    err = info.value
    keys = [p.split(": ", 1)[0] for p in err.problems]
    assert sorted(keys) == sorted(
        [
            "torpor.io/name",
            "torpor.io/host",
            "torpor.io/port",
            "torpor.io/service",
            "torpor.io/protocol",
            "torpor.io/never-sleep",
            "torpor.io/idle-after",
            "torpor.io/evict-after",
            "torpor.io/creation-grace",
            "torpor.io/idle_after",
            "torpor.io/policy",
            "torpor.io/cold-start-price",
            "torpor.io/prewake",
        ]
    )
    assert str(err) == "deployment models/echo: " + "; ".join(err.problems)
    by_key = dict(p.split(": ", 1) for p in err.problems)
    assert by_key["torpor.io/idle-after"].startswith("'10 minutes' is not a duration; expected")
    assert "'Echo_Svc' is not a valid service name" in by_key["torpor.io/name"]
    assert "without spaces, port or path" in by_key["torpor.io/host"]
    assert "'echo.svc' is not a Kubernetes Service name" in by_key["torpor.io/service"]
    assert "expected one of http1, http2" in by_key["torpor.io/protocol"]
    assert by_key["torpor.io/never-sleep"] == 'expected "true" or "false", got \'yes\''
    assert "must not be negative" in by_key["torpor.io/evict-after"]
    assert by_key["torpor.io/policy"] == "expected one of learned, fixed, got 'smart'"
    assert by_key["torpor.io/prewake"] == 'expected "true" or "false", got \'yes\''


@pytest.mark.parametrize("host", ["*", "*.example.com", "echo!.example.com"])
def test_a_host_envoy_would_refuse_is_rejected(host: str) -> None:
    with pytest.raises(AnnotationError) as info:
        service_from_deployment(deployment({"torpor.io/host": host}))
    assert [p.split(": ", 1)[0] for p in info.value.problems] == ["torpor.io/host"]


def test_unknown_annotation_suggests_the_closest() -> None:
    (problem,) = problems(deployment({"torpor.io/idle_after": "10m"}))
    assert problem.startswith("torpor.io/idle_after: unknown annotation")
    assert "did you mean 'torpor.io/idle-after'?" in problem


def test_unknown_annotation_without_a_close_match_lists_the_known() -> None:
    (problem,) = problems(deployment({"torpor.io/zzz": "1"}))
    assert "did you mean" not in problem
    assert "known annotations: torpor.io/name, torpor.io/host" in problem


def test_enabled_given_as_an_annotation_is_called_out() -> None:
    (problem,) = problems(deployment({ENABLED_LABEL: "true"}))
    assert problem == f"{ENABLED_LABEL}: is a label, not an annotation; move it to metadata.labels"


def test_deployment_name_that_is_not_a_service_name_asks_for_the_annotations() -> None:
    found = problems(deployment(name="echo.v2"))
    assert [p.split(":")[0] for p in found] == ["torpor.io/name", "torpor.io/service"]
    assert all("the Deployment's name, used by default" in p for p in found)
    service = service_from_deployment(
        deployment({"torpor.io/name": "echo-v2", "torpor.io/service": "echo"}, name="echo.v2")
    )
    assert service.host == "echo.v2.models"
    assert service.kubernetes is not None
    assert service.kubernetes.deployment == "echo.v2"


def test_missing_metadata_is_a_problem_not_a_crash() -> None:
    dep = deployment()
    del dep["metadata"]["namespace"]
    with pytest.raises(AnnotationError) as info:
        service_from_deployment(dep)
    assert str(info.value).startswith("deployment ?/echo: metadata.namespace: ")


def test_non_string_annotation_value_is_a_problem() -> None:
    (problem,) = problems(deployment({"torpor.io/port": 8080}))
    assert problem == "torpor.io/port: expected a string value, got 8080"


def test_a_deployment_not_enabled_is_refused() -> None:
    (problem,) = problems(deployment(enabled="True"))
    assert problem == "torpor.io/enabled: expected the label \"true\", got 'True'"


def test_negative_replicas_default_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        service_from_deployment(deployment(), replicas_default=-1)


# -- is_enabled ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("True", False), ("TRUE", False), ("yes", False), ("1", False), ("", False)],
)
def test_only_the_exact_label_true_enables(value: str, expected: bool) -> None:
    assert is_enabled(deployment(enabled=value)) is expected


def test_no_label_or_no_labels_is_not_enabled() -> None:
    assert not is_enabled(deployment(enabled=None))
    dep = deployment()
    dep["metadata"]["labels"] = None
    assert not is_enabled(dep)
    assert not is_enabled({})


# -- fingerprint ---------------------------------------------------------------------------


def changed(edit: Callable[[dict[str, Any]], object]) -> bool:
    """Whether `edit` (applied to a copy of a typical Deployment) moves the fingerprint."""
    before = deployment({"torpor.io/idle-after": "10m"})
    after = copy.deepcopy(before)
    edit(after)
    return fingerprint(before) != fingerprint(after)


def container(dep: dict[str, Any]) -> dict[str, Any]:
    first: dict[str, Any] = dep["spec"]["template"]["spec"]["containers"][0]
    return first


def test_fingerprint_moves_with_config() -> None:
    assert changed(lambda d: d["metadata"]["annotations"].update({"torpor.io/idle-after": "5m"}))
    assert changed(lambda d: d["metadata"]["annotations"].update({"torpor.io/port": "http"}))
    assert changed(lambda d: d["metadata"]["annotations"].update({"torpor.io/typo": "x"}))
    assert changed(lambda d: d["metadata"]["annotations"].pop("torpor.io/idle-after"))
    assert changed(lambda d: d["metadata"]["labels"].update({ENABLED_LABEL: "false"}))
    assert changed(lambda d: d["metadata"]["labels"].pop(ENABLED_LABEL))
    assert changed(lambda d: container(d)["ports"].append({"containerPort": 9090}))
    assert changed(lambda d: container(d)["ports"][0].update({"containerPort": 8081}))
    assert changed(lambda d: container(d)["ports"][0].update({"name": "web"}))


def test_fingerprint_ignores_status_replicas_and_other_metadata() -> None:
    assert not changed(lambda d: d["status"].update({"readyReplicas": 0}))
    assert not changed(lambda d: d["spec"].update({"replicas": 0}))
    assert not changed(lambda d: d["metadata"].update({"resourceVersion": "2"}))
    assert not changed(lambda d: d["metadata"]["labels"].update({"app": "other"}))
    assert not changed(lambda d: d["metadata"]["annotations"].update({"other.io/x": "1"}))
    assert not changed(lambda d: d["metadata"]["annotations"].update({RECORDED_REPLICAS: "2"}))
    assert not changed(
        lambda d: d["metadata"]["annotations"].update({"torpor.io/hibernated": "true"})
    )
    assert not changed(lambda d: container(d).update({"image": "echo:2"}))


def test_fingerprint_is_independent_of_order() -> None:
    a = deployment({"torpor.io/name": "x", "torpor.io/port": "http"})
    b = deployment({"torpor.io/port": "http", "torpor.io/name": "x"})
    assert fingerprint(a) == fingerprint(b)
    assert ("annotation:torpor.io/port", "http") in fingerprint(a)
    assert (f"label:{ENABLED_LABEL}", "true") in fingerprint(a)
