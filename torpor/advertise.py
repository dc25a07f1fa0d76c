"""Where Envoy reaches an activator: the address an activator is advertised at.

EDS endpoints must be IP addresses, so a name (`activator.advertise`, e.g. a Service, or
`torpor activator --advertise`) is resolved here, once; a wildcard listen address means
"this machine". Shared by the control plane (the configured activator) and a standalone
activator (what it registers in a fleet).
"""

from __future__ import annotations

import socket

from torpor.config import ActivatorConfig
from torpor.errors import TorporError
from torpor.model import is_ip_literal


def advertised_activator_host(activator: ActivatorConfig) -> str:
    """The IP address Envoy's endpoints for the activator carry. EDS endpoints must be IP
    addresses, so a name (`activator.advertise`, e.g. the activator's Service) is resolved
    once, here; a wildcard listen address means "this machine"."""
    host = activator.advertise or activator.listen.host
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if is_ip_literal(host):
        return host
    try:
        infos = socket.getaddrinfo(host, activator.listen.port, socket.AF_INET,
                                   socket.SOCK_STREAM)
    except OSError as exc:
        raise TorporError(f"activator.advertise: cannot resolve {host!r}: {exc}") from exc
    return str(infos[0][4][0])
