"""The service table → Envoy resources (Listener, RouteConfiguration, Clusters, CLAs).

Owns: what torpor's Envoy config looks like. Must not know about streams or versions.
Built resources are cached per service and rebuilt only when that service's inputs change
(measured: rebuilding 10k services' protos blocks the loop ~200 ms).

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

import dataclasses
from collections.abc import Iterable

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    grpc_service_pb2,
    protocol_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from torpor.edge import EdgeLimits
from torpor.model import Endpoint
from xds_server import types
from xds_server.cache import Resource

LISTENER_NAME = "torpor_http"
ROUTE_CONFIG_NAME = "torpor_routes"
ACTIVATOR_CLUSTER = "torpor_activator"
#: The bootstrap's static cluster to the control plane; it carries ADS and access logs.
CONTROL_PLANE_CLUSTER = "torpor_xds"
CATCH_ALL_VHOST = "torpor_catch_all"
#: Response header by which the activator's HTTP/2 holder asks Envoy to replay a held
#: request (retry_on: retriable-headers) once the service's endpoints are back.
RETRY_HEADER = "x-torpor-retry"
_HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
#: Methods whose repetition has the effect of one call (RFC 9110 9.2.2): replayed after a reset.
IDEMPOTENT_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE")
#: Always safe to replay: the request never reached an upstream, or the activator asks for it.
SAFE_RETRY_ON = "connect-failure,refused-stream,reset-before-request,retriable-headers"
#: Also replays a request an upstream reset after it was sent (before any response header).
RESET_RETRY_ON = SAFE_RETRY_ON + ",reset"
#: Envoy's default stream idle timeout (5 min), set on every route: the listener's own
#: stream_idle_timeout is the header timeout (`_listener`).
STREAM_IDLE_TIMEOUT = 300.0


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "activators", _endpoint_set(self.activators))
        object.__setattr__(self, "activators_h2", _endpoint_set(self.activators_h2))


@dataclasses.dataclass(frozen=True)
class RoutedService:
    """One service as Envoy sees it: its Host, and where its cluster's traffic goes now."""

    name: str
    host: str
    endpoints: tuple[Endpoint, ...]
    http2: bool = False  # its cluster speaks HTTP/2 (h2c) to replicas and activator alike
    # Replay every method after an upstream reset, not only idempotent ones.
    retry_non_idempotent: bool = False


class ResourceBuilder:
    """Builds the resource maps for a service table, reusing what did not change."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        # name -> (host and retry choice it was built for, its VirtualHost)
        self._vhosts: dict[str, tuple[tuple[str, bool], route_components_pb2.VirtualHost]] = {}
        self._clusters: dict[str, tuple[bool, Resource]] = {}
        # name -> (endpoints it was built for, its ClusterLoadAssignment)
        self._endpoints: dict[str, tuple[tuple[Endpoint, ...], Resource]] = {}
        # The RouteConfiguration is ~290 bytes per service (2.8 MB at 10k): rebuilt and
        # re-hashed only when the (name, host) list changes, not on endpoint flips.
        self._routes: tuple[tuple[tuple[str, str, bool], ...], Resource] | None = None
        self._static = {
            types.LISTENER: {LISTENER_NAME: Resource.pack(LISTENER_NAME, self._listener())},
        }
        # The activator cluster never changes (EDS); the activator set lives in its CLA.
        self._activator = Resource.pack(ACTIVATOR_CLUSTER, self._activator_cluster())
        self._activator_endpoints = self._activator_load_assignment()

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
        return True

    def activator_targets(self, http2: bool) -> tuple[Endpoint, ...]:
        """Where a hibernated service's cluster points now: the HTTP/2 holders for a service
        that speaks HTTP/2, else (or when no replica has one) the HTTP/1 holders."""
        s = self.settings
        if http2 and s.activators_h2:
            return s.activators_h2
        return s.activators

    def build(self, services: Iterable[RoutedService]) -> dict[str, dict[str, Resource]]:
        """Every resource type for this service table (services sorted by name)."""
        ordered = sorted(services, key=lambda s: s.name)
        clusters = {ACTIVATOR_CLUSTER: self._activator}
        endpoints = {ACTIVATOR_CLUSTER: self._activator_endpoints}
        for svc in ordered:
            clusters[svc.name] = self._cluster(svc.name, svc.http2)
            endpoints[svc.name] = self._load_assignment(svc.name, svc.endpoints)
        routes = self._route_config(ordered)
        self._prune({s.name for s in ordered})
        return {
            types.CLUSTER: clusters,
            types.ENDPOINT: endpoints,
            types.LISTENER: dict(self._static[types.LISTENER]),
            types.ROUTE: {ROUTE_CONFIG_NAME: routes},
        }

    def _route_config(self, ordered: list[RoutedService]) -> Resource:
        key = tuple((s.name, s.host, s.retry_non_idempotent) for s in ordered)
        if self._routes is None or self._routes[0] != key:
            routes = route_pb2.RouteConfiguration(
                name=ROUTE_CONFIG_NAME,
                virtual_hosts=[*(self._vhost(n, h, r) for n, h, r in key), self._catch_all()],
            )
            self._routes = (key, Resource.pack(ROUTE_CONFIG_NAME, routes))
        return self._routes[1]

    def _prune(self, names: set[str]) -> None:
        """Drop cached protos of services that left the table (memory at 10k churn)."""
        if len(self._clusters) <= len(names) and len(self._vhosts) <= len(names):
            return
        self._vhosts = {k: v for k, v in self._vhosts.items() if k in names}
        self._clusters = {k: v for k, v in self._clusters.items() if k in names}
        self._endpoints = {k: v for k, v in self._endpoints.items() if k in names}

    # --- per service ----------------------------------------------------------------

    def _vhost(self, name: str, host: str,
               retry_non_idempotent: bool) -> route_components_pb2.VirtualHost:
        cached = self._vhosts.get(name)
        if cached is None or cached[0] != (host, retry_non_idempotent):
            vhost = self._vhost_proto(name, [host, f"{host}:*"], cluster=name,
                                      retry_non_idempotent=retry_non_idempotent)
            cached = self._vhosts[name] = ((host, retry_non_idempotent), vhost)
        return cached[1]

    def _vhost_proto(self, name: str, domains: list[str], cluster: str,
                     retry_non_idempotent: bool = False) -> route_components_pb2.VirtualHost:
        """A virtual host with its routes. Its request body buffer is what a retry can
        replay: bodies up to `retry_buffer_bytes` are kept until the response starts."""
        vhost = route_components_pb2.VirtualHost(
            name=name,
            domains=domains,
            routes=self._routes_to(name, cluster, retry_non_idempotent),
            # Not per_request_buffer_limit_bytes: deprecated in favour of this field.
            request_body_buffer_limit=wrappers_pb2.UInt64Value(
                value=self.settings.retry_buffer_bytes),
        )
        if name == CATCH_ALL_VHOST:  # what the access log keeps (_access_log)
            vhost.request_headers_to_add.append(base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=CATCH_ALL_MARKER, value=CATCH_ALL_VHOST),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD))
        return vhost

    def _routes_to(self, name: str, cluster: str,
                   retry_non_idempotent: bool) -> list[route_components_pb2.Route]:
        """One route replaying after a reset for every method (the service opted in), or
        two: idempotent methods with it, the others (POST, PATCH, ...) without it."""
        if retry_non_idempotent:
            return [self._route(name, cluster, RESET_RETRY_ON)]
        idempotent = self._route(f"{name}/idempotent", cluster, RESET_RETRY_ON)
        idempotent.match.headers.append(route_components_pb2.HeaderMatcher(
            name=":method",
            string_match=string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(
                regex="|".join(IDEMPOTENT_METHODS)))))
        return [idempotent, self._route(name, cluster, SAFE_RETRY_ON)]

    def _route(self, route_name: str, cluster: str, retry_on: str) -> route_components_pb2.Route:
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
        s = self.settings
        return route_components_pb2.Route(
            name=route_name,
            match=route_components_pb2.RouteMatch(prefix="/"),
            route=route_components_pb2.RouteAction(
                cluster=cluster,
                timeout=_duration(s.route_timeout),
                # Once routed, a stream may idle as long as Envoy's default allows: the
                # listener's shorter stream_idle_timeout only bounds reading the headers.
                idle_timeout=_duration(STREAM_IDLE_TIMEOUT),
                retry_policy=route_components_pb2.RetryPolicy(
                    retry_on=retry_on,
                    retriable_headers=[route_components_pb2.HeaderMatcher(
                        name=RETRY_HEADER, present_match=True)],
                    num_retries=wrappers_pb2.UInt32Value(value=s.retries),
                    retry_host_predicate=[
                        route_components_pb2.RetryPolicy.RetryHostPredicate(
                            name="envoy.retry_host_predicates.previous_hosts",
                            typed_config=_any(previous_hosts_pb2.PreviousHostsPredicate()),
                        )
                    ],
                    host_selection_retry_max_attempts=3,
                ),
            ),
        )

    def _cluster(self, name: str, http2: bool) -> Resource:
        cached = self._clusters.get(name)
        if cached is None or cached[0] != http2:
            s = self.settings
            cluster = cluster_pb2.Cluster(
                name=name,
                type=cluster_pb2.Cluster.EDS,
                eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(service_name=name,
                                                                        eds_config=_ads()),
                connect_timeout=_duration(s.connect_timeout),
                lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
                circuit_breakers=_circuit_breakers(s.max_requests),
                ignore_health_on_host_removal=True,
            )
            if http2:
                cluster.typed_extension_protocol_options[_HTTP_OPTIONS_KEY].CopyFrom(
                    _any(_http2_options()))
            cached = self._clusters[name] = (http2, Resource.pack(name, cluster))
        return cached[1]

    def _load_assignment(self, name: str, endpoints: tuple[Endpoint, ...]) -> Resource:
        cached = self._endpoints.get(name)
        if cached is None or cached[0] != endpoints:
            cached = self._endpoints[name] = (endpoints, Resource.pack(name, _cla(name, endpoints)))
        return cached[1]

    # --- shared resources ---------------------------------------------------------------

    def _catch_all(self) -> route_components_pb2.VirtualHost:
        """Unknown (or evicted) hosts go to the activator, which knows the service table."""
        return self._vhost_proto(CATCH_ALL_VHOST, ["*"], cluster=ACTIVATOR_CLUSTER)

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

    def _listener(self) -> listener_pb2.Listener:
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
                hcm_pb2.HttpFilter(name="envoy.filters.http.router",
                                   typed_config=_any(router_pb2.Router()))
            ],
            access_log=[_access_log()],
        )
        return listener_pb2.Listener(
            name=LISTENER_NAME,
            address=_socket(self.settings.listen),
            filter_chains=[
                listener_components_pb2.FilterChain(
                    filters=[
                        listener_components_pb2.Filter(
                            name="envoy.filters.network.http_connection_manager",
                            typed_config=_any(manager),
                        )
                    ]
                )
            ],
        )


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


def _access_log() -> accesslog_pb2.AccessLog:
    """Catch-all requests (CATCH_ALL_MARKER) are streamed to the control plane's
    access-log receiver."""
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
    return accesslog_pb2.AccessLog(name="envoy.access_loggers.http_grpc", filter=only,
                                   typed_config=_any(config))


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


def _circuit_breakers(limit: int) -> circuit_breaker_pb2.CircuitBreakers:
    """Thresholds for clusters whose requests the activator may hold. max_retries (parallel
    retries) is the request limit too: an activator replica that dies resets every request
    it held at once, and each retry beyond the ceiling is a 503 (measured with a tenth of
    the limit: 40 held requests dropped at once, 10 replayed, 30 lost to retry_overflow).
    Our retry_on never replays an answered request, and num_retries bounds each request.
    Connections stop at MAX_UPSTREAM_CONNECTIONS; the requests beyond queue in Envoy."""
    value = wrappers_pb2.UInt32Value(value=limit)
    return circuit_breaker_pb2.CircuitBreakers(
        thresholds=[
            circuit_breaker_pb2.CircuitBreakers.Thresholds(
                priority=base_pb2.DEFAULT,
                max_connections=wrappers_pb2.UInt32Value(
                    value=min(limit, MAX_UPSTREAM_CONNECTIONS)),
                max_pending_requests=value,
                max_requests=value,
                max_retries=value,
            )
        ]
    )


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

