"""Kubernetes objects for tests: a model-server Deployment, its Service, an HPA.

The Deployment runs the example model server the way a cluster would: one process per
pod, on the pod's own IP (the fake kubelet gives each pod a loopback address), the same
container port everywhere, ready when GET /healthz answers.
"""

from __future__ import annotations

import sys
from typing import Any

PORT = 8080


def model_deployment(name: str, namespace: str, replicas: int, load_seconds: float = 0.0,
                     labels: dict[str, str] | None = None,
                     annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {},
                     "annotations": annotations or {}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 2,
                    "containers": [{
                        "name": "model",
                        "image": "torpor-example:test",
                        "command": [sys.executable, "-m", "torpor.examples.model_server",
                                    "--host", "$(POD_IP)", "--port", str(PORT),
                                    "--name", name, "--load-seconds", str(load_seconds)],
                        "env": [{"name": "POD_IP",
                                 "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                        "ports": [{"name": "http", "containerPort": PORT}],
                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": PORT},
                                           "periodSeconds": 1},
                    }],
                },
            },
        },
    }


def model_service(name: str, namespace: str) -> dict[str, Any]:
    """The Kubernetes Service whose EndpointSlices list the Deployment's pods."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": {"app": name},
                 "ports": [{"name": "http", "port": 80, "targetPort": PORT,
                            "protocol": "TCP"}]},
    }


def hpa(name: str, namespace: str, deployment: str, min_replicas: int, max_replicas: int,
        desired: int | None = None) -> dict[str, Any]:
    """An autoscaling/v2 HPA; `desired` stands in for what its metrics would ask for."""
    annotations = {} if desired is None else {"fake.torpor.test/desired-replicas": str(desired)}
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                               "name": deployment},
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            "metrics": [{"type": "Resource", "resource": {
                "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}],
        },
    }


def kube_service_yaml(name: str, namespace: str, replicas: int = 1, extra: str = "") -> str:
    """One `services:` entry of a config with kubernetes workloads (`extra`: more keys,
    e.g. "retry_non_idempotent: true")."""
    return f"""  - name: {name}
    host: {name}.localhost
    replicas: {replicas}
    kubernetes: {{namespace: {namespace}, deployment: {name}, port: {PORT}}}
""" + (f"    {extra}\n" if extra else "")
