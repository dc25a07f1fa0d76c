"""The service table → Envoy resources (Listener, RouteConfiguration, Clusters, CLAs).

Owns: what torpor's Envoy config looks like. Must not know about streams or versions.
Built resources are cached per service and rebuilt only when that service's inputs change
(measured: rebuilding 10k services' protos blocks the loop ~200 ms). A service's cluster,
ClusterLoadAssignment and virtual host are rendered from the shape of the first service
built from the same inputs but its names (`shape_of`, validation.Shape): the builders
below must use a service's name, hosts and endpoint addresses only inside strings, and
put whatever else of them shapes a resource in `shape_of`'s key (a wildcard host).

Shape: one listener whose HTTP connection manager takes its routes from RDS and sends its
catch-all log to the control plane; one RouteConfiguration with a virtual host per routed
service (matched on Host) and a catch-all virtual host to the activator; one EDS cluster
per routed service, named after it; the activator cluster, also EDS over ADS, whose
ClusterLoadAssignment lists every activator replica (fleet mode: several activators).
Hibernating a service changes only its ClusterLoadAssignment (to the activators'
addresses, `activator_targets`), never its route or cluster; an activator replica coming
or going (`set_activators`) changes only the activator's CLA here, and the CLAs of the
hibernated services once the caller rebuilds them with the new targets.

Failover: every route retries, on another host (previous_hosts), a request that never
reached an upstream (connect failure, refused stream, reset before the request was sent)
and the activator's "replay me" answer to a held HTTP/2 request. A request whose upstream
reset it after it was sent but before any response header (a replica or an activator
replica that died holding it) may have run there, so it is replayed only for idempotent
methods (`IDEMPOTENT_METHODS`), or for every method when the service opts in
(`retry_non_idempotent`): a POST is never executed twice unless the service says it may.
A replay needs the body to have fit the virtual host's request body buffer
(`retry_buffer_bytes`); Envoy does not retry a request whose body outgrew that buffer, the
client gets the error instead.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import gc
import hashlib
import re
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import TypeVar

import immutables
from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    backoff_pb2,
    base_pb2,
    config_source_pb2,
    grpc_service_pb2,
    http_uri_pb2,
    protocol_pb2,
    substitution_format_string_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.filters.http.api_key_auth.v3 import api_key_auth_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_authn_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import (
    local_rate_limit_pb2 as local_ratelimit_pb2,
)
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2, token_bucket_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message

from torpor.async_calls import PREFER_HEADER, RESPOND_ASYNC, STATUS_PATH
from torpor.edge import EdgeLimits
from torpor.model import Endpoint, is_ip_literal
from torpor.routes import ROOT, SERVICE_HEADER, VERSION_HEADER
from xds_server import types, validation
from xds_server.cache import Desired, Resource
from xds_server.wire import length_delimited

LISTENER_NAME = "torpor_http"
ROUTE_CONFIG_NAME = "torpor_routes"
ACTIVATOR_CLUSTER = "torpor_activator"
#: The bootstrap's static cluster to the control plane; it carries ADS and access logs.
CONTROL_PLANE_CLUSTER = "torpor_xds"
CATCH_ALL_VHOST = "torpor_catch_all"
#: With `routing: host_header`, the `*` virtual host that routes by the request's Host.
HOST_VHOST = "torpor_by_host"
#: Response header by which the activator's HTTP/2 holder asks Envoy to replay a held
#: request (retry_on: retriable-headers) once the service's endpoints are back.
RETRY_HEADER = "x-torpor-retry"
_HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
#: Methods whose repetition has the effect of one call (RFC 9110 9.2.2): replayed after a reset.
IDEMPOTENT_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE")
#: Always safe to replay: the request never reached an upstream, or the activator asks for it.
SAFE_RETRY_ON = "connect-failure,refused-stream,reset-before-request,retriable-headers"
#: The activator's replay marker: only its HTTP/2 holder sends it, so only the routes of
#: HTTP/2 services look for it (measured: matching it costs every request ~2.8k
#: instructions of Envoy's).
REPLAY_MARKER_RETRY = "retriable-headers"
#: Also replays a request an upstream reset after it was sent (before any response header).
RESET_RETRY_ON = SAFE_RETRY_ON + ",reset"
#: Envoy's default stream idle timeout (5 min), set on every route: the listener's own
#: stream_idle_timeout is the header timeout (`_listener`).
STREAM_IDLE_TIMEOUT = 300.0


@dataclasses.dataclass(frozen=True)
class ApiKeys:
    """Callers of a service show one of these keys in `x-api-key` (client, key)."""

    credentials: tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class JwksHost:
    """A host Envoy fetches JWKS from: one cluster of torpor's own per host (`cluster`),
    shared by every provider whose URL names it, there while one is."""

    host: str  # a DNS name (STRICT_DNS) or an IP address (STATIC)
    port: int
    # https: the PEM CA certificates its certificate is checked against, and which file
    # they came from ("" for the system's); None: plain http.
    ca: str | None = None
    ca_file: str = ""

    @property
    def cluster(self) -> str:
        """`torpor_jwks_<host>_<port>_<digest>`: a service name has no `_`, so it never
        clashes with a service's cluster; the digest tells apart hosts that only differ in
        a character the name cannot keep, and http from https or another CA file."""
        seed = "\0".join((self.host, str(self.port), str(self.ca is not None), self.ca_file))
        digest = hashlib.sha256(seed.encode()).hexdigest()[:8]
        return f"{JWKS_CLUSTER_PREFIX}{_NOT_IN_NAME.sub('_', self.host)}_{self.port}_{digest}"


@dataclasses.dataclass(frozen=True)
class RemoteJwks:
    """A JWKS Envoy fetches from `url` on `host` itself: before the listener serves (so no
    request waits for it), again every `cache` seconds, each try within `timeout`."""

    url: str
    host: JwksHost
    cache: float
    timeout: float


@dataclasses.dataclass(frozen=True)
class JwtRule:
    """Callers of a service show a JWT of `issuer` (for one of `audiences`, any when
    empty) signed by a key of the JWKS `jwks` (its text) or, when `remote` is set, of the
    JWKS Envoy fetches; as `Authorization: Bearer`."""

    provider: str
    issuer: str
    audiences: tuple[str, ...]
    jwks: str
    remote: RemoteJwks | None = None


RouteAuth = ApiKeys | JwtRule
#: What a service may need of the listener's HTTP filters (`_features_of`).
RATE_LIMITED, API_KEYS = "rate_limit", "api_keys"
Feature = str | JwtRule
API_KEY_HEADER = "x-api-key"
API_KEY_FILTER = "envoy.filters.http.api_key_auth"
JWT_FILTER = "envoy.filters.http.jwt_authn"
#: The clusters to JWKS hosts (JwksHost.cluster).
JWKS_CLUSTER_PREFIX = "torpor_jwks_"
_NOT_IN_NAME = re.compile(r"[^a-z0-9-]")
#: A JWKS fetch that failed is tried again this often (Envoy's route retry policy, on
#: 5xx, a reset or a failed connection), backing off from 0.5 s to 5 s.
JWKS_FETCH_RETRIES = 2


def _features_of(service: RoutedService) -> tuple[Feature, ...]:
    out: list[Feature] = []
    if service.rate_limit is not None:
        out.append(RATE_LIMITED)
    out.extend(_auth_features(service.auth))
    return tuple(out)


def _auth_features(auth: RouteAuth | None) -> tuple[Feature, ...]:
    if isinstance(auth, ApiKeys):
        return (API_KEYS,)
    if isinstance(auth, JwtRule):
        return (auth,)
    return ()


@dataclasses.dataclass(frozen=True)
class ListenerTls:
    """The listener's TLS: the SDS secret served by default, those chosen by SNI (server
    names → secret), and whether HTTP/2 is offered (ALPN)."""

    default_secret: str = "torpor_gateway_cert"
    sni: tuple[tuple[tuple[str, ...], str], ...] = ()
    http2: bool = True


@dataclasses.dataclass(frozen=True)
class GatewaySettings:
    """Everything about the generated config that is not per service."""

    listen: Endpoint
    # Every activator replica's HTTP/1 holder: the catch-all's cluster, and where hibernated
    # services point. Sorted and de-duplicated on construction; empty means "no activator
    # reachable" (Envoy then answers 503 no healthy upstream for those routes).
    activators: tuple[Endpoint, ...] = ()
    # Route timeout: must outlast a cold start (wake_timeout) plus the proxied request.
    route_timeout: float = 150.0
    connect_timeout: float = 1.0
    # Circuit-breaker thresholds of clusters that can point at the activator: above the
    # number of requests the activator may hold for one service (default Envoy: 1,024).
    max_requests: int = 4096
    retries: int = 2
    # Every activator replica's HTTP/2 (h2c) holder, for services whose replicas speak
    # HTTP/2. Empty: such services fall back to the HTTP/1 set (see activator_targets).
    activators_h2: tuple[Endpoint, ...] = ()
    # Request bodies up to this size are buffered by Envoy so that a retry (e.g. after an
    # activator replica died holding the request) can replay them; larger bodies are
    # streamed and not retried (Envoy's behaviour). Above the listener's 1 MiB default it
    # raises the stream's buffer too (measured: at 4 MiB a 2 MB body was replayed).
    retry_buffer_bytes: int = 1_048_576
    # Header size and count limits, header timeout (torpor/edge.py): the activator's
    # aiohttp server is built from the same values.
    edge: EdgeLimits = dataclasses.field(default_factory=EdgeLimits)
    # TLS on the listener: None for plain HTTP.
    tls: ListenerTls | None = None
    # Asynchronous calls (Prefer: respond-async) on: every virtual host routes their status
    # path and the preference to the activator.
    async_calls: bool = True
    # Envoy's per-service answer classes (the router's dynamic statistics, `_router`):
    # off by default, they cost ~5 % of a warm request.
    upstream_code_stats: bool = False
    # How Envoy finds a service (config gateway.routing): "virtual_hosts", or
    # "host_header": a service `host_routed` is the cluster its request's Host names.
    routing: str = "virtual_hosts"

    def __post_init__(self) -> None:
        object.__setattr__(self, "activators", _endpoint_set(self.activators))
        object.__setattr__(self, "activators_h2", _endpoint_set(self.activators_h2))


RouteKey = tuple[str, tuple[str, ...], tuple[str, ...], "str | None", bool,
                 "tuple[int, int] | None", "RouteAuth | None", tuple[tuple[str, int], ...],
                 bool, "float | None"]


def route_key(service: RoutedService) -> RouteKey:
    """What of a service its routes are built from (an endpoint flip changes none)."""
    return (service.host, service.hosts, service.paths, service.rewrite,
            service.retry_non_idempotent, service.rate_limit, service.auth, service.split,
            service.http2, service.route_timeout)


def _cluster_key(service: RoutedService) -> tuple[bool, int | None]:
    """What of a service its cluster is built from."""
    return service.http2, service.max_concurrent


#: A host Envoy can find a service's cluster by (`host_routed`): lower-case DNS labels,
#: at least two. A dot: a service name has none, so a host-named cluster never takes
#: another service's cluster name. Only such characters: the host is then a valid virtual
#: host domain by construction, and the service's own virtual host, which Envoy never
#: gets, need not be checked (anything else keeps its virtual host, checked with words).
_PLAIN_HOST = re.compile(r"[a-z0-9-]+(?:\.[a-z0-9-]+)+")


def host_routed(service: RoutedService, gateway_auth: RouteAuth | None = None) -> bool:
    """Whether, with `routing: host_header`, Envoy reaches `service` as the cluster named
    by the request's Host (no virtual host of its own): a service whose routes are the
    gateway's defaults (who may call it too: `gateway_auth`, what gateway.auth asks), on
    one exact plain host (`_PLAIN_HOST`)."""
    auth = service.auth
    return (not service.hosts and not service.paths and service.rewrite is None
            and service.rate_limit is None and (auth is gateway_auth or auth == gateway_auth)
            and not service.split
            and service.version_of is None and service.route_timeout is None
            and not service.retry_non_idempotent and not service.http2
            and _PLAIN_HOST.fullmatch(service.host) is not None)


@dataclasses.dataclass(frozen=True)
class RoutedService:
    """One service as Envoy sees it: its Host, and where its cluster's traffic goes now."""

    name: str
    host: str
    endpoints: tuple[Endpoint, ...]
    http2: bool = False  # its cluster speaks HTTP/2 (h2c) to replicas and activator alike
    # Replay every method after an upstream reset, not only idempotent ones.
    retry_non_idempotent: bool = False
    # (requests per second, burst): Envoy's local rate limit on its virtual host.
    rate_limit: tuple[int, int] | None = None
    # Requests in flight at once (its cluster's circuit breaker); None: the gateway's.
    max_concurrent: int | None = None
    # More hosts (exact or "*.suffix"), path prefixes (empty: every path) and what the
    # matched prefix is rewritten to (torpor/routes.py).
    hosts: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    rewrite: str | None = None
    # Who may call it, checked by Envoy before routing (None: anyone).
    auth: RouteAuth | None = None
    # A version of service `version_of` (its cluster; routed with its siblings), and its
    # weight now; and, for the route of a service with versions, (cluster, weight) each.
    version_of: str | None = None
    weight: int = 0
    split: tuple[tuple[str, int], ...] = ()
    # Its routes' timeout when its wake outlasts the gateway's route_timeout (None: that).
    route_timeout: float | None = None

    def all_hosts(self) -> tuple[str, ...]:
        return (self.host, *self.hosts)

    def prefixes(self) -> tuple[str, ...]:
        return self.paths or (ROOT,)


#: Updates of at least this many services run with the cyclic garbage collector paused.
GC_PAUSE_AT = 256
_Builder = TypeVar("_Builder")


def pausing_gc(update: Callable[[_Builder, Mapping[str, RoutedService | None]], None]
               ) -> Callable[[_Builder, Mapping[str, RoutedService | None]], None]:
    """`update` of many services (a first load) without the cyclic collector: what it
    allocates is the table's resources, which live on, and which each collection walked
    again (measured at 10k services: a quarter of the quarantine's first build). Cycles it
    leaves are collected after it, as usual; the control plane then freezes the table out
    of the collector's generations (control_plane.py)."""

    @functools.wraps(update)
    def paused(self: _Builder, services: Mapping[str, RoutedService | None]) -> None:
        with collector_paused(len(services) >= GC_PAUSE_AT):
            update(self, services)

    return paused


@contextlib.contextmanager
def collector_paused(pause: bool) -> Iterator[None]:
    """The cyclic garbage collector off inside (if `pause` and it was on)."""
    if not pause or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class ResourceBuilder:
    """Builds the resource maps for a service table, reusing what did not change.

    Incremental: `update` takes the services that changed (a flip: one), `desired` hands
    out the whole config as persistent maps together with the names touched since the
    last hand-out, so that a push costs what changed, not the size of the table. `build`
    is the whole-table form (first load, tests)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self._shapes: dict[str, RoutedService] = {}  # what is built now, by name
        # name -> (host and retry choice it was built for, its VirtualHost serialized)
        self._vhost_serialized: dict[str, tuple[tuple[RouteKey, bool], bytes]] = {}
        # Resources by shape (`shape_of`): a service's resource is rendered from the
        # Shape of its kind with its names, not built (None: a shape that renders wrong).
        self._shapes_by_key: dict[Hashable, validation.Shape | None] = {}
        self._seen_once: set[Hashable] = set()  # shape keys of one service so far
        self._shapes_settings = settings
        self._last_shape_of: dict[str, tuple[RoutedService,
                                             tuple[Hashable, tuple[str, ...]]]] = {}
        self._clusters: dict[str, tuple[tuple[tuple[bool, int | None], str,
                                              tuple[Endpoint, ...]], Resource]] = {}
        # service -> its cluster's name, where that is not the service's (`cluster_name`)
        self._cluster_names: dict[str, str] = {}
        self._last_by_host: tuple[RoutedService, bool] | None = None
        # What gateway.auth asks of callers (`set_gateway_auth`): with host_header, the
        # by-Host virtual host asks it, and a service that asks the same is found by Host.
        self._gateway_auth: RouteAuth | None = None
        self._recheck_all = False
        # What services need of the listener's filters (`_note_features`).
        self._feature_of: dict[str, tuple[Feature, ...]] = {}
        self._features: collections.Counter[Feature] = collections.Counter()
        self._listener_features: frozenset[Feature] = frozenset()
        self._jwks_hosts: dict[str, JwksHost] = {}  # by cluster name (`_note_jwks_hosts`)
        # name -> (endpoints it was built for, its ClusterLoadAssignment)
        self._endpoints: dict[str, tuple[tuple[Endpoint, ...], Resource]] = {}
        self._static = {
            types.LISTENER: {LISTENER_NAME: Resource.pack(LISTENER_NAME, self._listener())},
        }
        # The activator cluster never changes (EDS); the activator set lives in its CLA.
        self._activator = Resource.pack(ACTIVATOR_CLUSTER, self._activator_cluster())
        self._activator_endpoints = self._activator_load_assignment()
        self._maps: dict[str, immutables.Map[str, Resource]] = {
            types.CLUSTER: immutables.Map({ACTIVATOR_CLUSTER: self._activator}),
            types.ENDPOINT: immutables.Map({ACTIVATOR_CLUSTER: self._activator_endpoints}),
            types.LISTENER: immutables.Map(self._static[types.LISTENER]),
            types.ROUTE: immutables.Map(),
            types.SECRET: immutables.Map(),
        }
        self._touched: dict[str, set[str]] = {t: set() for t in self._maps}
        self._routes_stale = True
        # Serialized virtual hosts by name: a service's own (its hosts that no other service
        # shares), and "@host" for a host several services share (each under its paths).
        self._vhost_fields: dict[str, tuple[object, bytes]] = {}
        self._host_members: dict[str, set[str]] = {}  # host -> route units reached under it
        # Route units: what a virtual host routes to, by name: a service, or a service
        # with versions (one route, weighted over its versions' clusters).
        self._units: dict[str, RoutedService] = {}
        self._unit_members: dict[str, set[str]] = {}  # service with versions -> versions
        self._catch_all_timeout: float | None = None  # None: settings.route_timeout
        self._catch_all_bytes = self._catch_all().SerializeToString(deterministic=True)
        self._handed_out = False  # before the first hand-out nothing is known to Envoy

    def set_catch_all_timeout(self, timeout: float | None) -> None:
        """The catch-all's route timeout: the longest wake of a service that outlasts the
        gateway's route_timeout (it may be evicted: then the catch-all reaches it), or
        None for the gateway's."""
        if timeout != self._catch_all_timeout:
            self._catch_all_timeout = timeout
            self._catch_all_bytes = self._catch_all().SerializeToString(deterministic=True)
            self._routes_stale = True

    def set_gateway_auth(self, auth: RouteAuth | None) -> None:
        """What gateway.auth asks of callers now (credentials.py; its files change). With
        host_header the by-Host virtual host asks it, and which services it reaches (those
        that ask the same) may change: every service is looked at again."""
        if auth is self._gateway_auth or auth == self._gateway_auth:
            return
        self._gateway_auth = auth
        if self.settings.routing != "host_header":
            return
        self._last_by_host = None
        self._last_shape_of.clear()  # shapes of the last service asked, by the old answer
        self._catch_all_bytes = self._catch_all().SerializeToString(deterministic=True)
        self._routes_stale = True
        self._refresh_listener()
        self._recheck_all = True  # the next `update` looks at every service

    def set_activators(self, http1: tuple[Endpoint, ...], h2: tuple[Endpoint, ...]) -> bool:
        """Replace the activator replicas (fleet mode: they come and go). True if the set
        changed. Rebuilds only the activator's CLA; the caller must rebuild the table with
        the new `activator_targets` so hibernated services follow."""
        new = dataclasses.replace(self.settings, activators=http1, activators_h2=h2)
        if (new.activators, new.activators_h2) == (self.settings.activators,
                                                    self.settings.activators_h2):
            return False
        http1_changed = new.activators != self.settings.activators
        self.settings = new
        if http1_changed:
            self._activator_endpoints = self._activator_load_assignment()
            self._put(types.ENDPOINT, {ACTIVATOR_CLUSTER: self._activator_endpoints})
        return True

    def activator_targets(self, http2: bool) -> tuple[Endpoint, ...]:
        """Where a hibernated service's cluster points now: the HTTP/2 holders for a service
        that speaks HTTP/2, else (or when no replica has one) the HTTP/1 holders."""
        s = self.settings
        if http2 and s.activators_h2:
            return s.activators_h2
        return s.activators

    def build(self, services: Iterable[RoutedService]) -> Mapping[str, Mapping[str, Resource]]:
        """Every resource type for exactly this service table (the first load, tests)."""
        new = {s.name: s for s in services}
        gone: dict[str, RoutedService | None] = {n: None for n in self._shapes if n not in new}
        self.update({**gone, **new})
        return self.desired().resources

    @pausing_gc
    def update(self, services: Mapping[str, RoutedService | None]) -> None:
        """Rebuild the resources of these services (None: the service left the table);
        every other service's resources are kept as they are (all of them are looked at
        again once after gateway.auth changed, `set_gateway_auth`)."""
        if self._recheck_all:
            self._recheck_all = False
            services = {**self._shapes, **services}
        clusters: dict[str, Resource | None] = {}
        endpoints: dict[str, Resource | None] = {}
        units: set[str] = set()  # route units (a service, or a service with versions) touched
        for name, svc in services.items():
            old = self._shapes.get(name)
            for shape in (old, svc):
                if shape is not None:
                    units.add(shape.version_of or shape.name)
            if svc is None:
                if old is not None:
                    del self._shapes[name]
                    self._leave_unit(old)
                    self._note_features(name, None)
                    self._forget(name)
                    self._release(self._cluster_names.pop(name, name), clusters, endpoints)
                continue
            if old is not None and old.version_of != svc.version_of:
                self._leave_unit(old)
            self._shapes[name] = svc
            if svc.version_of is not None:
                self._unit_members.setdefault(svc.version_of, set()).add(name)
            self._note_features(name, svc)
            cluster = self.cluster_name(svc)
            before = self._cluster_names.pop(name, name)
            if cluster != name:
                self._cluster_names[name] = cluster
            if before != cluster and old is not None:  # renamed (its routes changed)
                self._release(before, clusters, endpoints)
            clusters[cluster] = self._cluster(svc)
            # A cluster found by Host holds its endpoints (STATIC, `_cluster_proto`).
            endpoints[cluster] = None if self._by_host(svc) else self._load_assignment(
                cluster, svc.endpoints)
        for unit in units:
            self._refresh_unit(unit)
        self._put(types.CLUSTER, clusters)
        self._put(types.ENDPOINT, endpoints)

    def _release(self, cluster: str, clusters: dict[str, Resource | None],
                 endpoints: dict[str, Resource | None]) -> None:
        """Remove the cluster (and endpoints) `cluster` a service no longer has, unless a
        service earlier in the same update took that name (a host-named one: a service
        renamed on its host, hosts moved between services; `cluster_name`)."""
        if clusters.get(cluster) is None:
            clusters[cluster] = endpoints[cluster] = None
            self._endpoints.pop(cluster, None)

    def _leave_unit(self, service: RoutedService) -> None:
        if service.version_of is not None:
            members = self._unit_members.get(service.version_of, set())
            members.discard(service.name)
            if not members:
                self._unit_members.pop(service.version_of, None)

    def _refresh_unit(self, name: str) -> None:
        """What Envoy routes as `name` now: the service, or for a service with versions
        one route whose clusters are its versions', weighted (`split`)."""
        old = self._units.get(name)
        members = sorted(self._unit_members.get(name, ()))
        if members:
            versions = [self._shapes[m] for m in members]
            split = tuple((v.name, v.weight) for v in versions)
            if not any(w for _, w in split):
                # The versions with traffic are not routed (evicted, quarantined): the
                # routed ones share it rather than Envoy refusing a split of nothing.
                split = tuple((v, 1) for v, _ in split)
            unit: RoutedService | None = dataclasses.replace(
                versions[0], name=name, endpoints=(), version_of=None, weight=0,
                split=split, route_timeout=max(
                    (v.route_timeout for v in versions if v.route_timeout is not None),
                    default=None))
        else:
            unit = self._shapes.get(name)
            if unit is not None and unit.version_of is not None:
                unit = None  # a version is routed by its service's unit, not as its own
        if unit is None:
            if old is not None:
                del self._units[name]
                hidden = self._hidden(old)
                self._leave_hosts(old)
                self._routes_stale |= not hidden
            return
        self._units[name] = unit
        if old is None or route_key(old) != route_key(unit):
            hidden = old is None or self._hidden(old)
            self._leave_hosts(old)
            for host in unit.all_hosts():
                self._host_members.setdefault(host, set()).add(name)
            self._routes_stale |= not (hidden and self._hidden(unit))

    def _hidden(self, unit: RoutedService) -> bool:
        """Whether `unit` is in no virtual host (`routing: host_header`: `host_routed`,
        alone on its host): its coming, going or changing between such shapes leaves the
        route table as it is (no rebuild of it, nothing touched)."""
        return self._by_host(unit) and self._host_members.get(unit.host) == {unit.name}

    def set_certificates(self, certificates: Mapping[str, tuple[bytes, bytes]]) -> None:
        """The listener's certificates by SDS secret name: (PEM chain, PEM key). Only a
        changed one is sent again; Envoy swaps it in for new connections."""
        current = self._maps[types.SECRET]
        self._put(types.SECRET, {
            **{name: Resource.pack(name, _secret(name, chain, key))
               for name, (chain, key) in certificates.items()},
            **{name: None for name in current if name not in certificates}})

    def _leave_hosts(self, service: RoutedService | None) -> None:
        if service is None:
            return
        for host in service.all_hosts():
            members = self._host_members.get(host)
            if members is not None:
                members.discard(service.name)
                if not members:
                    del self._host_members[host]

    def _note_features(self, name: str, service: RoutedService | None) -> None:
        """Keep count of what services need of the listener's HTTP filters (a rate limit,
        API keys, a JWT provider); when that set changes (the first user in, the last one
        out, a JWKS renewed) the listener is rebuilt. Nothing per request for features
        nobody uses."""
        old = self._feature_of.pop(name, ())
        new = _features_of(service) if service is not None else ()
        if not old and not new:
            return  # nothing asked of the listener, before or now (most services)
        self._features.subtract(old)
        if new:
            self._feature_of[name] = new
            self._features.update(new)
        self._refresh_listener()

    def _refresh_listener(self) -> None:
        """The listener again when the filters in use changed: those the services ask for,
        and, with host_header, those of gateway.auth (the by-Host virtual host's)."""
        used = frozenset(f for f, count in self._features.items() if count > 0)
        if self.settings.routing == "host_header" and self._gateway_auth is not None:
            used |= frozenset(_auth_features(self._gateway_auth))
        if used != self._listener_features:
            self._listener_features = used
            self._put(types.LISTENER, {LISTENER_NAME: Resource.pack(
                LISTENER_NAME, self._listener(used))})
            self._note_jwks_hosts(used)

    def _note_jwks_hosts(self, used: frozenset[Feature]) -> None:
        """One cluster per host the JWT providers in use fetch their JWKS from: added with
        the first provider that names the host, changed with its CA certificates, removed
        with the last (the publisher sends clusters before the listener that needs them,
        and removes them after)."""
        wanted = {r.remote.host.cluster: r.remote.host for r in used
                  if isinstance(r, JwtRule) and r.remote is not None}
        changes: dict[str, Resource | None] = {
            name: Resource.pack(name, _jwks_cluster(host, self.settings.connect_timeout))
            for name, host in wanted.items() if self._jwks_hosts.get(name) != host}
        changes.update({name: None for name in self._jwks_hosts if name not in wanted})
        self._jwks_hosts = wanted
        self._put(types.CLUSTER, changes)

    def desired(self) -> Desired:
        """The whole config now, and the names touched since the last hand-out (None on
        the first: everything is new)."""
        if self._routes_stale:
            with collector_paused(len(self._units) >= GC_PAUSE_AT):
                self._put(types.ROUTE, {ROUTE_CONFIG_NAME: self._route_config()})
            self._routes_stale = False
        touched = {t: frozenset(names) for t, names in self._touched.items()} \
            if self._handed_out else None
        for names in self._touched.values():
            names.clear()
        self._handed_out = True
        # Without TLS there is no certificate: no SDS type at all (as before it existed).
        return Desired({t: m for t, m in self._maps.items() if m or t != types.SECRET},
                       touched)

    def _put(self, type_url: str, resources: Mapping[str, Resource | None]) -> None:
        """Set (None: remove) resources of one type, remembering their names as touched."""
        if not resources:
            return
        m = self._maps[type_url].mutate()
        for name, resource in resources.items():
            if resource is None:
                if name not in m:
                    continue  # nothing to remove (the endpoints of a STATIC cluster)
                del m[name]
            elif m.get(name) is not resource:
                m[name] = resource
            else:
                continue
            self._touched[type_url].add(name)
        self._maps[type_url] = m.finish()

    def _route_config(self) -> Resource:
        """The one RouteConfiguration: every service's virtual host, by name, then the
        catch-all. Rebuilt only when a host (or route choice) came, went or changed, and
        then from each virtual host's serialized bytes, kept per service: joining them is
        the message's deterministic serialization (its fields in number order: the name,
        then each virtual host), without building and serializing 10k protos again
        (measured at 10k services: ~95 ms a build before, a few ms now)."""
        units: list[tuple[str, bytes]] = []
        for name, service in self._units.items():
            own = tuple(h for h in service.all_hosts() if len(self._host_members[h]) == 1)
            if own and self._by_host(service):
                continue  # the `*` virtual host reaches it by its Host (`_host_vhost`)
            if own == service.all_hosts() and self._shapes.get(name) is service:
                # A service alone on its hosts: the virtual host the quarantine checked.
                units.append((name, self._cached_vhost(
                    name, (route_key(service), own, self._by_host(service)),
                    functools.partial(self._vhost_bytes, service))))
            elif own:
                units.append((name, self._cached_vhost(
                    name, (route_key(service), own, self._by_host(service)),
                    functools.partial(self._service_vhost_bytes, service, own))))
        for host, members in self._host_members.items():
            if len(members) > 1:
                shared = [self._units[m] for m in sorted(members)]
                units.append((_shared_name(host), self._cached_vhost(
                    _shared_name(host), tuple((route_key(s), self._by_host(s)) for s in shared),
                    functools.partial(self._shared_vhost_bytes, host, shared))))
        units.sort()
        live = {name for name, _ in units}
        for gone in [n for n in self._vhost_fields if n not in live]:
            del self._vhost_fields[gone]
        parts = [length_delimited(_ROUTE_CONFIG_NAME_FIELD, ROUTE_CONFIG_NAME.encode()),
                 *(b for _, b in units),
                 length_delimited(_VIRTUAL_HOSTS_FIELD, self._catch_all_bytes)]
        if any(s.rewrite is not None for s in self._units.values()):
            parts.append(_NAMING_HEADER_GUARD)
        return Resource.serialized(ROUTE_CONFIG_NAME, _ROUTE_TYPE_URL, b"".join(parts))

    def _cached_vhost(self, name: str, key: object, build: Callable[[], bytes]) -> bytes:
        """A virtual host (`build`: its serialization) as a serialized `virtual_hosts`
        field, rebuilt when `key` moved."""
        cached = self._vhost_fields.get(name)
        if cached is None or cached[0] != key:
            cached = self._vhost_fields[name] = (key, length_delimited(
                _VIRTUAL_HOSTS_FIELD, build()))
        return cached[1]

    def _service_vhost_bytes(self, service: RoutedService, hosts: tuple[str, ...]) -> bytes:
        data: bytes = self._service_vhost(service, hosts).SerializeToString(deterministic=True)
        return data

    def _shared_vhost_bytes(self, host: str, services: list[RoutedService]) -> bytes:
        data: bytes = self._shared_vhost(host, services).SerializeToString(deterministic=True)
        return data

    def _forget(self, name: str) -> None:
        """Drop the cached protos of a service that left the table (memory at 10k churn;
        its endpoints' go with its cluster name, `_release`)."""
        self._vhost_serialized.pop(name, None)
        self._vhost_fields.pop(name, None)
        self._clusters.pop(name, None)

    def cluster_name(self, service: RoutedService) -> str:
        """The name of `service`'s cluster (and of its ClusterLoadAssignment): its host
        when Envoy finds it by Host (`routing: host_header`, `host_routed`), else its
        name. Its statistics carry its name either way (the cluster's alt_stat_name)."""
        return service.host if self._by_host(service) else service.name

    def _by_host(self, service: RoutedService) -> bool:
        """`host_routed` under `routing: host_header`; the last answer is kept (a build asks
        ~9 times per service in a row)."""
        if self.settings.routing != "host_header":
            return False
        last = self._last_by_host
        if last is not None and last[0] is service:
            return last[1]
        found = host_routed(service, self._gateway_auth)
        self._last_by_host = (service, found)
        return found

    # --- per service ----------------------------------------------------------------

    def _vhost(self, service: RoutedService) -> route_components_pb2.VirtualHost:
        """The service's virtual host over all its hosts (what the quarantine checks, and
        what Envoy gets while no other service shares one of its hosts), read back from
        `_vhost_bytes` (~3 µs; no proto kept per service)."""
        return route_components_pb2.VirtualHost.FromString(self._vhost_bytes(service))

    def _vhost_bytes(self, service: RoutedService) -> bytes:
        """`_vhost`'s deterministic serialization, kept: the quarantine compares it and the
        RouteConfiguration is joined from it, so each virtual host is made once (measured
        at 10k services: building them twice was ~0.4 s of a first build)."""
        key = (route_key(service), self._by_host(service))
        cached = self._vhost_serialized.get(service.name)
        if cached is None or cached[0] != key:
            cached = self._vhost_serialized[service.name] = (key, self._made("rds", service))
        return cached[1]

    # --- by shape ---------------------------------------------------------------------

    def shape(self, part: str, service: RoutedService
              ) -> tuple[validation.Shape | None, tuple[str, ...]]:
        """The Shape `service`'s resource of `part` ("cds", "eds", "rds") is rendered
        from (None: none is known now), and its names in placeholder order."""
        key, values = self._shape_of(part, service)
        return self._shapes_by_key.get(key), values

    def _shape_of(self, part: str, service: RoutedService
                  ) -> tuple[Hashable, tuple[str, ...]]:
        """`shape_of`, the last one of each part kept (the quarantine asks right after a
        build; endpoints are built for their name and endpoints alone)."""
        last = self._last_shape_of.get(part)
        if last is not None and (last[0] is service or (part == "eds" and (
                last[0].name == service.name and last[0].endpoints is service.endpoints))):
            return last[1]
        found = shape_of(part, service, part != "eds" and self._by_host(service))
        self._last_shape_of[part] = (service, found)
        return found

    def _made(self, part: str, service: RoutedService) -> bytes:
        """The serialization of `service`'s resource of `part`: rendered from the Shape of
        the services built from the same inputs but names (`shape_of`), or built.

        At 10k services building every cluster, endpoints and virtual host proto was
        most of a first build (~85 µs a virtual host); a render costs a few µs. A shape
        is made from the resource built with placeholders for the names, and kept only if
        it renders a service of that shape as building it does: the builders above use a
        service's names only as parts of strings; whatever else of them shapes a resource
        (a wildcard host) is in `shape_of`'s key. A shape is made for the second service
        that has it: a resource of its own (endpoints on a port no other service uses)
        costs one build, as before, not a shape that serves nobody else."""
        if self._shapes_settings is not self.settings:  # what every shape holds moved
            self._shapes_by_key.clear()
            self._seen_once.clear()
            self._shapes_settings = self.settings
        key, values = self._shape_of(part, service)
        if key in self._shapes_by_key:
            shape = self._shapes_by_key[key]
            return self._direct(part, service) if shape is None else shape.render(values)
        direct = self._direct(part, service)
        if key not in self._seen_once:
            if len(self._seen_once) >= 4 * MAX_SHAPES:
                self._seen_once.clear()
            self._seen_once.add(key)
            return direct
        self._seen_once.discard(key)
        if len(self._shapes_by_key) >= MAX_SHAPES:
            self._shapes_by_key.clear()  # a bounded memo: start over rather than grow
        by_host = part != "eds" and self._by_host(service)
        shape = validation.Shape.of(self._direct_proto(
            part, _placeholders(part, service, by_host), by_host))
        self._shapes_by_key[key] = shape if shape is not None and \
            shape.render(values) == direct else None
        return direct

    def _direct(self, part: str, service: RoutedService) -> bytes:
        data: bytes = self._direct_proto(
            part, service, part != "eds" and self._by_host(service)).SerializeToString(
                deterministic=True)
        return data

    def _direct_proto(self, part: str, service: RoutedService, by_host: bool = False
                      ) -> Message:
        """`by_host`: the cluster is named by the host, and the routes go to it (decided on
        the real service: a placeholder host has no dot)."""
        built: Message
        if part == "cds":
            built = self._cluster_proto(service, by_host)
        elif part == "eds":
            built = self._load_assignment_proto(service.name, service.endpoints)
        else:
            built = self._service_vhost(service, service.all_hosts(),
                                        service.host if by_host else None)
        return built

    def _service_vhost(self, service: RoutedService, hosts: tuple[str, ...],
                       cluster: str | None = None) -> route_components_pb2.VirtualHost:
        """One service's virtual host over `hosts` (its own): the status route of
        asynchronous calls, then its routes, longest path first. `cluster`: its cluster's
        name when not `cluster_name(service)` (a shape's placeholders)."""
        vhost = self._vhost_proto(service.name, _domains(hosts), [
            *self._status_route(service.name, service.auth),
            *(route for prefix in _longest_first(service.prefixes())
              for route in self._routes_to(service, prefix, cluster))],
            replay_marker=service.http2)
        if service.rate_limit is not None:
            vhost.typed_per_filter_config[RATE_LIMIT_FILTER].CopyFrom(
                _any(_rate_limit(service.name, *service.rate_limit)))
        return vhost

    def _shared_vhost(self, host: str, services: list[RoutedService]
                      ) -> route_components_pb2.VirtualHost:
        """A host several services share: each one's routes under its paths, longest path
        first over all of them (Envoy takes the first route that matches)."""
        pairs = sorted(((p, s) for s in services for p in s.prefixes()),
                       key=lambda ps: (-len(ps[0]), ps[0], ps[1].name))
        return self._vhost_proto(_shared_name(host), _domains((host,)), [
            *self._status_route(_shared_name(host)),
            *(route for prefix, service in pairs for route in self._routes_to(service, prefix))],
            replay_marker=any(s.http2 for s in services))

    def _vhost_proto(self, name: str, domains: list[str],
                     routes: list[route_components_pb2.Route], replay_marker: bool = False
                     ) -> route_components_pb2.VirtualHost:
        """A virtual host with its routes, and the retry policy of those that have none
        of their own (SAFE_RETRY_ON). Its request body buffer is what a retry can replay:
        bodies up to `retry_buffer_bytes` are kept until the response starts."""
        vhost = route_components_pb2.VirtualHost(
            name=name,
            domains=domains,
            routes=routes,
            retry_policy=self._retry_policy(SAFE_RETRY_ON, replay_marker),
            # Not per_request_buffer_limit_bytes: deprecated in favour of this field.
            request_body_buffer_limit=wrappers_pb2.UInt64Value(
                value=self.settings.retry_buffer_bytes),
        )
        if name == CATCH_ALL_VHOST:  # what the access log keeps (_access_log)
            vhost.request_headers_to_add.append(base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=CATCH_ALL_MARKER, value=CATCH_ALL_VHOST),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD))
        return vhost

    def _routes_to(self, service: RoutedService, prefix: str, cluster: str | None = None
                   ) -> list[route_components_pb2.Route]:
        """A service's routes under one path prefix: asynchronous calls first (to the
        activator); then one route replaying after a reset for every method (the service
        opted in), or two: idempotent methods with it, the others (POST, PATCH, ...)
        without it. A rewrite of the prefix, and the header naming the service, on each."""
        name = _route_name(service.name, prefix)
        marker = service.http2
        cluster = cluster or self.cluster_name(service)
        if service.retry_non_idempotent:
            routes = [self._route(name, cluster, RESET_RETRY_ON, prefix, marker)]
        else:
            idempotent = self._route(f"{name}/idempotent", cluster, RESET_RETRY_ON,
                                     prefix, marker)
            idempotent.match.headers.append(_IDEMPOTENT)
            routes = [idempotent, self._route(name, cluster, SAFE_RETRY_ON, prefix)]
        if service.split:
            for route in routes:
                _weighted(route, service.split)
        if self.settings.async_calls:
            submit = self._route(f"{name}/async", ACTIVATOR_CLUSTER, SAFE_RETRY_ON, prefix)
            submit.match.headers.append(route_components_pb2.HeaderMatcher(
                name=PREFER_HEADER, string_match=string_pb2.StringMatcher(
                    contains=RESPOND_ASYNC, ignore_case=True)))
            if service.split:  # the activator runs the call on the version the split picks
                _weighted(submit, service.split, via=ACTIVATOR_CLUSTER)
            routes.insert(0, submit)
        if service.rewrite is not None:
            for route in routes:
                _rewrite(route, service.name, prefix, service.rewrite)
        if service.auth is not None:
            for route in routes:
                _require(route, service.auth)
        if service.route_timeout is not None:
            for route in routes:
                route.route.timeout.CopyFrom(_duration(service.route_timeout))
        return routes

    def _status_route(self, vhost: str, auth: RouteAuth | None = None
                      ) -> list[route_components_pb2.Route]:
        """The status of asynchronous calls, to the activator (once per virtual host;
        asking for the credentials of the host's service, if it is alone on it), when
        they are on. Only the connection-level retries: a call accepted is never made
        twice."""
        if not self.settings.async_calls:
            return []
        status = self._route(f"{vhost}/async-status", ACTIVATOR_CLUSTER, SAFE_RETRY_ON)
        status.match.prefix = STATUS_PATH
        if auth is not None:
            _require(status, auth)
        return [status]

    def _route(self, route_name: str, cluster: str, retry_on: str,
               prefix: str = ROOT, replay_marker: bool = False) -> route_components_pb2.Route:
        """A route that survives a cold start: long timeout, retries on another host.
        `retry_on` is SAFE_RETRY_ON or RESET_RETRY_ON (module docstring):
        - connect-failure, refused-stream, reset-before-request: the request never reached
          an upstream, safe to replay even for POST /predict;
        - retriable-headers: the activator's "replay me" answer to a held HTTP/2 request,
          sent only once the service's endpoints flipped back;
        - reset: the upstream closed or reset the connection before sending any response
          header (never once a header was received): an activator replica killed holding
          the request, or a replica that crashed while running it, which the replay may
          repeat. A replay needs the body to have fit the virtual host's
          request_body_buffer_limit (retry_buffer_bytes)."""
        route = route_components_pb2.Route(
            name=route_name,
            match=_match(prefix),
            route=route_components_pb2.RouteAction(
                cluster=cluster, timeout=_duration(self.settings.route_timeout),
                # Once routed, a stream may idle as long as Envoy's default allows: the
                # listener's shorter stream_idle_timeout only bounds reading the headers.
                idle_timeout=_duration(STREAM_IDLE_TIMEOUT)),
        )
        # SAFE_RETRY_ON is the virtual host's policy (`_vhost_proto`): a route carries its
        # own only when it differs (measured: four policies per virtual host made the
        # route table 12.8 MB at 10k services, one per host 6.6 MB).
        if retry_on != SAFE_RETRY_ON:
            route.route.retry_policy.CopyFrom(self._retry_policy(retry_on, replay_marker))
        return route

    def _retry_policy(self, retry_on: str, replay_marker: bool
                      ) -> route_components_pb2.RetryPolicy:
        """Retries on another host (previous_hosts), `retry_on` (`_route`), and, for an
        HTTP/2 service, the activator's replay marker (REPLAY_MARKER_RETRY)."""
        if not replay_marker:
            retry_on = ",".join(c for c in retry_on.split(",") if c != REPLAY_MARKER_RETRY)
        return route_components_pb2.RetryPolicy(
            retry_on=retry_on,
            retriable_headers=[route_components_pb2.HeaderMatcher(
                name=RETRY_HEADER, present_match=True)] if replay_marker else [],
            num_retries=wrappers_pb2.UInt32Value(value=self.settings.retries),
            retry_host_predicate=[route_components_pb2.RetryPolicy.RetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts",
                typed_config=_any(previous_hosts_pb2.PreviousHostsPredicate()))],
            host_selection_retry_max_attempts=3,
        )

    def _cluster(self, service: RoutedService) -> Resource:
        name = self.cluster_name(service)
        key = (_cluster_key(service), name, service.endpoints if name != service.name else ())
        cached = self._clusters.get(service.name)
        if cached is None or cached[0] != key:
            cached = self._clusters[service.name] = (key, Resource.serialized(
                name, types.CLUSTER, self._made("cds", service)))
        return cached[1]

    def _cluster_proto(self, service: RoutedService, by_host: bool = False
                       ) -> cluster_pb2.Cluster:
        """A service's cluster, built anew (`_cluster` caches it, packed). `by_host`: named
        by its host (`cluster_name`), its statistics still by the service's name, and its
        endpoints in the cluster (STATIC): at 10,000 services an EDS subscription per
        cluster was ~3 KB of Envoy's memory each (heap 223 -> 192 MB, measured with
        bench/host_route_probe.py), and a flip is then this one cluster, sent by CDS
        (~130 bytes; Envoy keeps the requests in flight and the cluster's counters)."""
        name, s = (service.host if by_host else service.name), self.settings
        cluster = cluster_pb2.Cluster(
            name=name,
            alt_stat_name=service.name if by_host else "",
            connect_timeout=_duration(s.connect_timeout),
            lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
            circuit_breakers=_circuit_breakers(s.max_requests, service.max_concurrent),
            ignore_health_on_host_removal=True,
        )
        if by_host:
            cluster.type = cluster_pb2.Cluster.STATIC
            cluster.load_assignment.CopyFrom(_cla(name, service.endpoints))
        else:
            cluster.type = cluster_pb2.Cluster.EDS
            cluster.eds_cluster_config.service_name = name
            cluster.eds_cluster_config.eds_config.CopyFrom(_ads())
        if service.http2:
            cluster.typed_extension_protocol_options[_HTTP_OPTIONS_KEY].CopyFrom(
                _any(_http2_options()))
        return cluster

    def _load_assignment(self, name: str, endpoints: tuple[Endpoint, ...]) -> Resource:
        """The ClusterLoadAssignment of the cluster `name` (`cluster_name`)."""
        cached = self._endpoints.get(name)
        if cached is None or cached[0] != endpoints:
            made = self._made("eds", RoutedService(name, "", endpoints))
            cached = self._endpoints[name] = (
                endpoints, Resource.serialized(name, types.ENDPOINT, made))
        return cached[1]

    def _load_assignment_proto(self, name: str, endpoints: tuple[Endpoint, ...]
                               ) -> endpoint_pb2.ClusterLoadAssignment:
        """A service's ClusterLoadAssignment, built anew (`_load_assignment` caches it)."""
        return _cla(name, endpoints)

    # --- shared resources ---------------------------------------------------------------

    def _catch_all(self) -> route_components_pb2.VirtualHost:
        """Unknown (or evicted) hosts go to the activator, which knows the service table
        (it sees every request: no routes of asynchronous calls needed). With `routing:
        host_header`, `_host_vhost` instead."""
        if self.settings.routing == "host_header":
            return self._host_vhost()
        idempotent = self._route(f"{CATCH_ALL_VHOST}/idempotent", ACTIVATOR_CLUSTER,
                                 RESET_RETRY_ON)
        idempotent.match.headers.append(_IDEMPOTENT)
        routes = [idempotent, self._route(CATCH_ALL_VHOST, ACTIVATOR_CLUSTER, SAFE_RETRY_ON)]
        if self._catch_all_timeout is not None:
            for route in routes:
                route.route.timeout.CopyFrom(_duration(self._catch_all_timeout))
        return self._vhost_proto(CATCH_ALL_VHOST, ["*"], routes)

    def _host_vhost(self) -> route_components_pb2.VirtualHost:
        """`routing: host_header`: every host without a virtual host of its own. The routes
        of a service with the gateway's defaults (`host_routed`), whose cluster is the one
        named by the request's Host (`cluster_header: :authority`; the connection manager
        strips any port first). Adding such a service adds its cluster and endpoints and
        changes no route. A Host no cluster has is answered 404 by Envoy (`unknown_host`,
        logged to the control plane like the catch-all's requests): evicted services stay
        routed to the activator in this mode (routing.py), so no known service is one."""
        auth = self._gateway_auth
        placeholder = RoutedService(HOST_VHOST, "*", (), auth=auth)
        routes = [*self._status_route(HOST_VHOST, auth),
                  *self._routes_to(placeholder, ROOT)]
        for route in routes:
            if route.route.cluster == HOST_VHOST:
                route.route.ClearField("cluster")
                route.route.cluster_header = ":authority"
                route.route.cluster_not_found_response_code = \
                    route_components_pb2.RouteAction.NOT_FOUND
        # No catch-all timeout: a service whose wake outlasts the gateway's route timeout
        # has a route timeout of its own, so a virtual host of its own.
        return self._vhost_proto(HOST_VHOST, ["*"], routes)

    def _activator_cluster(self) -> cluster_pb2.Cluster:
        """EDS, not STATIC: activator replicas come and go without a cluster change (which
        would drain the cluster's connections and warm it anew)."""
        s = self.settings
        return cluster_pb2.Cluster(
            name=ACTIVATOR_CLUSTER,
            type=cluster_pb2.Cluster.EDS,
            eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
                service_name=ACTIVATOR_CLUSTER, eds_config=_ads()),
            connect_timeout=_duration(s.connect_timeout),
            lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
            circuit_breakers=_circuit_breakers(s.max_requests),
            ignore_health_on_host_removal=True,
        )

    def _activator_load_assignment(self) -> Resource:
        """Every activator replica's HTTP/1 holder (what the catch-all reaches)."""
        return Resource.pack(ACTIVATOR_CLUSTER,
                             _cla(ACTIVATOR_CLUSTER, self.settings.activators))

    def _listener(self, features: frozenset[Feature] = frozenset()) -> listener_pb2.Listener:
        """The edge: limits from `settings.edge` (the activator's are the same, so a
        request that reaches an awake service can wake a sleeping one); the client's
        address is the connection's (use_remote_address, no trusted hops: a client cannot
        claim another address in X-Forwarded-For); paths normalised (RFC 3986) and slashes
        merged before routing; WebSocket upgrades pass (to replicas, or to the activator,
        which holds the upgrade, wakes the service and relays it)."""
        edge = self.settings.edge
        manager = hcm_pb2.HttpConnectionManager(
            stat_prefix="torpor",
            codec_type=hcm_pb2.HttpConnectionManager.AUTO,
            max_request_headers_kb=wrappers_pb2.UInt32Value(value=edge.max_request_headers_kb),
            common_http_protocol_options=protocol_pb2.HttpProtocolOptions(
                max_headers_count=wrappers_pb2.UInt32Value(
                    value=edge.max_request_headers_count)),
            # The header timeout, as the stream idle timeout: until its headers are in, a
            # stream has no route and nothing resets that timer (bytes of a header do not),
            # so it answers 408 after `request_headers_timeout` like Envoy's own
            # request_headers_timeout; each route then sets STREAM_IDLE_TIMEOUT. Same
            # limits, one timer per stream instead of two (measured: -2.9k instructions,
            # ~2 % of a request).
            stream_idle_timeout=_duration(edge.request_headers_timeout),
            use_remote_address=wrappers_pb2.BoolValue(value=True),
            xff_num_trusted_hops=0,
            normalize_path=wrappers_pb2.BoolValue(value=True),
            merge_slashes=True,
            upgrade_configs=[hcm_pb2.HttpConnectionManager.UpgradeConfig(
                upgrade_type="websocket")],
            # No x-request-id made up per request (a UUID: ~1.3 % of a request's
            # instructions): nothing in torpor reads it and no tracing is configured. A
            # client's own x-request-id still passes.
            generate_request_id=wrappers_pb2.BoolValue(value=False),
            rds=hcm_pb2.Rds(route_config_name=ROUTE_CONFIG_NAME, config_source=_ads()),
            http_filters=[
                *_auth_filters(features),
                *([_rate_limit_filter()] if RATE_LIMITED in features else []),
                hcm_pb2.HttpFilter(name="envoy.filters.http.router",
                                   typed_config=_any(self._router())),
            ],
            local_reply_config=_local_replies(self.settings.routing == "host_header"),
            access_log=[_access_log(self.settings.routing == "host_header")],
        )
        if self.settings.routing == "host_header":
            # A Host with a port still names its cluster. Only then: the field is in a
            # oneof, set even to false it is serialized (the default mode's listener
            # would change).
            manager.strip_any_host_port = True
        filters = [listener_components_pb2.Filter(
            name="envoy.filters.network.http_connection_manager", typed_config=_any(manager))]
        tls = self.settings.tls
        if tls is None:
            return listener_pb2.Listener(
                name=LISTENER_NAME, address=_socket(self.settings.listen),
                filter_chains=[listener_components_pb2.FilterChain(filters=filters)])
        return listener_pb2.Listener(
            name=LISTENER_NAME, address=_socket(self.settings.listen),
            # The name a client asks for (SNI) picks the certificate's filter chain.
            listener_filters=[listener_components_pb2.ListenerFilter(
                name="envoy.filters.listener.tls_inspector",
                typed_config=_any(tls_inspector_pb2.TlsInspector()))],
            filter_chains=[
                *(listener_components_pb2.FilterChain(
                    filter_chain_match=listener_components_pb2.FilterChainMatch(
                        server_names=list(names)),
                    transport_socket=_tls_socket(secret, tls.http2), filters=filters)
                  for names, secret in tls.sni)],
            default_filter_chain=listener_components_pb2.FilterChain(
                transport_socket=_tls_socket(tls.default_secret, tls.http2), filters=filters),
        )

    def _router(self) -> router_pb2.Router:
        """Envoy's router as a gateway's: no `x-envoy-*` headers of its own on requests or
        responses (`x-envoy-upstream-service-time`, `x-envoy-expected-rq-timeout-ms`, ...:
        nothing in torpor reads them, and a gateway need not tell clients about its
        upstreams; measured: -3.2k instructions per request); and Envoy's "dynamic
        statistics" (per upstream cluster `upstream_rq_[1-5]xx`, `upstream_rq_<code>`,
        the `upstream_rq_time` histogram and their `external.` copies, checked with Envoy
        1.40; of a service's cluster the stats matcher keeps only the classes) only when
        `upstream_code_stats` asks for them (-7.7k, ~5 % of a request, when off). The
        counters torpor counts calls by (stats_sink.py: `upstream_rq_total`,
        `upstream_rq_retry`, the overflows) and the listener's `downstream_rq_[1-5]xx`
        are kept either way."""
        return router_pb2.Router(
            dynamic_stats=wrappers_pb2.BoolValue(value=self.settings.upstream_code_stats),
            suppress_envoy_headers=True)


#: Which requests Envoy logs to the control plane: those the catch-all sends to the
#: activator (evicted services, unknown hosts), whose Host only a log entry tells. Requests
#: to a service's own cluster, awake or asleep, are counted by Envoy's counters
#: (stats_sink.py): no log entry, no gRPC message, no Python per request.
#: The catch-all virtual host marks its requests with this request header and the access
#: log keeps only those (a header_filter). Not a CEL filter on the upstream cluster, which
#: cost every request ~4.6k instructions (~3 %, callgrind); and a header Envoy keeps in
#: its O(1) table, so that looking for it is free too (a header of torpor's own name cost
#: ~3.7k: a lookup outside that table). Envoy removes x-envoy-ip-tags from every request
#: of a client (use_remote_address: every client is external), so no client can set it to
#: have its request logged; it is meant for tags of the request, which this one is. Envoy's
#: ip_tagging filter, the only other writer, is not in torpor's chain.
CATCH_ALL_MARKER = "x-envoy-ip-tags"


def _tls_socket(secret: str, http2: bool) -> base_pb2.TransportSocket:
    """TLS with the certificate of SDS secret `secret` (sent over ADS, so a renewed file
    reaches Envoy without a listener change); ALPN offers HTTP/2, then HTTP/1.1."""
    context = tls_pb2.DownstreamTlsContext(common_tls_context=tls_pb2.CommonTlsContext(
        tls_certificate_sds_secret_configs=[secret_pb2.SdsSecretConfig(
            name=secret, sds_config=_ads())],
        alpn_protocols=["h2", "http/1.1"] if http2 else ["http/1.1"]))
    return base_pb2.TransportSocket(name="envoy.transport_sockets.tls",
                                    typed_config=_any(context))


def _secret(name: str, chain: bytes, key: bytes) -> secret_pb2.Secret:
    return secret_pb2.Secret(name=name, tls_certificate=common_pb2.TlsCertificate(
        certificate_chain=base_pb2.DataSource(inline_bytes=chain),
        private_key=base_pb2.DataSource(inline_bytes=key)))


def _access_log(by_host: bool = False) -> accesslog_pb2.AccessLog:
    """Catch-all requests (CATCH_ALL_MARKER) are streamed to the control plane's
    access-log receiver; with `routing: host_header` (`by_host`) also those whose Host
    names no cluster (response flag NC: unknown hosts, counted as the catch-all's are)."""
    config = als_pb2.HttpGrpcAccessLogConfig(
        common_config=als_pb2.CommonGrpcAccessLogConfig(
            log_name="torpor",
            transport_api_version=config_source_pb2.V3,
            grpc_service=grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(
                    cluster_name=CONTROL_PLANE_CLUSTER
                )
            ),
        )
    )
    only = accesslog_pb2.AccessLogFilter(header_filter=accesslog_pb2.HeaderFilter(
        header=route_components_pb2.HeaderMatcher(name=CATCH_ALL_MARKER, present_match=True)))
    if by_host:
        only = accesslog_pb2.AccessLogFilter(or_filter=accesslog_pb2.OrFilter(filters=[
            only, accesslog_pb2.AccessLogFilter(response_flag_filter=(
                accesslog_pb2.ResponseFlagFilter(flags=["NC"])))]))
    return accesslog_pb2.AccessLog(name="envoy.access_loggers.http_grpc", filter=only,
                                   typed_config=_any(config))


#: Idempotent methods (a route that replays them after a reset).
_IDEMPOTENT = route_components_pb2.HeaderMatcher(
    name=":method", string_match=string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(
        regex="|".join(IDEMPOTENT_METHODS))))


def _match(prefix: str) -> route_components_pb2.RouteMatch:
    """"/" matches every path; another prefix its own path and those below it, never a
    longer name ("/v1/m" matches "/v1/m/x", not "/v1/mx"): Envoy's path_separated_prefix."""
    if prefix == ROOT:
        return route_components_pb2.RouteMatch(prefix=ROOT)
    return route_components_pb2.RouteMatch(path_separated_prefix=prefix)


def _rewrite(route: route_components_pb2.Route, service: str, prefix: str,
             rewrite: str) -> None:
    """The matched prefix becomes `rewrite` ("/v1/m/predict" → "/predict" with "/", no
    double slash; the query string is kept), and the route names its service in
    SERVICE_HEADER: the activator cannot tell the service from the rewritten path."""
    pattern = "^" + re.escape(prefix) + ("/?" if rewrite.endswith("/") else "")
    route.route.regex_rewrite.CopyFrom(regex_pb2.RegexMatchAndSubstitute(
        pattern=regex_pb2.RegexMatcher(regex=pattern), substitution=rewrite))
    route.request_headers_to_add.append(base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=SERVICE_HEADER, value=service),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD))


def _weighted(route: route_components_pb2.Route, split: tuple[tuple[str, int], ...],
              via: str | None = None) -> None:
    """The route's traffic split over the versions' clusters by weight; each request names
    its version in VERSION_HEADER, over any value a client sent (a sleeping version's
    request reaches the activator, which then knows what to wake; Envoy applies a
    cluster's headers before the route's, so the route configuration's removal of
    SERVICE_HEADER would drop that one). One RDS push changes a split. `via`: every share
    goes to that cluster instead (an asynchronous call: the activator, told the version)."""
    route.route.ClearField("cluster")
    route.route.weighted_clusters.CopyFrom(route_components_pb2.WeightedCluster(clusters=[
        route_components_pb2.WeightedCluster.ClusterWeight(
            name=via or cluster, weight=wrappers_pb2.UInt32Value(value=weight),
            request_headers_to_add=[base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=VERSION_HEADER, value=cluster),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)])
        for cluster, weight in split]))


def _require(route: route_components_pb2.Route, auth: RouteAuth) -> None:
    """The route asks for the service's credentials (the listener's filter checks them:
    `_auth_filters`)."""
    if isinstance(auth, ApiKeys):
        per_route = api_key_auth_pb2.ApiKeyAuthPerRoute(
            credentials=[api_key_auth_pb2.Credential(key=key, client=client)
                         for client, key in auth.credentials],
            key_sources=[api_key_auth_pb2.KeySource(header=API_KEY_HEADER)])
        # The filter is off in the listener; this route turns it on with its keys.
        turned_on = route_components_pb2.FilterConfig(config=_any(per_route))
        route.typed_per_filter_config[API_KEY_FILTER].CopyFrom(_any(turned_on))
    else:
        route.typed_per_filter_config[JWT_FILTER].CopyFrom(_any(
            jwt_authn_pb2.PerRouteConfig(requirement_name=auth.provider)))


def _auth_filters(features: frozenset[Feature]) -> list[hcm_pb2.HttpFilter]:
    """The authentication filters the services need: API keys (off unless a route turns
    it on with its keys) and JWT (its providers; checked where a route names one)."""
    filters = []
    if API_KEYS in features:
        filters.append(hcm_pb2.HttpFilter(
            name=API_KEY_FILTER, disabled=True, typed_config=_any(api_key_auth_pb2.ApiKeyAuth(
                key_sources=[api_key_auth_pb2.KeySource(header=API_KEY_HEADER)]))))
    rules = sorted((f for f in features if isinstance(f, JwtRule)), key=lambda r: r.provider)
    if rules:
        filters.append(hcm_pb2.HttpFilter(name=JWT_FILTER, typed_config=_any(
            jwt_authn_pb2.JwtAuthentication(
                providers={r.provider: _jwt_provider(r) for r in rules},
                requirement_map={r.provider: jwt_authn_pb2.JwtRequirement(
                    provider_name=r.provider) for r in rules}))))
    return filters


def _jwt_provider(rule: JwtRule) -> jwt_authn_pb2.JwtProvider:
    """The JWKS inline, or fetched by Envoy: in the main thread before the listener serves
    (`async_fetch` without `fast_listener`: a listener change warms until the fetch is done
    or failed, the old listener serving meanwhile; no request waits for a fetch), and
    again a few seconds before `cache` runs out."""
    provider = jwt_authn_pb2.JwtProvider(issuer=rule.issuer, audiences=list(rule.audiences))
    remote = rule.remote
    if remote is None:
        provider.local_jwks.inline_string = rule.jwks
        return provider
    provider.remote_jwks.CopyFrom(jwt_authn_pb2.RemoteJwks(
        http_uri=http_uri_pb2.HttpUri(uri=remote.url, cluster=remote.host.cluster,
                                      timeout=_duration(remote.timeout)),
        cache_duration=_duration(remote.cache),
        async_fetch=jwt_authn_pb2.JwksAsyncFetch(fast_listener=False),
        retry_policy=base_pb2.RetryPolicy(
            num_retries=wrappers_pb2.UInt32Value(value=JWKS_FETCH_RETRIES),
            retry_back_off=backoff_pb2.BackoffStrategy(
                base_interval=_duration(0.5), max_interval=_duration(5.0)))))
    return provider


def _jwks_cluster(host: JwksHost, connect_timeout: float) -> cluster_pb2.Cluster:
    """The cluster to a JWKS host: STATIC for an IP address, STRICT_DNS for a name
    (resolved again every 5 s, IPv4 first); over https, TLS with the host's name as SNI,
    its certificate checked against the CA certificates and for the host's name."""
    ip = is_ip_literal(host.host)
    cluster = cluster_pb2.Cluster(
        name=host.cluster,
        type=cluster_pb2.Cluster.STATIC if ip else cluster_pb2.Cluster.STRICT_DNS,
        connect_timeout=_duration(connect_timeout),
        load_assignment=_cla(host.cluster, [Endpoint(host.host, host.port)]))
    if not ip:
        cluster.dns_lookup_family = cluster_pb2.Cluster.V4_PREFERRED
    if host.ca is not None:
        san = common_pb2.SubjectAltNameMatcher(
            san_type=common_pb2.SubjectAltNameMatcher.IP_ADDRESS if ip
            else common_pb2.SubjectAltNameMatcher.DNS,
            matcher=string_pb2.StringMatcher(exact=host.host))
        context = tls_pb2.UpstreamTlsContext(
            sni="" if ip else host.host,
            common_tls_context=tls_pb2.CommonTlsContext(
                validation_context=common_pb2.CertificateValidationContext(
                    trusted_ca=base_pb2.DataSource(inline_string=host.ca),
                    match_typed_subject_alt_names=[san])))
        cluster.transport_socket.CopyFrom(base_pb2.TransportSocket(
            name="envoy.transport_sockets.tls", typed_config=_any(context)))
    return cluster



def service_domains(service: RoutedService) -> list[str]:
    """The domains of `service`'s own virtual host (over all its hosts)."""
    return _domains(service.all_hosts())


def _domains(hosts: Iterable[str]) -> list[str]:
    """Each host, and for an exact one the same host with any port."""
    return [d for h in hosts for d in ((h,) if h.startswith("*") else (h, f"{h}:*"))]


def _longest_first(prefixes: Iterable[str]) -> list[str]:
    return sorted(prefixes, key=lambda p: (-len(p), p))


def _shared_name(host: str) -> str:
    """The virtual host of a host several services share (a service name has no "@")."""
    return "@" + host


def _route_name(service: str, prefix: str) -> str:
    return service if prefix == ROOT else f"{service}@{prefix}"


#: Shapes of resources kept at most (`ResourceBuilder._made`).
MAX_SHAPES = 4096


def _wildcard(host: str) -> str:
    """What of a host shapes its virtual host besides the host (`*.suffix`: no `:*` twin)."""
    return "*" if host.startswith("*") else ""


def shape_of(part: str, service: RoutedService, by_host: bool = False
             ) -> tuple[Hashable, tuple[str, ...]]:
    """What `service`'s resource of `part` ("cds", "eds", "rds") is built from besides
    names (services with equal keys build resources equal but for them), and its names
    in placeholder order: the service's name, then its hosts (without a leading `*`) or
    its endpoints' addresses. `by_host`: its cluster is named by its host (`host_routed`:
    one exact host, so its routes name the host's placeholder)."""
    if part == "cds":
        if by_host:  # its endpoints are in it too (STATIC)
            return (("cds", _cluster_key(service), "host",
                     tuple(e.port for e in service.endpoints)),
                    (service.name, service.host, *(e.host for e in service.endpoints)))
        return ("cds", _cluster_key(service)), (service.name,)
    if part == "eds":
        return (("eds", tuple(e.port for e in service.endpoints)),
                (service.name, *(e.host for e in service.endpoints)))
    hosts = service.all_hosts()
    built_from = route_key(service)
    if built_from[:2] == (service.host, service.hosts):
        rest: tuple[object, ...] = built_from[2:]  # (a dataclasses.replace costs more)
    else:
        rest = route_key(dataclasses.replace(service, host="", hosts=()))
    if by_host:  # one exact host (`host_routed`), its routes to the cluster it names
        return ("rds", ("",), rest, "host"), (service.name, service.host)
    if len(hosts) == 1:
        wild = _wildcard(service.host)
        return (("rds", (wild,), rest, by_host),
                (service.name, service.host.removeprefix(wild)))
    return (("rds", tuple(_wildcard(h) for h in hosts), rest),
            (service.name, *(h.removeprefix(_wildcard(h)) for h in hosts)))


def _placeholders(part: str, service: RoutedService, by_host: bool = False
                  ) -> RoutedService:
    """`service` with placeholders for the names `shape_of` lists, in its order."""
    ph = validation.placeholder
    if part == "cds":
        if by_host:
            return dataclasses.replace(service, name=ph(0), host=ph(1), endpoints=tuple(
                Endpoint(ph(2 + i), e.port) for i, e in enumerate(service.endpoints)))
        return dataclasses.replace(service, name=ph(0))
    if part == "eds":
        return dataclasses.replace(service, name=ph(0), endpoints=tuple(
            Endpoint(ph(1 + i), e.port) for i, e in enumerate(service.endpoints)))
    hosts = [_wildcard(h) + ph(1 + i) for i, h in enumerate(service.all_hosts())]
    return dataclasses.replace(service, name=ph(0), host=hosts[0], hosts=tuple(hosts[1:]))


_ROUTE_TYPE_URL = "type.googleapis.com/" + route_pb2.RouteConfiguration.DESCRIPTOR.full_name
_ROUTE_CONFIG_NAME_FIELD = route_pb2.RouteConfiguration.DESCRIPTOR.fields_by_name[
    "name"].number
_VIRTUAL_HOSTS_FIELD = route_pb2.RouteConfiguration.DESCRIPTOR.fields_by_name[
    "virtual_hosts"].number


#: The RouteConfiguration's tail while some service's path is rewritten: SERVICE_HEADER is
#: dropped from every request before the routes add their own (a client cannot pick the
#: service the activator serves); the route-level header must then win.
_NAMING_HEADER_GUARD = route_pb2.RouteConfiguration(
    request_headers_to_remove=[SERVICE_HEADER],
    most_specific_header_mutations_wins=True).SerializeToString(deterministic=True)




def _cla(name: str, endpoints: Iterable[Endpoint]) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(address=_socket(e))
                    )
                    for e in endpoints
                ]
            )
        ],
    )


def _endpoint_set(endpoints: Iterable[Endpoint]) -> tuple[Endpoint, ...]:
    """Sorted and de-duplicated: equal sets build equal CLAs (same digest, no push)."""
    return tuple(sorted(set(endpoints)))


def _http2_options() -> http_protocol_options_pb2.HttpProtocolOptions:
    return http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()))


#: Upstream connections one cluster may open (all Envoy workers together). HTTP/1 takes a
#: connection per request in flight, so without a ceiling 10,000 held requests are 10,000
#: connections to the activator beside the 10,000 from clients: more descriptors than a
#: 20,000 RLIMIT_NOFILE allows (measured: 29 of 10,000 lost to "Too many open files").
#: Requests beyond it wait in Envoy's pending queue (max_pending_requests), which costs
#: memory, not descriptors, and are sent as connections free up.
MAX_UPSTREAM_CONNECTIONS = 4096


def _circuit_breakers(limit: int, concurrent: int | None = None
                      ) -> circuit_breaker_pb2.CircuitBreakers:
    """Thresholds for clusters whose requests the activator may hold. max_retries (parallel
    retries) is the request limit too: an activator replica that dies resets every request
    it held at once, and each retry beyond the ceiling is a 503 (measured with a tenth of
    the limit: 40 held requests dropped at once, 10 replayed, 30 lost to retry_overflow).
    Our retry_on never replays an answered request, and num_retries bounds each request.
    Connections stop at MAX_UPSTREAM_CONNECTIONS; the requests beyond queue in Envoy."""
    value = wrappers_pb2.UInt32Value(value=limit)
    # A service's own limit of requests in flight (`max_concurrent`): beyond it Envoy
    # answers at once (429 + Retry-After, `_local_replies`), asleep or awake.
    requests = value if concurrent is None else wrappers_pb2.UInt32Value(value=concurrent)
    return circuit_breaker_pb2.CircuitBreakers(
        thresholds=[
            circuit_breaker_pb2.CircuitBreakers.Thresholds(
                priority=base_pb2.DEFAULT,
                max_connections=wrappers_pb2.UInt32Value(
                    value=min(requests.value, MAX_UPSTREAM_CONNECTIONS)),
                max_pending_requests=requests,
                max_requests=requests,
                max_retries=value,
            )
        ]
    )


#: Envoy's local rate limit filter: off unless a service's virtual host configures it.
RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"
#: Envoy refills a token bucket at most every 50 ms: 20 times a second.
_FILLS_PER_SECOND_MAX = 20


def _rate_limit_filter() -> hcm_pb2.HttpFilter:
    """The filter in the listener's chain, with no bucket of its own: it limits only the
    virtual hosts that carry a `_rate_limit` config."""
    return hcm_pb2.HttpFilter(name=RATE_LIMIT_FILTER, typed_config=_any(
        local_ratelimit_pb2.LocalRateLimit(stat_prefix="torpor_rate_limit")))


def _rate_limit(name: str, per_second: int, burst: int) -> local_ratelimit_pb2.LocalRateLimit:
    """`per_second` requests a second for one service, `burst` at once; the rest get 429
    with Retry-After. The bucket is refilled in small steps (a token every 1/per_second s,
    or every 50 ms, Envoy's shortest, several) so that the limit holds over any second,
    not only on average."""
    # The fewest tokens per fill that keep the interval at 50 ms or more, and that
    # interval exactly (integer nanoseconds, rounded up: never faster than the rate).
    fill = -(-per_second // _FILLS_PER_SECOND_MAX)
    interval = duration_pb2.Duration()
    interval.FromNanoseconds(-(-fill * 1_000_000_000 // per_second))
    return local_ratelimit_pb2.LocalRateLimit(
        stat_prefix=f"torpor_rate_limit_{name}",
        token_bucket=token_bucket_pb2.TokenBucket(
            # A bucket smaller than one fill would cap the rate below `per_second`.
            max_tokens=max(burst, fill), tokens_per_fill=wrappers_pb2.UInt32Value(value=fill),
            fill_interval=interval),
        filter_enabled=_percent_everyone(RATE_LIMIT_FILTER + "_enabled"),
        filter_enforced=_percent_everyone(RATE_LIMIT_FILTER + "_enforced"),
        response_headers_to_add=[_header_value(RETRY_AFTER, str(_RETRY_AFTER_SECONDS))],
    )


def _percent_everyone(runtime_key: str) -> base_pb2.RuntimeFractionalPercent:
    """100 % (Envoy's local rate limit enforces nothing until both fractions are set)."""
    return base_pb2.RuntimeFractionalPercent(
        default_value=percent_pb2.FractionalPercent(
            numerator=100, denominator=percent_pb2.FractionalPercent.HUNDRED),
        runtime_key=runtime_key)


RETRY_AFTER = "retry-after"
_RETRY_AFTER_SECONDS = 1


def _header_value(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)


def _local_replies(by_host: bool = False) -> hcm_pb2.LocalReplyConfig:
    """A request over a service's `max_concurrent` (Envoy's circuit breaker: response
    flag UO, 503 by default) is answered 429 + Retry-After, as a rate-limited one; a
    refused credential (401, 403) gets a JSON body as the activator's answers have:
    {"error", "message"} with Envoy's reason ("Jwt is expired"). `by_host` (`routing:
    host_header`): a Host no cluster has (response flag NC) gets {"error": "unknown_host"};
    without it the listener is as before that mode (no change pushed on an upgrade)."""
    overloaded = hcm_pb2.ResponseMapper(
        filter=accesslog_pb2.AccessLogFilter(
            response_flag_filter=accesslog_pb2.ResponseFlagFilter(flags=["UO"])),
        status_code=wrappers_pb2.UInt32Value(value=429),
        headers_to_add=[_header_value(RETRY_AFTER, str(_RETRY_AFTER_SECONDS))])
    unknown = hcm_pb2.ResponseMapper(
        filter=accesslog_pb2.AccessLogFilter(
            response_flag_filter=accesslog_pb2.ResponseFlagFilter(flags=["NC"])),
        body_format_override=substitution_format_string_pb2.SubstitutionFormatString(
            json_format=_json_struct({
                "error": "unknown_host",
                "message": "no torpor service is configured for host %REQ(:AUTHORITY)%"}),
            content_type="application/json"))
    return hcm_pb2.LocalReplyConfig(mappers=[
        overloaded, *([unknown] if by_host else []), _json_reply(401, "unauthorized"),
        _json_reply(403, "forbidden")])


def _json_reply(code: int, error: str) -> hcm_pb2.ResponseMapper:
    """Envoy's own `code` answers with a JSON body."""
    comparison = accesslog_pb2.ComparisonFilter(
        op=accesslog_pb2.ComparisonFilter.EQ,
        value=base_pb2.RuntimeUInt32(default_value=code,
                                     runtime_key=f"torpor.local_reply_{code}"))
    return hcm_pb2.ResponseMapper(
        filter=accesslog_pb2.AccessLogFilter(
            status_code_filter=accesslog_pb2.StatusCodeFilter(comparison=comparison)),
        body_format_override=substitution_format_string_pb2.SubstitutionFormatString(
            json_format=_json_struct({"error": error, "message": "%LOCAL_REPLY_BODY%"}),
            content_type="application/json"))


def _json_struct(fields: Mapping[str, str]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(fields)
    return out


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def _socket(endpoint: Endpoint) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=endpoint.host, port_value=endpoint.port)
    )


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def _any(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message, deterministic=True)  # type: ignore[arg-type]
    return packed

