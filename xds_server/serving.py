"""The control plane's gRPC listener for Envoys: ADS, the access-log receiver and the
receiver of Envoy's request counters (stats_sink.py).

Owns binding and stopping the grpc.aio server, and who may connect: only Envoys that
authenticate. Either a Unix socket only its owner may open (`unix:PATH`, what `torpor up`
uses by default), or TCP with mTLS (`control_plane.tls`: a client certificate signed by
its client_ca). Plain TCP stays possible, with a warning: any process that reaches it can
open an ADS stream, never ACK, and stall every hibernation for ack_timeout. Callers
register servicers before start: the ADS servicer must only be reachable once the desired
state is in the cache. ADS is one gRPC service with two methods: state-of-the-world
(server.py) and delta (delta_server.py), over the same cache and stream registry; each
Envoy uses the one its bootstrap names (`ads_config.api_type`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.discovery.v3 import ads_pb2_grpc

from torpor.config import ServerTlsConfig
from torpor.errors import TorporError
from torpor.logs import event
from xds_server import stats_sink
from xds_server.collector import CallCollector
from xds_server.delta_server import DeltaAds
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


log = logging.getLogger(__name__)

#: Mode of the xDS Unix socket: its owner (the user running torpor and its Envoy) only.
SOCKET_MODE = 0o600


async def start_xds_listener(
    address: str, ads: AdsServer, collector: CallCollector,
    tls: ServerTlsConfig | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Serve ADS, ALS and MetricsService on `address` ("host:port", port 0 = any, or
    "unix:PATH"), with mTLS when `tls` is given; returns (server, port) (port 0 for a
    socket)."""
    server = grpc.aio.server(options=GRPC_OPTIONS)
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(AggregatedDiscovery(ads),
                                                                  server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(collector, server)
    stats_sink.add_to_server(server, collector)  # Envoy's request counters
    socket_path = Path(address.removeprefix("unix:")) if address.startswith("unix:") else None
    if socket_path is not None:
        socket_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if tls is not None:
            port = server.add_secure_port(address, server_credentials(tls))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise TorporError(f"cannot listen for xDS on {address}: {exc}") from exc
    if port == 0:
        raise TorporError(f"cannot listen for xDS on {address}: address in use or invalid")
    if socket_path is not None:
        # Bound, not yet serving: no connection is answered before the mode is owner-only.
        os.chmod(socket_path, SOCKET_MODE)
        port = 0
    await server.start()
    mode = "unix-socket" if socket_path is not None else "mtls" if tls else "plaintext"
    event(log, "xds_listener.started", address=address, port=port, auth=mode)
    if mode == "plaintext":
        event(log, "xds_listener.unauthenticated", level=logging.WARNING, address=address,
              why="plain TCP: any process that reaches it can connect as an Envoy, never "
                  "ACK and stall every hibernation; set control_plane.tls (torpor certs) "
                  "or use unix:PATH")
    return server, port


class AggregatedDiscovery(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """The ADS gRPC service: state-of-the-world streams to `ads`, delta streams to a
    DeltaAds that shares its cache and stream registry. The handlers are the two servers'
    own async generator methods (grpc.aio serves a handler as a stream only if it is one)."""

    def __init__(self, ads: AdsServer) -> None:
        self.StreamAggregatedResources = ads.StreamAggregatedResources
        self.DeltaAggregatedResources = DeltaAds(ads, ads.cache).DeltaAggregatedResources


def server_credentials(tls: ServerTlsConfig) -> grpc.ServerCredentials:
    """mTLS: this server's certificate, and client certificates required and checked
    against `client_ca`. Raises TorporError naming a file that cannot be read."""
    key, cert, client_ca = (_read(tls.key, "key"), _read(tls.cert, "cert"),
                            _read(tls.client_ca, "client_ca"))
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=True)


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TorporError(f"control_plane.tls.{key}: cannot read {path}: {exc.strerror}") \
            from exc
