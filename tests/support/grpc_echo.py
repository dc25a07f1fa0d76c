"""A gRPC replica for tests of HTTP/2 services: one unary method that echoes its request
with the replica's name in front, after an optional load delay (like a model server).

`python tests/support/grpc_echo.py --port N [--host IP] [--name NAME] [--load-seconds S]`.
Bytes in, bytes out, through grpcio's generic handlers: no .proto needed. `--host` is a pod's
own loopback IP when the fake kubelet runs it (tests/support/grpc_pod.py).
"""

from __future__ import annotations

import argparse
import signal
import time
from concurrent import futures
from typing import Any

import grpc

METHOD = "/torpor.test.Echo/Say"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="grpc-echo")
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
    print(f"grpc_echo {args.name} listening on {args.host}:{args.port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(2))
    server.wait_for_termination()


if __name__ == "__main__":
    main()
