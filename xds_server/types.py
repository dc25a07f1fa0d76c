"""Envoy xDS type URLs, in one place, and the order in which they must be applied.

Order matters (go-control-plane's lesson, measured): clusters and their
endpoints must be in Envoy before a route points at them, and routes must be gone before
the clusters they point at are removed. `ADD_ORDER` is the order of a push that adds.
"""

from typing import Final

PREFIX: Final = "type.googleapis.com/"
CLUSTER: Final = PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT: Final = PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER: Final = PREFIX + "envoy.config.listener.v3.Listener"
ROUTE: Final = PREFIX + "envoy.config.route.v3.RouteConfiguration"
#: The gateway's TLS certificates (SDS), named in the listener's filter chains.
SECRET: Final = PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"

#: CDS, EDS before LDS, RDS (and the certificates a listener uses before the listener).
ADD_ORDER: Final = (CLUSTER, ENDPOINT, SECRET, LISTENER, ROUTE)

#: Types whose state-of-the-world responses must list every resource (a missing one is
#: deleted). For EDS and RDS, a response carries only the resources it updates.
WILDCARD_TYPES: Final = frozenset({CLUSTER, LISTENER})

SHORT_NAMES: Final = {CLUSTER: "cds", ENDPOINT: "eds", LISTENER: "lds", ROUTE: "rds",
                      SECRET: "sds"}


def short(type_url: str) -> str:
    """"cds" for the cluster type URL etc., for logs and metric labels."""
    return SHORT_NAMES.get(type_url, type_url.rsplit(".", 1)[-1])
