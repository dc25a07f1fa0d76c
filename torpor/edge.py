"""The edge limits: what one request may look like, for Envoy and for the activator alike.

Owns: the one set of numbers both HTTP/1 fronts are built from, so that a request Envoy
accepts for an awake service is accepted by the activator while the service sleeps (a
client whose request the activator refused could never wake it). Envoy's listener takes
`max_request_headers_kb`, `max_request_headers_count` and `request_headers_timeout`
(xds_server/resources.py); the activator's aiohttp server takes `aiohttp_handler_args()`
(activator/server.py). Envoy has no separate URL limit: the request line counts towards
`max_request_headers_kb`, so that is the longest URL too.
"""

from __future__ import annotations

import dataclasses

#: Envoy's default, and torpor's: a 59 KB header or a 59 KB URL passes, a 61 KB one does not.
DEFAULT_MAX_REQUEST_HEADERS_KB = 60
#: Envoy refuses a larger `max_request_headers_kb`.
MAX_REQUEST_HEADERS_KB_LIMIT = 8192
#: Envoy's default header count limit (a request with more is answered 431).
DEFAULT_MAX_REQUEST_HEADERS_COUNT = 100
#: Headers Envoy may add before a request reaches the activator (x-forwarded-for,
#: x-request-id, x-envoy-*, ...): the activator allows that many more than Envoy does.
ENVOY_ADDED_HEADERS = 32
#: How long a client may take to send its request headers before Envoy answers 408.
DEFAULT_REQUEST_HEADERS_TIMEOUT = 10.0
#: The `Server` header of the activator's own answers: no version banner.
SERVER_NAME = "torpor"


@dataclasses.dataclass(frozen=True)
class EdgeLimits:
    max_request_headers_kb: int = DEFAULT_MAX_REQUEST_HEADERS_KB
    max_request_headers_count: int = DEFAULT_MAX_REQUEST_HEADERS_COUNT
    request_headers_timeout: float = DEFAULT_REQUEST_HEADERS_TIMEOUT

    @property
    def max_request_headers_bytes(self) -> int:
        return self.max_request_headers_kb * 1024

    def aiohttp_handler_args(self) -> dict[str, int]:
        """aiohttp's parser limits (per line and per header, it has no total) at Envoy's
        total: whatever Envoy let through, one line of it is no longer than that."""
        size = self.max_request_headers_bytes
        return {
            "max_line_size": size,
            "max_field_size": size,
            "max_headers": self.max_request_headers_count + ENVOY_ADDED_HEADERS,
        }
