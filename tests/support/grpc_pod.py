"""A gRPC replica as a Kubernetes pod, for fleet tests of HTTP/2 services on the fake API.

tests/support/grpc_echo.py binds 127.0.0.1 only, but the fake kubelet gives every pod its
own loopback IP and Envoy reaches the pod at that IP (the EndpointSlice's address). This
module is both the Deployment that runs such a pod and the pod's program: the same echo
(one unary method, `/torpor.test.Echo/Say`, answering its request with `NAME:` in front,
after an optional load delay) bound to `--host`, the pod IP.

`python tests/support/grpc_pod.py --host IP --port N --name NAME [--load-seconds S]`
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

METHOD = "/torpor.test.Echo/Say"
PORT = 8080
PROGRAM = Path(__file__).resolve()


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="grpc-pod")
    parser.add_argument("--load-seconds", type=float, default=0.0)
    args = parser.parse_args()
    time.sleep(args.load_seconds)
    prefix = f"{args.name}:".encode()

    def say(request: bytes, context: Any) -> bytes:
        return prefix + request

    handler = grpc.method_handlers_generic_handler(
        "torpor.test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    print(f"grpc_pod {args.name} listening on {args.host}:{args.port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(1))
    server.wait_for_termination()


if __name__ == "__main__":
    main()
