"""Access-log (ALS) receiver: Envoy's request logs → which service was called, and when.

Owns: reading `StreamAccessLogs` streams and keeping, per service, the count and time of
the last call seen. Every service route is named after its service, so an entry's
`route_name` identifies the service without parsing hosts. This first version keeps
counts in memory and in metrics; windows, hour-of-week distributions and flushing to the
store come with the hibernation policy.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from torpor import metrics
from torpor.clock import Clock, SystemClock

log = logging.getLogger("torpor.collector")

#: route_name of the catch-all virtual host (resources.py names it so).
CATCH_ALL_ROUTE = "torpor_catch_all"


class CallCollector(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Counts calls per service from Envoy's gRPC access log."""

    def __init__(self, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self.calls: Counter[str] = Counter()
        self.last_call: dict[str, float] = {}
        self.unknown_hosts: Counter[str] = Counter()

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> als_pb2.StreamAccessLogsResponse:
        async for message in request_iterator:
            for entry in message.http_logs.log_entry:
                self._record(entry.common_properties.route_name, entry.request.authority)
        return als_pb2.StreamAccessLogsResponse()

    def _record(self, route_name: str, authority: str) -> None:
        now = self._clock.now()
        if not route_name or route_name == CATCH_ALL_ROUTE:
            self.unknown_hosts[authority] += 1
            metrics.UNKNOWN_HOST_REQUESTS.inc()
            return
        self.calls[route_name] += 1
        self.last_call[route_name] = now
        metrics.REQUESTS_SEEN.labels(service=route_name).inc()
        metrics.LAST_REQUEST.labels(service=route_name).set(now)
