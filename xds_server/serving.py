"""The control plane's gRPC listener: ADS, the access-log receiver and the admin API.

Owns binding and stopping the grpc.aio server. Callers register servicers before start:
the ADS servicer must only be reachable once the desired state is in the cache.
"""

from __future__ import annotations

import grpc
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.discovery.v3 import ads_pb2_grpc

from torpor.errors import TorporError
from xds_server.collector import CallCollector
from xds_server.server import AdsServer

# Envoy keeps its ADS stream open for the life of the process; keepalives detect a dead
# peer, and large CDS/RDS responses at 10k services exceed gRPC's 4 MB default.
GRPC_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
]


async def start_xds_listener(
    address: str, ads: AdsServer, collector: CallCollector
) -> tuple[grpc.aio.Server, int]:
    """Serve ADS and ALS on `address` ("host:port", port 0 = any); returns (server, port)."""
    server = grpc.aio.server(options=GRPC_OPTIONS)
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(collector, server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise TorporError(f"cannot listen for xDS on {address}: {exc}") from exc
    if port == 0:
        raise TorporError(f"cannot listen for xDS on {address}: address in use or invalid")
    await server.start()
    return server, port
