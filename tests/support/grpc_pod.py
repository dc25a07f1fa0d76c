"""A gRPC replica as a Kubernetes pod, for fleet tests of HTTP/2 services on the fake API.

The fake kubelet gives every pod its own loopback IP and Envoy reaches the pod at that IP
(the EndpointSlice's address), so the pod runs tests/support/grpc_echo.py bound to it
(`--host $(POD_IP)`). Also the Service and the config entry that go with it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tests.support.grpc_echo import METHOD

__all__ = ["METHOD", "PORT", "grpc_deployment", "grpc_service", "grpc_service_yaml"]

PORT = 8080
PROGRAM = Path(__file__).resolve().with_name("grpc_echo.py")


def grpc_deployment(name: str, namespace: str, replicas: int, answer_name: str,
                    load_seconds: float = 0.0) -> dict[str, Any]:
    """A Deployment whose pods run this echo on the pod IP, ready once the port accepts
    connections (tcpSocket probe). Every answer starts with `answer_name`; it is also on
    the pod processes' command line (tests find leftover processes by it)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": {}, "annotations": {}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 2,
                    "containers": [{
                        "name": "echo",
                        "image": "torpor-grpc-echo:test",
                        "command": [sys.executable, str(PROGRAM), "--host", "$(POD_IP)",
                                    "--port", str(PORT), "--name", answer_name,
                                    "--load-seconds", str(load_seconds)],
                        "env": [{"name": "POD_IP",
                                 "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                        "ports": [{"name": "grpc", "containerPort": PORT}],
                        "readinessProbe": {"tcpSocket": {"port": PORT}, "periodSeconds": 1},
                    }],
                },
            },
        },
    }


def grpc_service(name: str, namespace: str) -> dict[str, Any]:
    """The Kubernetes Service whose EndpointSlices list the Deployment's pods."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": {"app": name},
                 "ports": [{"name": "grpc", "port": 80, "targetPort": PORT,
                            "protocol": "TCP"}]},
    }


def grpc_service_yaml(name: str, namespace: str, replicas: int = 1) -> str:
    """One `services:` entry of a config with kubernetes workloads, speaking HTTP/2."""
    return f"""  - name: {name}
    host: {name}.localhost
    replicas: {replicas}
    protocol: http2
    kubernetes: {{namespace: {namespace}, deployment: {name}, port: {PORT}}}
"""
