"""A raw ADS client that stands in for one more Envoy on a control plane: subscribes like
Envoy does (CDS and LDS wildcard, EDS for every cluster, RDS for every route config its
listeners name), ACKs every response, and can be told to hold its ACKs, e.g. to play an
Envoy that is slow to apply a push. It records when it received and ACKed each response.

The control plane (xds_server/server.py) sends at most one unanswered response per type to
a stream, and counts a stream as having applied a snapshot version only once every type
it subscribed to is ACKed: while this client holds an ACK, `AdsServer.lagging` names it.

`DeltaAdsClient` does the same over delta ADS and records what each response carried.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Iterable

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)

from xds_server import types

HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager."
            "v3.HttpConnectionManager")


@dataclasses.dataclass
class Response:
    """One response the client received, and when it was received and ACKed (monotonic)."""

    type: str  # "cds", "eds", "lds", "rds"
    version: str
    nonce: str
    received_at: float
    #: For EDS: cluster name -> the "ip:port" of every endpoint in its assignment.
    endpoints: dict[str, set[str]] = dataclasses.field(default_factory=dict)
    acked_at: float | None = None


class AdsClient:
    """One ADS stream to `address` ("host:port") as node `node_id`. `start()`, `stop()`."""

    def __init__(self, address: str, node_id: str) -> None:
        self.address = address
        self.node_id = node_id
        self.responses: list[Response] = []
        self._acks_allowed = asyncio.Event()
        self._acks_allowed.set()
        self._outbox: asyncio.Queue[DiscoveryRequest | None] = asyncio.Queue()
        self._names: dict[str, list[str]] = {types.ENDPOINT: [], types.ROUTE: []}
        self._last: dict[str, DiscoveryResponse] = {}  # type URL -> last response received
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    # --- control ----------------------------------------------------------------------

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(
            self.address, options=[("grpc.enable_http_proxy", 0)])
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel)
        call = stub.StreamAggregatedResources(self._requests())
        for type_url in (types.CLUSTER, types.LISTENER):  # wildcard, as Envoy starts
            self._send(type_url, [])
        self._task = asyncio.create_task(self._run(call), name=f"ads-client-{self.node_id}")

    def hold_acks(self) -> None:
        """From now on, hold the ACK of every response received (the read loop waits)."""
        self._acks_allowed.clear()

    def release_acks(self) -> None:
        """ACK what is held, and every response after it."""
        self._acks_allowed.set()

    async def stop(self) -> None:
        """Close the stream (the control plane forgets this client) and the channel."""
        self.release_acks()
        self._outbox.put_nowait(None)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    # --- what it saw ------------------------------------------------------------------

    @property
    def held(self) -> Response | None:
        """The response whose ACK is being held now, if any."""
        pending = [r for r in self.responses if r.acked_at is None]
        return pending[0] if pending else None

    def last_endpoints(self, cluster: str) -> set[str] | None:
        """The endpoints of `cluster` in the newest EDS response that carried it."""
        for response in reversed(self.responses):
            if response.type == "eds" and cluster in response.endpoints:
                return response.endpoints[cluster]
        return None

    # --- the stream -------------------------------------------------------------------

    async def _requests(self) -> AsyncIterator[DiscoveryRequest]:
        while (request := await self._outbox.get()) is not None:
            yield request

    def _send(self, type_url: str, names: list[str]) -> None:
        """A request for `type_url`: an ACK of its last response (if any) that also names
        the resources wanted (EDS, RDS), as Envoy's requests do."""
        last = self._last.get(type_url)
        self._outbox.put_nowait(DiscoveryRequest(
            version_info=last.version_info if last else "",
            response_nonce=last.nonce if last else "",
            node=base_pb2.Node(id=self.node_id, cluster="torpor-test"),
            type_url=type_url,
            resource_names=names,
        ))

    async def _run(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            async for response in call:
                await self._on_response(response)
        except asyncio.CancelledError:
            call.cancel()
            raise
        except grpc.aio.AioRpcError as exc:
            self.error = exc

    async def _on_response(self, response: DiscoveryResponse) -> None:
        type_url = response.type_url
        seen = Response(types.short(type_url), response.version_info, response.nonce,
                        time.monotonic())
        if type_url == types.ENDPOINT:
            for any_ in response.resources:
                cla = endpoint_pb2.ClusterLoadAssignment.FromString(any_.value)
                seen.endpoints[cla.cluster_name] = {
                    f"{lb.endpoint.address.socket_address.address}:"
                    f"{lb.endpoint.address.socket_address.port_value}"
                    for group in cla.endpoints for lb in group.lb_endpoints}
        self.responses.append(seen)
        await self._acks_allowed.wait()
        self._last[type_url] = response
        if type_url == types.CLUSTER:
            self._send(type_url, [])
            self._want(types.ENDPOINT, sorted(_eds_names(response)))
        elif type_url == types.LISTENER:
            self._send(type_url, [])
            self._want(types.ROUTE, sorted(_route_config_names(response)))
        else:
            self._send(type_url, self._names[type_url])
        seen.acked_at = time.monotonic()

    def _want(self, type_url: str, names: list[str]) -> None:
        """Subscribe `type_url` to `names` when they changed (the request carries the last
        nonce of that type, so the control plane reads it as a subscription change)."""
        if names != self._names[type_url]:
            self._names[type_url] = names
            self._send(type_url, names)


def _eds_names(response: DiscoveryResponse) -> set[str]:
    names = set()
    for any_ in response.resources:
        cluster = cluster_pb2.Cluster.FromString(any_.value)
        if cluster.type == cluster_pb2.Cluster.EDS:
            names.add(cluster.eds_cluster_config.service_name or cluster.name)
    return names


def _route_config_names(response: DiscoveryResponse) -> set[str]:
    names = set()
    for any_ in response.resources:
        listener = listener_pb2.Listener.FromString(any_.value)
        chains = [*listener.filter_chains, listener.default_filter_chain]
        for chain in chains:
            for network_filter in chain.filters:
                config = network_filter.typed_config
                if config.type_url == HCM_TYPE:
                    hcm = hcm_pb2.HttpConnectionManager.FromString(config.value)
                    if hcm.HasField("rds"):
                        names.add(hcm.rds.route_config_name)
    return names


@dataclasses.dataclass
class DeltaResponse:
    """One delta response the client received: what it carried, as the server sent it."""

    type: str  # "cds", "eds", "lds", "rds"
    nonce: str
    versions: dict[str, str]  # name -> version of every resource it carried
    removed: list[str]
    bytes: int  # serialized size of the resources it carried
    received_at: float


class DeltaAdsClient:
    """One delta ADS stream (DeltaAggregatedResources) to `address` as node `node_id`,
    subscribing as Envoy does: CDS and LDS wildcard, EDS for every EDS cluster it holds,
    RDS for every route configuration its listeners name; every response ACKed (or
    NACKed while `nack_types` names its type). `initial`: type URL -> name -> version, what
    a reconnecting Envoy says it holds (initial_resource_versions). `holds` is what it
    holds now, per type URL."""

    def __init__(self, address: str, node_id: str,
                 initial: dict[str, dict[str, str]] | None = None) -> None:
        self.address = address
        self.node_id = node_id
        self.responses: list[DeltaResponse] = []
        self.holds: dict[str, dict[str, str]] = {
            t: dict((initial or {}).get(t, {})) for t in types.ADD_ORDER}
        self.nack_types: set[str] = set()
        self._bodies: dict[str, dict[str, bytes]] = {t: {} for t in types.ADD_ORDER}
        self._names: dict[str, set[str]] = {types.ENDPOINT: set(), types.ROUTE: set()}
        self._outbox: asyncio.Queue[DeltaDiscoveryRequest | None] = asyncio.Queue()
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(
            self.address, options=[("grpc.enable_http_proxy", 0),
                                   ("grpc.max_receive_message_length", 256 * 1024 * 1024)])
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel)
        call = stub.DeltaAggregatedResources(self._requests())
        for type_url in types.ADD_ORDER:
            held = self.holds[type_url]
            if type_url in types.WILDCARD_TYPES:
                self._put(type_url, initial=held)
            elif held:  # a reconnecting Envoy names what it held
                self._names[type_url] = set(held)
                self._put(type_url, subscribe=sorted(held), initial=held)
        self._task = asyncio.create_task(self._run(call), name=f"delta-client-{self.node_id}")

    async def stop(self) -> None:
        self._outbox.put_nowait(None)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def since(self, index: int, type_name: str | None = None) -> list[DeltaResponse]:
        """Responses received after the first `index` ones (of one type, if given)."""
        return [r for r in self.responses[index:] if type_name in (None, r.type)]

    def body(self, type_url: str, name: str) -> bytes | None:
        """The serialized resource `name` as last received."""
        return self._bodies[type_url].get(name)

    async def _requests(self) -> AsyncIterator[DeltaDiscoveryRequest]:
        while (request := await self._outbox.get()) is not None:
            yield request

    def _put(self, type_url: str, nonce: str = "", error: str | None = None,
             subscribe: list[str] | None = None, unsubscribe: list[str] | None = None,
             initial: dict[str, str] | None = None) -> None:
        request = DeltaDiscoveryRequest(
            node=base_pb2.Node(id=self.node_id, cluster="torpor-test"), type_url=type_url,
            response_nonce=nonce, resource_names_subscribe=subscribe or [],
            resource_names_unsubscribe=unsubscribe or [],
            initial_resource_versions=initial or {})
        if error is not None:
            request.error_detail.message = error
        self._outbox.put_nowait(request)

    async def _run(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            async for response in call:
                self._on_response(response)
        except asyncio.CancelledError:
            call.cancel()
            raise
        except grpc.aio.AioRpcError as exc:
            self.error = exc

    def _on_response(self, response: DeltaDiscoveryResponse) -> None:
        type_url = response.type_url
        self.responses.append(DeltaResponse(
            types.short(type_url), response.nonce,
            {r.name: r.version for r in response.resources}, list(response.removed_resources),
            sum(len(r.resource.value) for r in response.resources), time.monotonic()))
        if type_url in self.nack_types:
            self._put(type_url, nonce=response.nonce, error="rejected by the test")
            return
        held, bodies = self.holds[type_url], self._bodies[type_url]
        for name in response.removed_resources:
            held.pop(name, None)
            bodies.pop(name, None)
        for r in response.resources:
            held[r.name] = r.version
            bodies[r.name] = r.resource.value
        self._put(type_url, nonce=response.nonce)  # the ACK
        if type_url == types.CLUSTER:
            self._want(types.ENDPOINT, _eds_names_of(bodies.values()))
        elif type_url == types.LISTENER:
            self._want(types.ROUTE, _route_names_of(bodies.values()))

    def _want(self, type_url: str, names: set[str]) -> None:
        """Subscribe and unsubscribe what changed, as Envoy does when clusters or
        listeners come and go."""
        old = self._names[type_url]
        if names != old:
            self._names[type_url] = names
            for name in old - names:
                self.holds[type_url].pop(name, None)
            self._put(type_url, subscribe=sorted(names - old), unsubscribe=sorted(old - names))


def _eds_names_of(bodies: Iterable[bytes]) -> set[str]:
    names = set()
    for body in bodies:
        cluster = cluster_pb2.Cluster.FromString(body)
        if cluster.type == cluster_pb2.Cluster.EDS:
            names.add(cluster.eds_cluster_config.service_name or cluster.name)
    return names


def _route_names_of(bodies: Iterable[bytes]) -> set[str]:
    response = DiscoveryResponse()
    for body in bodies:
        response.resources.add(type_url=types.LISTENER, value=body)
    return _route_config_names(response)
