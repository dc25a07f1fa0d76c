"""Incremental (delta) ADS: `DeltaAggregatedResources`, beside state-of-the-world.

Owns: one delta stream per Envoy: its subscriptions (names, wildcard for CDS and LDS),
what it holds per resource (name -> digest; the digest's hex is the resource's version),
nonces, ACK/NACK. Sends only what changed: an endpoint flip is one ClusterLoadAssignment,
a removed resource is a name in `removed_resources`, and a reconnecting Envoy that lists
its `initial_resource_versions` gets only what differs. The decisions are the pure
functions of delta_protocol.py; this module only acts on them.

Shares with server.py (state-of-the-world) the cache and the stream registry of
`AdsServer`: a delta stream is an `EnvoyStream` there, with `DeltaTypeState` per type, so
that `wait_synced` (the publisher's ACK wait, hibernation's make-before-break),
`lagging`, `rejections` (/ready, the quarantine's NACK blame) and the connected-Envoy
metric treat both protocols alike. The same rules as state-of-the-world: at most one
response per type awaits its answer; a NACK is logged with Envoy's error, counted, handed
to the quarantine, and the rejected version is not sent again (a newer snapshot is).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator

import grpc
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
)
from envoy.service.discovery.v3.discovery_pb2 import Resource as ResourceMessage

from torpor import metrics
from xds_server import delta_protocol, types
from xds_server.cache import NO_CHANGES, Snapshot, SnapshotCache
from xds_server.delta_protocol import DeltaKind, DeltaUpdate, Subscription
from xds_server.server import AdsServer, EnvoyStream, TypeState, serve_stream

log = logging.getLogger("torpor.xds")


@dataclasses.dataclass
class DeltaTypeState(TypeState):
    """A delta stream's state for one type. Inherited: `sent` is what the stream holds
    once its pending response applies (name -> digest), `acked` what it acknowledged;
    `nacked_version`, `synced_version` as in state-of-the-world."""

    subscription: Subscription = dataclasses.field(default_factory=Subscription)
    pending: DeltaUpdate | None = None  # the response awaiting its ACK/NACK
    answered: bool = False  # a response of this type was sent on this stream
    # `sent` is exactly the subscribed part of this snapshot version (None: unknown, compare
    # every resource): the next version's changes alone say what to send.
    clean_version: int | None = None
    # Names subscribed since the last response while `sent` stayed clean: only these are
    # compared then (Envoy asking for one new cluster's endpoints among 10,000).
    added: set[str] = dataclasses.field(default_factory=set)


class DeltaAds:
    """The delta half of the ADS servicer (serving.py registers both halves as one)."""

    def __init__(self, ads: AdsServer, cache: SnapshotCache) -> None:
        self._ads = ads
        self._cache = cache

    async def DeltaAggregatedResources(
        self,
        request_iterator: AsyncIterator[DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[DeltaDiscoveryResponse]:
        async for response in serve_stream(self._ads, self._cache, request_iterator,
                                           context.peer(), "delta", DeltaDiscoveryRequest,
                                           self._on_request, self._due_responses):
            yield response

    # --- requests -----------------------------------------------------------------------

    def _on_request(self, stream: EnvoyStream, request: DeltaDiscoveryRequest) -> None:
        type_url = request.type_url
        if not self._ads.known_type(stream, request.node.id, type_url):
            return
        ts = stream.types.get(type_url)
        if not isinstance(ts, DeltaTypeState):
            # The first request for the type: what a reconnecting Envoy holds already.
            ts = DeltaTypeState(subscribed=None)
            ts.sent = delta_protocol.known_versions(request.initial_resource_versions)
            ts.acked = ts.sent
            stream.types[type_url] = ts
            current = None
        else:
            current = ts.subscription
        # Subscription changes apply whatever the nonce says (Envoy may carry them on an ACK).
        subscription = delta_protocol.subscribe(
            current, request.resource_names_subscribe, request.resource_names_unsubscribe,
            type_url in types.WILDCARD_TYPES)
        if subscription is not current:
            if current is None or subscription.wildcard != current.wildcard:
                ts.clean_version = None  # something new is wanted: compare everything once
            else:  # names added (and dropped: `held_after` forgets those)
                ts.added |= subscription.names - current.names
            ts.subscription = subscription
            ts.subscribed = None if subscription.wildcard else set(subscription.names)
            ts.sent = delta_protocol.held_after(ts.sent, subscription)
            ts.acked = delta_protocol.held_after(ts.acked, subscription)
        kind = delta_protocol.classify(request.response_nonce, request.HasField("error_detail"),
                                       ts.last_nonce if ts.awaiting else None)
        label = types.short(type_url)
        if kind is DeltaKind.STALE:
            metrics.XDS_STALE_NONCES.labels(type=label).inc()
        elif kind is DeltaKind.ACK:
            ts.acknowledged()
            ts.pending = None
            metrics.XDS_ACKS.labels(type=label).inc()
        elif kind is DeltaKind.NACK:
            self._on_nack(stream, ts, type_url, request)

    def _on_nack(self, stream: EnvoyStream, ts: DeltaTypeState, type_url: str,
                 request: DeltaDiscoveryRequest) -> None:
        """Envoy rejected the pending response and keeps its last good config: it holds
        what it acknowledged for every name the response touched."""
        ts.clean_version = None
        if ts.pending is not None:
            ts.sent = delta_protocol.held_after(
                delta_protocol.rejected(ts.sent, ts.acked, ts.pending), ts.subscription)
        ts.pending = None
        ts.awaiting = False
        # A delta request has no version_info: the last version this type applied.
        self._ads.report_rejection(stream, ts, type_url, request.error_detail.message,
                                   str(ts.synced_version))

    # --- responses ----------------------------------------------------------------------

    def _due_responses(self, stream: EnvoyStream) -> list[DeltaDiscoveryResponse]:
        """Responses this stream needs now, in CDS, EDS, LDS, RDS order; at most one per
        type awaits an answer, and nothing of a type is sent while the current snapshot is
        the one it rejected."""
        snapshot = self._cache.snapshot()
        if snapshot is None:
            return []
        out = []
        for type_url in types.ADD_ORDER:
            ts = stream.types.get(type_url)
            if not isinstance(ts, DeltaTypeState) or ts.awaiting:
                continue
            if ts.nacked_version is not None and snapshot.version <= ts.nacked_version:
                continue
            update = _update(snapshot, type_url, ts)
            ts.clean_version = snapshot.version
            if update is None:
                ts.synced_version = snapshot.version
                ts.nacked_version = None  # a newer snapshot holds what it applied
                ts.last_error = None
                continue
            if type_url == types.CLUSTER:
                _forget_endpoints_of_changed_clusters(stream, ts, update)
            out.append(self._respond(stream, ts, type_url, snapshot.version, update))
        return out

    def _respond(self, stream: EnvoyStream, ts: DeltaTypeState, type_url: str, version: int,
                 update: DeltaUpdate) -> DeltaDiscoveryResponse:
        nonce = self._ads.next_nonce()
        ts.pending = update
        ts.answered = True
        ts.sent = delta_protocol.applied(ts.sent, update)
        ts.awaiting = True
        ts.last_nonce = nonce
        ts.sent_version = version
        stream.responses_sent += 1
        stream.resources_sent += len(update.changed) + len(update.removed)
        stream.bytes_sent += sum(r.size for r in update.changed)
        metrics.XDS_PUSHES.labels(type=types.short(type_url)).inc()
        response: DeltaDiscoveryResponse = DeltaDiscoveryResponse(
            system_version_info=str(version),
            type_url=type_url,
            nonce=nonce,
            removed_resources=update.removed,
            resources=[ResourceMessage(name=r.name, version=r.version, resource=r.body)
                       for r in update.changed],
        )
        return response


def _update(snapshot: Snapshot, type_url: str, ts: DeltaTypeState) -> DeltaUpdate | None:
    """What `ts`'s stream needs of `snapshot`: from the snapshot's changes when the stream
    holds exactly the previous version, else by comparing every subscribed resource."""
    resources = snapshot.of_type(type_url)
    added, ts.added = ts.added, set()
    if ts.clean_version == snapshot.version:
        return delta_protocol.updates_for(added, resources, ts.sent)
    if (ts.clean_version is not None and ts.clean_version == snapshot.version - 1
            and snapshot.changes is not None and ts.answered):
        change = snapshot.changes.get(type_url, NO_CHANGES)
        return delta_protocol.merged(
            delta_protocol.updates_from_changes(change, resources, ts.sent, ts.subscription),
            delta_protocol.updates_for(added, resources, ts.sent))
    return delta_protocol.delta_updates(resources, ts.sent, ts.subscription,
                                        first=not ts.answered)


def _forget_endpoints_of_changed_clusters(stream: EnvoyStream, cds: DeltaTypeState,
                                          update: DeltaUpdate) -> None:
    """A changed cluster is re-created by Envoy and warms until it gets its endpoints
    again (as in server.py): send the ClusterLoadAssignment of every cluster whose
    definition changed once more, instead of leaving it to warm for initial_fetch_timeout."""
    eds = stream.types.get(types.ENDPOINT)
    if eds is None:
        return
    for resource in update.changed:
        previous = cds.sent.get(resource.name)
        if previous is not None and previous != resource.digest:
            if resource.name in eds.sent:
                eds.sent = eds.sent.delete(resource.name)
            if isinstance(eds, DeltaTypeState):
                eds.clean_version = None
