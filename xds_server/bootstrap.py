"""The Envoy bootstrap that points an Envoy at torpor's control plane.

Owns: node identity, the admin listener, the static cluster to the control plane (HTTP/2:
it carries ADS, the access log and the request counters of stats_sink.py; over a Unix
socket, or TCP with this Envoy's client certificate when the control plane requires mTLS),
ADS as the source of listeners and clusters, the stats flush, sink and matcher, and the
headers torpor's routes look up, registered with Envoy (INLINE_HEADERS).
`torpor envoy-bootstrap` prints it; `torpor up` writes it to a file and starts Envoy on it.
An admin on a Unix socket is owner-only (mode 0600): no local user can POST /quitquitquit
to it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from torpor.async_calls import PREFER_HEADER
from torpor.config import DEFAULT_STATS_FLUSH, Address, ClientTlsConfig, Config
from torpor.errors import ConfigError
from torpor.model import is_ip_literal
from torpor.routes import SERVICE_HEADER, VERSION_HEADER
from xds_server import stats_sink
from xds_server.resources import RETRY_HEADER

#: Mode of Envoy's admin socket: the user running Envoy only.
ADMIN_SOCKET_MODE = 0o600
_TLS_CONTEXT_TYPE = ("type.googleapis.com/"
                     "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext")


#: control_plane.xds_protocol -> ads_config.api_type.
API_TYPES = {"delta": "DELTA_GRPC", "sotw": "GRPC"}


def bootstrap(node_id: str, admin: Address, xds: Address,
              xds_tls: ClientTlsConfig | None = None,
              stats_flush: float = DEFAULT_STATS_FLUSH,
              xds_protocol: str = "delta", release_memory: bool = True) -> dict[str, Any]:
    """The bootstrap as a JSON-ready dict (Envoy reads JSON and YAML alike). `xds_tls`:
    the certificate Envoy presents to a control plane that requires mTLS, and its CA.
    `stats_flush`: seconds between two reports of the request counters (stats_sink).
    `xds_protocol`: "delta" (incremental ADS, the default) or "sotw". `release_memory`:
    Envoy gives free heap pages back in the background (`releases_memory`)."""
    boot: dict[str, Any] = {
        "node": {"id": node_id, "cluster": "torpor"},
        "admin": {"address": _socket(admin, ADMIN_SOCKET_MODE)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": API_TYPES[xds_protocol],
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": "torpor_xds"}}],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [_control_plane_cluster(xds, xds_tls)]},
        "overload_manager": _overload_manager(),
        # Each worker makes its copy of a cluster (load balancer, host sets) on the
        # cluster's first request there, not when the cluster arrives: most services are
        # idle, and at 10,000 clusters the copies cost ~4 KB each (measured: Envoy's heap
        # 410 -> 367 MB); the first request a worker routes to a service makes it inline.
        "cluster_manager": {"enable_deferred_cluster_creation": True},
        "inline_headers": inline_headers(),
        **stats_sink.envoy_stats(stats_flush),
    }
    if release_memory:
        boot["memory_allocator_manager"] = _memory_release()
    return boot


#: Headers torpor's routes look up that Envoy does not keep in its O(1) table of its own:
#: (name, where). Looking up any other header walks the request's header list (measured:
#: `prefer`, which the route of asynchronous calls matches on every request, cost 3.1k
#: instructions, ~2 %, before it was registered). `prefer` is a list header (RFC 9110
#: 5.6.1), so that Envoy joining a client's repeated `Prefer` lines with a comma, as it
#: does for its inline headers, changes nothing; torpor's own headers are single-valued.
INLINE_HEADERS = (
    (PREFER_HEADER, "REQUEST_HEADER"),   # the async-calls route's match (every request)
    (SERVICE_HEADER, "REQUEST_HEADER"),  # removed from every request once a route rewrites
    (VERSION_HEADER, "REQUEST_HEADER"),  # set by the routes of services with versions
    (RETRY_HEADER, "RESPONSE_HEADER"),   # an HTTP/2 service's retriable_headers
)


def inline_headers() -> list[dict[str, str]]:
    """Bootstrap `inline_headers`: INLINE_HEADERS registered with Envoy at start."""
    return [{"inline_header_name": name, "inline_header_type": where}
            for name, where in INLINE_HEADERS]


#: Downstream connections Envoy keeps open at once, over all listeners: held requests are
#: open connections too, so this caps them before file descriptors run out. Beyond it
#: Envoy closes new connections at once.
MAX_DOWNSTREAM_CONNECTIONS = 50_000


def _overload_manager() -> dict[str, Any]:
    """A ceiling on downstream connections (Envoy warns without one). The resource monitor,
    not the runtime key `overload.global_downstream_max_connections`, which Envoy 1.40
    reports as deprecated."""
    return {
        "refresh_interval": "0.25s",
        "resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                         "downstream_connections.v3.DownstreamConnectionsConfig",
                "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS,
            },
        }],
    }


#: Free heap pages Envoy's allocator (tcmalloc) hands back to the system each
#: RELEASE_INTERVAL, at most. Without it, what Envoy freed stays resident: the pages that
#: parsed a 10,000-service RouteConfiguration (~40-60 MB), and what removed services held
#: (Envoy otherwise does not return memory after removals).
RELEASE_BYTES = 64 << 20
RELEASE_INTERVAL = "1s"


def releases_memory(routing: str) -> bool:
    """Whether the Envoy of a gateway with this `gateway.routing` gives free heap pages
    back in the background (`memory_allocator_manager`). With virtual hosts it does: each
    change of the route table has Envoy parse the whole table again (7.5 MB at 10,000
    services), and without the release what that parsing freed stays resident (at 10,000
    services, RSS after 200 flips 494 MB instead of 513). Found by Host, the route table is
    one virtual host and there is little to give back (RSS 288 instead of 297 MB), while the
    allocator's background work, every few seconds whatever the interval or amount, held
    up Envoy's main thread: the slowest flips took 8-22 ms instead of 4-7 (200 flips at
    10,000 services, bench/xds_scale.py; the same with virtual hosts: p99 11.2 vs 5.5 ms)."""
    return routing != "host_header"


def _memory_release() -> dict[str, Any]:
    """Envoy's background release of free memory to the system (measured at 10,000
    services: resident memory ~15-20 MB lower within seconds of the sync). Only free pages
    go: nothing Envoy uses is touched."""
    return {"bytes_to_release": str(RELEASE_BYTES), "memory_release_interval": RELEASE_INTERVAL}


def config_bootstrap(config: Config, node_id: str | None = None, xds: Address | None = None,
                     admin: Address | None = None) -> dict[str, Any]:
    """The bootstrap of the Envoy in front of this config, with its stats listener. `xds`
    and `admin` override the config's addresses (`torpor up` dials the port it bound; in
    Kubernetes Envoy dials the control plane's Service name, not the 0.0.0.0 it binds)."""
    admin = admin or config.gateway.admin
    boot = bootstrap(node_id or config.control_plane.node_id, admin,
                     xds or config.control_plane.xds, envoy_xds_tls(config),
                     stats_flush=config.gateway.stats_flush_interval,
                     xds_protocol=config.control_plane.xds_protocol,
                     release_memory=releases_memory(config.gateway.routing))
    add_stats_listener(boot, config.gateway.stats_listen, admin)
    return boot


def bootstrap_json(config: Config, node_id: str | None = None, xds: Address | None = None,
                   admin: Address | None = None) -> str:
    """What `torpor envoy-bootstrap` prints for this config (`config_bootstrap`)."""
    return json.dumps(config_bootstrap(config, node_id, xds, admin), indent=2, sort_keys=True)


def envoy_xds_tls(config: Config) -> ClientTlsConfig | None:
    """The TLS files the Envoy of this config presents to the control plane: none when
    the control plane does not require mTLS. Raises ConfigError when it does and the
    config gives Envoy no certificate (gateway.xds_tls)."""
    if config.control_plane.tls is None:
        return None
    tls = config.gateway.xds_tls
    if tls is None or tls.cert is None:
        raise ConfigError(str(config.path), "gateway.xds_tls",
                          "control_plane.tls requires Envoy's client certificate: give "
                          "gateway.xds_tls: {cert, key, ca} (torpor certs makes them)")
    return tls


_HTTP_OPTIONS_TYPE = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _control_plane_cluster(xds: Address, tls: ClientTlsConfig | None) -> dict[str, Any]:
    cluster = {
        "name": "torpor_xds",
        "type": "STATIC" if xds.is_unix or is_ip_literal(xds.host) else "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "torpor_xds",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(xds)}}]}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS_TYPE,
                "explicit_http_config": {
                    "http2_protocol_options": {
                        "connection_keepalive": {"interval": "30s", "timeout": "5s"}
                    }
                },
            }
        },
    }
    if tls is not None:
        cluster["transport_socket"] = _tls_socket(xds, tls)
    return cluster


def _tls_socket(xds: Address, tls: ClientTlsConfig) -> dict[str, Any]:
    """Envoy's side of mTLS to the control plane: its certificate, and the CA the control
    plane's certificate must chain to."""
    common: dict[str, Any] = {"alpn_protocols": ["h2"]}
    if tls.cert is not None and tls.key is not None:
        common["tls_certificates"] = [{"certificate_chain": {"filename": str(tls.cert)},
                                       "private_key": {"filename": str(tls.key)}}]
    if tls.ca is not None:
        common["validation_context"] = {"trusted_ca": {"filename": str(tls.ca)}}
    context: dict[str, Any] = {"@type": _TLS_CONTEXT_TYPE, "common_tls_context": common}
    if not xds.is_unix and not is_ip_literal(xds.host):
        context["sni"] = xds.host
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}


def _socket(address: Address, mode: int | None = None) -> dict[str, Any]:
    """An Envoy address: a socket_address, or a pipe (Unix socket) with `mode` if given."""
    if address.unix is not None:
        pipe: dict[str, Any] = {"path": str(address.unix)}
        if mode is not None:
            pipe["mode"] = mode
        return {"pipe": pipe}
    return {"socket_address": {"address": address.host, "port_value": address.port}}




# --- Envoy's statistics for Prometheus ------------------------------------------------------

#: The one path the stats listener answers (Envoy's admin handler of the same path).
PROMETHEUS_STATS_PATH = "/stats/prometheus"
STATS_LISTENER = "torpor_envoy_stats"
ADMIN_CLUSTER = "torpor_envoy_admin"
_ANY_HOST = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}


def add_stats_listener(boot: dict[str, Any], listen: Address | None, admin: Address) -> None:
    """With `listen` (gateway.stats_listen): a static listener there that forwards GET
    /stats/prometheus to Envoy's own admin (a static cluster on the admin's address, Unix
    socket or TCP) and answers 404 to anything else. Prometheus scrapes Envoy there without
    reaching the admin interface, whose other paths change or stop the gateway."""
    if listen is None:
        return
    if admin.host in _ANY_HOST:  # an admin on every address: dial it on loopback
        admin = dataclasses.replace(admin, host=_ANY_HOST[admin.host])
    endpoint = {"endpoint": {"address": _socket(admin)}}
    boot["static_resources"]["clusters"].append({
        "name": ADMIN_CLUSTER,
        "type": "STATIC" if admin.is_unix or is_ip_literal(admin.host) else "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": ADMIN_CLUSTER,
                            "endpoints": [{"lb_endpoints": [endpoint]}]},
    })
    only_get = [{"name": ":method", "string_match": {"exact": "GET"}}]
    routes = [
        {"match": {"path": PROMETHEUS_STATS_PATH, "headers": only_get},
         "route": {"cluster": ADMIN_CLUSTER, "timeout": "10s"}},
        {"match": {"prefix": "/"},
         "direct_response": {"status": 404, "body": {
             "inline_string": f"only GET {PROMETHEUS_STATS_PATH} is served here\n"}}},
    ]
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                 "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "torpor_stats",
        "route_config": {"name": STATS_LISTENER, "virtual_hosts": [
            {"name": STATS_LISTENER, "domains": ["*"], "routes": routes}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    boot["static_resources"].setdefault("listeners", []).append({
        "name": STATS_LISTENER,
        "address": _socket(listen),
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": manager}]}],
    })
