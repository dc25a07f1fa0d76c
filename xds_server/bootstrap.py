"""The Envoy bootstrap that points an Envoy at torpor's control plane.

Owns: node identity, the admin listener, the static cluster to the control plane (HTTP/2:
it carries ADS and the access log), and ADS as the source of listeners and clusters.
`torpor envoy-bootstrap` prints it; `torpor up` writes it to a file and starts Envoy on it.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from torpor.config import Address, Config


def bootstrap(node_id: str, admin: Address, xds: Address) -> dict[str, Any]:
    """The bootstrap as a JSON-ready dict (Envoy reads JSON and YAML alike)."""
    return {
        "node": {"id": node_id, "cluster": "torpor"},
        "admin": {"address": _socket(admin)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": "torpor_xds"}}],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [_control_plane_cluster(xds)]},
        "overload_manager": _overload_manager(),
    }


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


def bootstrap_json(config: Config, node_id: str | None = None, xds: Address | None = None,
                   admin: Address | None = None) -> str:
    """What `torpor envoy-bootstrap` prints for this config. `xds` and `admin` override the
    config's addresses: in Kubernetes, Envoy dials the control plane's Service name, not the
    0.0.0.0 the control plane binds."""
    boot = bootstrap(node_id or config.control_plane.node_id, admin or config.gateway.admin,
                     xds or config.control_plane.xds)
    return json.dumps(boot, indent=2, sort_keys=True)


_HTTP_OPTIONS_TYPE = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _control_plane_cluster(xds: Address) -> dict[str, Any]:
    return {
        "name": "torpor_xds",
        "type": "STATIC" if _is_ip(xds.host) else "STRICT_DNS",
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


def _socket(address: Address) -> dict[str, Any]:
    return {"socket_address": {"address": address.host, "port_value": address.port}}



def _is_ip(host: str) -> bool:
    """STATIC clusters need an IP literal; a name needs STRICT_DNS."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
