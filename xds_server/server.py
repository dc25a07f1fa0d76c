"""State-of-the-world ADS server: streams, nonces, subscriptions, ACK/NACK.

Owns: one gRPC stream per Envoy, what each stream was sent and has applied, and answering
"has every connected Envoy applied version V?" (hibernation waits on that). Knows nothing
of what a resource means; reads resources from the cache through `create_watch` and
`snapshot`. The delta front end (delta_server.py) sits beside it on the same cache.

Protocol rules (measured): a NACK is logged with Envoy's error and counted, and the
rejected version is never sent again (only a newer snapshot is); a stale nonce is ignored;
EDS/RDS responses carry only changed, subscribed resources; streams are not served before
the cache holds the desired state.

Delta (incremental) streams are served by delta_server.py on the same gRPC service; they
register here (`open_stream`, `close_stream`, `report_rejection`, `mark_progress`), so
`wait_synced`, `lagging`, `rejections` and `streams` count every Envoy, whichever protocol
it speaks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TypeVar

import grpc
import immutables
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse

from torpor import metrics
from torpor.logs import event
from xds_server import types
from xds_server.cache import Resource, Snapshot, SnapshotCache
from xds_server.protocol import RequestKind, classify, updates_for

log = logging.getLogger("torpor.xds")

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


@dataclasses.dataclass
class TypeState:
    """What one stream asked for and was sent, for one resource type."""

    subscribed: set[str] | None  # None: wildcard (CDS, LDS)
    # name -> digest, persistent maps: an ACK takes what was sent as is, and a response
    # adds what it carried, in proportion to that, not to what the stream holds.
    sent: immutables.Map[str, bytes] = dataclasses.field(default_factory=immutables.Map)
    acked: immutables.Map[str, bytes] = dataclasses.field(default_factory=immutables.Map)
    last_nonce: str | None = None
    awaiting: bool = False  # the last response awaits its ACK/NACK
    sent_version: int = 0
    nacked_version: int | None = None  # never resend this version
    last_error: str | None = None
    synced_version: int = 0  # the newest snapshot version this stream fully applied
    # SotW: the snapshot version whose subscribed part the stream was last found to hold
    # exactly (sent or due), None when unknown: the next one is then compared in full.
    clean_version: int | None = None

    def acknowledged(self) -> None:
        """Envoy applied the response awaiting its answer: what was sent is what it holds,
        and no rejection stands any more (both ADS variants)."""
        self.acked = self.sent
        self.awaiting = False
        self.nacked_version = None
        self.last_error = None


@dataclasses.dataclass
class EnvoyStream:
    """One connected Envoy (one ADS stream)."""

    stream_id: int
    peer: str
    node_id: str = ""
    types: dict[str, TypeState] = dataclasses.field(default_factory=dict)
    responses_sent: int = 0
    protocol: str = "sotw"  # or "delta"
    resources_sent: int = 0  # resources carried by every response (delta: + removals)
    bytes_sent: int = 0  # serialized size of the resources carried


@dataclasses.dataclass(frozen=True)
class Rejection:
    """One NACK: Envoy `node` rejected `type_url` of snapshot `version` with `error`."""

    node: str
    type_url: str
    version: int
    error: str


@dataclasses.dataclass(frozen=True)
class StreamInfo:
    """A read-only view of a stream, for status, tests and benchmarks."""

    node_id: str
    peer: str
    responses_sent: int
    nacks: dict[str, str]  # type -> last error, for types whose last answer was a NACK
    synced_versions: dict[str, int]
    protocol: str = "sotw"
    resources_sent: int = 0
    bytes_sent: int = 0


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """The ADS servicer. Serve it with `start_grpc_server`."""

    def __init__(self, cache: SnapshotCache) -> None:
        self._cache = cache
        self.cache = cache  # the delta streams (delta_server.py) read the same one
        self._streams: dict[int, EnvoyStream] = {}
        self._stream_ids = itertools.count(1)
        self._nonces = itertools.count(1)
        self._progress = asyncio.Event()
        self._on_rejected: list[Callable[[Rejection], None]] = []
        self._on_applied: list[Callable[[Snapshot], None]] = []
        self._applied_version = 0

    def add_listeners(self, rejected: Callable[[Rejection], None],
                      applied: Callable[[Snapshot], None]) -> None:
        """`rejected(r)` on every NACK; `applied(snapshot)` once per version, when every
        connected Envoy (at least one) applied the current snapshot. Both run on the
        event loop, inside a stream's handling: they must not block."""
        self._on_rejected.append(rejected)
        self._on_applied.append(applied)

    def rejections(self) -> list[Rejection]:
        """Every (Envoy, type) whose last answer was a NACK, with Envoy's words. Safe to
        call from another thread."""
        # list() copies each dict in one step under the GIL: /ready reads this from the
        # metrics server's thread while the event loop changes the streams.
        return [Rejection(stream.node_id or stream.peer, type_url, ts.nacked_version,
                          ts.last_error or "")
                for stream in list(self._streams.values())
                for type_url, ts in list(stream.types.items())
                if ts.nacked_version is not None]

    # --- what callers ask -------------------------------------------------------------

    def streams(self) -> list[StreamInfo]:
        """Every connected Envoy."""
        return [_info(s) for s in self._streams.values()]

    def lagging(self, version: int) -> list[str]:
        """Descriptions of (Envoy, type) pairs that have not applied `version` yet."""
        return [_describe(stream, type_url, ts) for stream, type_url, ts in self._behind(version)]

    def _behind(self, version: int) -> list[tuple[EnvoyStream, str, TypeState]]:
        return [
            (stream, type_url, ts)
            for stream in self._streams.values()
            for type_url, ts in stream.types.items()
            if ts.synced_version < version
        ]

    async def wait_synced(self, version: int, timeout: float) -> list[str]:
        """Wait until every connected Envoy applied `version` (or a newer one).

        Returns [] on success, else what still lags when `timeout` expired, or as soon as
        every lagging Envoy rejected `version` (it will never apply it). Envoys that
        connect meanwhile count too; with none connected, there is nothing to wait for.
        """
        deadline = time.monotonic() + timeout
        while True:
            behind = self._behind(version)
            remaining = deadline - time.monotonic()
            rejected = all(ts.nacked_version is not None and ts.nacked_version >= version
                           for _, _, ts in behind)
            if not behind or rejected or remaining <= 0:
                return [_describe(*b) for b in behind]
            progress = self._progress
            try:
                await asyncio.wait_for(progress.wait(), remaining)
            except TimeoutError:
                return self.lagging(version)

    # --- the gRPC method ----------------------------------------------------------------

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[DiscoveryResponse]:
        async for response in serve_stream(self, self._cache, request_iterator, context.peer(),
                                           "sotw", DiscoveryRequest, self._on_request,
                                           self._due_responses):
            yield response

    # --- what both protocols' streams share ---------------------------------------------

    def open_stream(self, peer: str, protocol: str) -> EnvoyStream:
        """Register a new stream: from now on it counts in `wait_synced` and metrics."""
        stream = EnvoyStream(stream_id=next(self._stream_ids), peer=peer, protocol=protocol)
        self._streams[stream.stream_id] = stream
        metrics.XDS_CONNECTED_ENVOYS.set(len(self._streams))
        return stream

    def close_stream(self, stream: EnvoyStream) -> None:
        self._streams.pop(stream.stream_id, None)
        metrics.XDS_CONNECTED_ENVOYS.set(len(self._streams))
        self.mark_progress()
        event(log, "xds.stream_closed", node=stream.node_id, peer=stream.peer,
              protocol=stream.protocol)

    def next_nonce(self) -> str:
        """A nonce unique on this server (both protocols draw from one counter)."""
        return str(next(self._nonces))

    def note_node(self, stream: EnvoyStream, node_id: str) -> None:
        """The node id arrives in a stream's first request only
        (set_node_on_first_message_only)."""
        if not stream.node_id and node_id:
            stream.node_id = node_id
            event(log, "xds.stream_opened", node=stream.node_id, peer=stream.peer,
                  protocol=stream.protocol)

    # --- requests -----------------------------------------------------------------------

    def known_type(self, stream: EnvoyStream, node: str, type_url: str) -> bool:
        """Note the stream's node; False (logged) for a type torpor does not serve (both
        ADS variants ignore such a request)."""
        self.note_node(stream, node)
        if type_url in types.SHORT_NAMES:
            return True
        event(log, "xds.unknown_type", level=logging.WARNING, node=stream.node_id,
              type_url=type_url)
        return False

    def _on_request(self, stream: EnvoyStream, request: DiscoveryRequest) -> None:
        type_url = request.type_url
        if not self.known_type(stream, request.node.id, type_url):
            return
        ts = stream.types.get(type_url)
        kind = classify(
            request.response_nonce,
            request.HasField("error_detail"),
            ts.last_nonce if ts else None,
            ts.awaiting if ts else False,
        )
        label = types.short(type_url)
        if kind is RequestKind.STALE:
            metrics.XDS_STALE_NONCES.labels(type=label).inc()
            return
        if kind is RequestKind.INITIAL or ts is None:
            ts = stream.types[type_url] = TypeState(subscribed=None)
        if type_url not in types.WILDCARD_TYPES:
            names = set(request.resource_names)
            if names != ts.subscribed:
                ts.subscribed = names
                ts.clean_version = None  # something else is wanted: compare everything
        if kind is RequestKind.ACK:
            ts.acknowledged()
            metrics.XDS_ACKS.labels(type=label).inc()
        elif kind is RequestKind.NACK:
            self._on_nack(stream, ts, type_url, request)

    def _on_nack(self, stream: EnvoyStream, ts: TypeState, type_url: str,
                 request: DiscoveryRequest) -> None:
        """Envoy rejected our last response and keeps its last good config: remember that
        the rejected version must not be sent again, and go back to what it applied."""
        ts.awaiting = False
        ts.sent = ts.acked
        ts.clean_version = None
        self.report_rejection(stream, ts, type_url, request.error_detail.message,
                              request.version_info)

    def report_rejection(self, stream: EnvoyStream, ts: TypeState, type_url: str,
                         error: str, applied_version: str) -> None:
        """Envoy rejected `ts`'s last response (version `ts.sent_version`): remember it
        (that version is not sent again), log Envoy's words, count it and tell the
        `rejected` listeners (the quarantine)."""
        ts.nacked_version = ts.sent_version
        ts.last_error = error
        metrics.XDS_NACKS.labels(type=types.short(type_url)).inc()
        event(log, "xds.nack", level=logging.ERROR, node=stream.node_id,
              type=types.short(type_url), rejected_version=ts.nacked_version,
              applied_version=applied_version, error=error, protocol=stream.protocol)
        rejection = Rejection(stream.node_id or stream.peer, type_url, ts.nacked_version,
                              error)
        for listener in list(self._on_rejected):
            try:
                listener(rejection)
            except Exception:
                log.exception("xds.rejection_listener_failed")

    # --- responses ----------------------------------------------------------------------

    def _due_responses(self, stream: EnvoyStream) -> list[DiscoveryResponse]:
        """Responses this stream needs now, in CDS, EDS, LDS, RDS order.

        At most one response per type awaits an answer (go-control-plane's flow control):
        a type whose last response is unanswered gets nothing until the ACK/NACK.
        """
        snapshot = self._cache.snapshot()
        if snapshot is None:
            return []
        out = []
        for type_url in types.ADD_ORDER:
            ts = stream.types.get(type_url)
            if ts is None or ts.awaiting:
                continue
            if ts.nacked_version is not None and snapshot.version <= ts.nacked_version:
                continue
            known, due = self._due_from_changes(ts, type_url, snapshot)
            if not known:
                if ts.subscribed is not None:
                    ts.sent = immutables.Map(
                        {n: d for n, d in ts.sent.items() if n in ts.subscribed})
                due = updates_for(snapshot.of_type(type_url), ts.sent, ts.subscribed)
            ts.clean_version = snapshot.version
            if due is None:
                ts.synced_version = snapshot.version
                # A newer snapshot holds exactly what this Envoy applied (the refused
                # resource left out again): nothing to send, and nothing rejected now.
                ts.nacked_version = None
                ts.last_error = None
                continue
            if type_url == types.CLUSTER:
                _forget_endpoints_of_changed_clusters(stream, ts, due)
            out.append(self._respond(stream, ts, type_url, snapshot.version, due))
        return out

    @staticmethod
    def _due_from_changes(ts: TypeState, type_url: str, snapshot: Snapshot
                          ) -> tuple[bool, list[Resource] | None]:
        """(known, due): what a stream that holds exactly the previous snapshot needs,
        from the snapshot's own changes (an endpoint flip at 10k services: one resource,
        no comparison of every cluster); known False when they do not tell."""
        if ts.clean_version != snapshot.version - 1 or snapshot.changes is None:
            return False, None
        change = snapshot.changes.get(type_url)
        if not change:
            return True, None
        if ts.subscribed is None or change.removed & ts.subscribed:
            return False, None  # a wildcard type is sent whole: compare and send all
        resources = snapshot.of_type(type_url)
        due = [resources[n] for n in sorted(change.changed & ts.subscribed)
               if ts.sent.get(n) != resources[n].digest]
        return True, due or None

    def _respond(self, stream: EnvoyStream, ts: TypeState, type_url: str, version: int,
                 due: list[Resource]) -> DiscoveryResponse:
        nonce = self.next_nonce()
        if ts.subscribed is None:
            ts.sent = immutables.Map({r.name: r.digest for r in due})
        else:
            ts.sent = ts.sent.update({r.name: r.digest for r in due})
        ts.awaiting = True
        ts.last_nonce = nonce
        ts.sent_version = version
        stream.responses_sent += 1
        stream.resources_sent += len(due)
        stream.bytes_sent += sum(r.size for r in due)
        metrics.XDS_PUSHES.labels(type=types.short(type_url)).inc()
        response: DiscoveryResponse = DiscoveryResponse(
            version_info=str(version),
            resources=[r.body for r in due],
            type_url=type_url,
            nonce=nonce,
        )
        return response

    def mark_progress(self) -> None:
        """Wake `wait_synced` callers: some stream's state moved."""
        self._progress.set()
        self._progress = asyncio.Event()
        self._notify_applied()

    def _notify_applied(self) -> None:
        """Tell `applied` listeners, once per version, that every Envoy applied it."""
        snapshot = self._cache.snapshot()
        if (snapshot is None or snapshot.version == self._applied_version
                or not self._streams or self._behind(snapshot.version)):
            return
        self._applied_version = snapshot.version
        for listener in list(self._on_applied):
            try:
                listener(snapshot)
            except Exception:
                log.exception("xds.applied_listener_failed")


def _forget_endpoints_of_changed_clusters(
    stream: EnvoyStream, cds: TypeState, due: list[Resource]
) -> None:
    """A changed cluster is re-created by Envoy and warms until it gets its endpoints
    again: make sure the stream re-sends the ClusterLoadAssignment of every cluster whose
    definition changed, instead of leaving it to warm for initial_fetch_timeout."""
    eds = stream.types.get(types.ENDPOINT)
    if eds is None:
        return
    for resource in due:
        previous = cds.sent.get(resource.name)
        if previous is not None and previous != resource.digest:
            eds.sent = eds.sent.delete(resource.name) if resource.name in eds.sent \
                else eds.sent


async def serve_stream(
    ads: AdsServer, cache: SnapshotCache, requests: AsyncIterator[_Request], peer: str,
    protocol: str, request_type: type[_Request],
    on_request: Callable[[EnvoyStream, _Request], None],
    due: Callable[[EnvoyStream], Iterable[_Response]],
) -> AsyncIterator[_Response]:
    """One stream's life, for both ADS variants: never before the first snapshot is loaded;
    registered (counted by `wait_synced` and the metrics) while it lives; each request and
    each new snapshot is handled in arrival order, then whatever is due is sent."""
    await cache.wait_loaded()
    stream = ads.open_stream(peer, protocol)
    events: asyncio.Queue[_Request | Snapshot | None] = asyncio.Queue()
    cancel_watch = cache.create_watch(events.put_nowait)
    reader = asyncio.create_task(read_requests(requests, events))
    try:
        while (item := await events.get()) is not None:
            if isinstance(item, request_type):
                on_request(stream, item)
            for response in due(stream):
                yield response
            ads.mark_progress()
    finally:
        cancel_watch()
        reader.cancel()
        ads.close_stream(stream)


async def read_requests(
    requests: AsyncIterator[_Request],
    events: asyncio.Queue[_Request | Snapshot | None],
) -> None:
    """Move requests into the stream's event queue; None marks the end of the stream."""
    try:
        async for request in requests:
            events.put_nowait(request)
    except (grpc.aio.AioRpcError, asyncio.CancelledError):
        pass
    finally:
        events.put_nowait(None)


def _describe(stream: EnvoyStream, type_url: str, ts: TypeState) -> str:
    why = f" (NACK: {ts.last_error})" if ts.nacked_version is not None else ""
    return f"{stream.node_id or stream.peer} {types.short(type_url)} at v{ts.synced_version}{why}"


def _info(stream: EnvoyStream) -> StreamInfo:
    return StreamInfo(
        node_id=stream.node_id,
        peer=stream.peer,
        responses_sent=stream.responses_sent,
        nacks={
            types.short(t): ts.last_error or ""
            for t, ts in stream.types.items()
            if ts.nacked_version is not None
        },
        synced_versions={types.short(t): ts.synced_version for t, ts in stream.types.items()},
        protocol=stream.protocol,
        resources_sent=stream.resources_sent,
        bytes_sent=stream.bytes_sent,
    )
