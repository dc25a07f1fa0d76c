"""The service table → Envoy resources: the shape of what ResourceBuilder emits, and its
per-service caching (reuse what did not change, forget services that left)."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf.message import Message

from torpor.edge import EdgeLimits
from torpor.model import Endpoint
from xds_server import types
from xds_server.cache import Resource
from xds_server.resources import (
    ACTIVATOR_CLUSTER,
    CATCH_ALL_MARKER,
    CATCH_ALL_VHOST,
    CONTROL_PLANE_CLUSTER,
    LISTENER_NAME,
    MAX_UPSTREAM_CONNECTIONS,
    RETRY_HEADER,
    ROUTE_CONFIG_NAME,
    STREAM_IDLE_TIMEOUT,
    GatewaySettings,
    ResourceBuilder,
    RoutedService,
)

LISTEN = Endpoint("127.0.0.1", 10000)
ACTIVATOR = Endpoint("127.0.0.1", 18080)
ACTIVATOR_2 = Endpoint("127.0.0.2", 18080)
ACTIVATOR_H2 = Endpoint("127.0.0.1", 18081)
SETTINGS = GatewaySettings(listen=LISTEN, activators=(ACTIVATOR_2, ACTIVATOR),
                           activators_h2=(ACTIVATOR_H2,), route_timeout=150.0,
                           max_requests=5000, retries=2, retry_buffer_bytes=262_144)

ECHO = RoutedService("echo", "echo.localhost",
                     (Endpoint("127.0.0.1", 9001), Endpoint("127.0.0.1", 9002)))
SENTIMENT = RoutedService("sentiment", "sentiment.localhost", (Endpoint("127.0.0.1", 9101),))
ASLEEP = RoutedService("asleep", "asleep.localhost", (ACTIVATOR,))  # hibernating: → activator

M = TypeVar("M", bound=Message)


def unpack(resource: Resource, message: M) -> M:
    assert resource.body.Unpack(message), resource.body.type_url
    return message


def route_config(built: dict[str, dict[str, Resource]]) -> route_pb2.RouteConfiguration:
    assert set(built[types.ROUTE]) == {ROUTE_CONFIG_NAME}
    return unpack(built[types.ROUTE][ROUTE_CONFIG_NAME], route_pb2.RouteConfiguration())


def addresses(cla: endpoint_pb2.ClusterLoadAssignment) -> list[Endpoint]:
    return [
        Endpoint(lb.endpoint.address.socket_address.address,
                 lb.endpoint.address.socket_address.port_value)
        for locality in cla.endpoints
        for lb in locality.lb_endpoints
    ]


@pytest.fixture
def built() -> dict[str, dict[str, Resource]]:
    return ResourceBuilder(SETTINGS).build([SENTIMENT, ECHO, ASLEEP])


# --- the shape ---------------------------------------------------------------------------

def test_every_type_is_built_with_names_matching_the_keys(
    built: dict[str, dict[str, Resource]],
) -> None:
    assert set(built) == {types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE}
    for type_url, resources in built.items():
        for name, resource in resources.items():
            assert resource.name == name
            assert resource.body.type_url == type_url


def test_one_listener_whose_hcm_uses_rds_over_ads_and_logs_to_the_control_plane(
    built: dict[str, dict[str, Resource]],
) -> None:
    assert set(built[types.LISTENER]) == {LISTENER_NAME}
    listener = unpack(built[types.LISTENER][LISTENER_NAME], listener_pb2.Listener())
    assert listener.address.socket_address.address == LISTEN.host
    assert listener.address.socket_address.port_value == LISTEN.port
    (chain,) = listener.filter_chains
    (network_filter,) = chain.filters
    manager = hcm_pb2.HttpConnectionManager()
    assert network_filter.typed_config.Unpack(manager)

    assert manager.WhichOneof("route_specifier") == "rds"
    assert manager.rds.route_config_name == ROUTE_CONFIG_NAME
    assert manager.rds.config_source.HasField("ads")
    assert manager.rds.config_source.resource_api_version == config_source_pb2.V3
    assert [f.name for f in manager.http_filters][-1] == "envoy.filters.http.router"

    # The edge (torpor/edge.py): Envoy's limits are the activator's, WebSocket passes.
    assert manager.max_request_headers_kb.value == 60
    assert manager.common_http_protocol_options.max_headers_count.value == 100
    # The header timeout is the stream idle timeout (one timer per stream): nothing resets
    # it before the headers are in; every route then sets Envoy's default idle timeout.
    assert not manager.HasField("request_headers_timeout")
    assert manager.stream_idle_timeout.seconds == 10
    assert manager.HasField("generate_request_id") and not manager.generate_request_id.value
    assert manager.use_remote_address.value and manager.xff_num_trusted_hops == 0
    assert manager.normalize_path.value and manager.merge_slashes
    assert [u.upgrade_type for u in manager.upgrade_configs] == ["websocket"]

    (access_log,) = manager.access_log
    assert access_log.name == "envoy.access_loggers.http_grpc"
    als = als_pb2.HttpGrpcAccessLogConfig()
    assert access_log.typed_config.Unpack(als)
    common = als.common_config
    assert common.grpc_service.envoy_grpc.cluster_name == CONTROL_PLANE_CLUSTER
    assert common.transport_api_version == config_source_pb2.V3
    # Only the catch-all's requests are logged: those carrying the marker it adds.
    assert access_log.filter.WhichOneof("filter_specifier") == "header_filter"
    marker = access_log.filter.header_filter.header
    assert (marker.name, marker.present_match) == (CATCH_ALL_MARKER, True)


@pytest.mark.parametrize("code_stats", [False, True])
def test_the_router_adds_no_envoy_headers_and_dynamic_stats_follow_the_setting(
        code_stats: bool) -> None:
    """No x-envoy-* headers of the router's own; each service's answer classes (dynamic
    statistics) only with upstream_code_stats (measured: ~5 % of a warm request)."""
    builder = ResourceBuilder(dataclasses.replace(SETTINGS, upstream_code_stats=code_stats))
    listener = unpack(builder.build([ECHO])[types.LISTENER][LISTENER_NAME],
                      listener_pb2.Listener())
    manager = hcm_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    router = router_pb2.Router()
    assert manager.http_filters[-1].typed_config.Unpack(router)
    assert router.suppress_envoy_headers
    assert router.HasField("dynamic_stats") and router.dynamic_stats.value is code_stats


def test_one_vhost_per_service_sorted_then_the_catch_all_last(
    built: dict[str, dict[str, Resource]],
) -> None:
    config = route_config(built)
    assert config.name == ROUTE_CONFIG_NAME
    assert [(v.name, list(v.domains)) for v in config.virtual_hosts] == [
        ("asleep", ["asleep.localhost", "asleep.localhost:*"]),
        ("echo", ["echo.localhost", "echo.localhost:*"]),
        ("sentiment", ["sentiment.localhost", "sentiment.localhost:*"]),
        (CATCH_ALL_VHOST, ["*"]),
    ]
    for vhost in config.virtual_hosts:
        idempotent, other = main_routes(vhost)
        assert [idempotent.name, other.name] == [f"{vhost.name}/idempotent", vhost.name]
        target = ACTIVATOR_CLUSTER if vhost.name == CATCH_ALL_VHOST else vhost.name
        for route in main_routes(vhost):
            assert route.match.prefix == "/"
            assert route.route.cluster == target
        (method,) = idempotent.match.headers
        assert method.name == ":method"
        assert method.string_match.safe_regex.regex == "GET|HEAD|OPTIONS|PUT|DELETE|TRACE"
        assert not other.match.headers  # everything else: POST, PATCH, unknown methods


SAFE = {"connect-failure", "refused-stream", "reset-before-request", "retriable-headers"}
HTTP1_SAFE = SAFE - {"retriable-headers"}


def effective_policy(vhost: route_components_pb2.VirtualHost,
                     route: route_components_pb2.Route) -> route_components_pb2.RetryPolicy:
    """A route's own retry policy, else its virtual host's (Envoy's rule)."""
    return route.route.retry_policy if route.route.HasField("retry_policy") \
        else vhost.retry_policy


def main_routes(vhost: route_components_pb2.VirtualHost) -> list[route_components_pb2.Route]:
    """A virtual host's routes to its service (without those of asynchronous calls)."""
    return [r for r in vhost.routes if not r.name.endswith(("/async", "/async-status"))]


def test_asynchronous_calls_and_their_status_go_to_the_activator_first(
    built: dict[str, dict[str, Resource]],
) -> None:
    """Every service's virtual host starts with two routes to the activator: the status
    path of asynchronous calls, and any request that prefers an asynchronous answer;
    neither replays after a reset (an accepted call is never made twice)."""
    for vhost in route_config(built).virtual_hosts:
        if vhost.name == CATCH_ALL_VHOST:
            assert [r.name for r in vhost.routes] == [f"{CATCH_ALL_VHOST}/idempotent",
                                                      CATCH_ALL_VHOST]
            continue
        status, submit = vhost.routes[:2]
        assert status.match.prefix == "/.torpor/async/"
        (prefer,) = submit.match.headers
        assert (prefer.name, prefer.string_match.contains) == ("prefer", "respond-async")
        assert prefer.string_match.ignore_case
        for route in (status, submit):
            assert route.route.cluster == ACTIVATOR_CLUSTER
            assert set(effective_policy(vhost, route).retry_on.split(",")) == HTTP1_SAFE


def test_only_the_catch_all_marks_its_requests_for_the_access_log(
    built: dict[str, dict[str, Resource]],
) -> None:
    vhosts = {v.name: v for v in route_config(built).virtual_hosts}
    (marked,) = vhosts[CATCH_ALL_VHOST].request_headers_to_add
    assert marked.header.key == CATCH_ALL_MARKER
    # A client's own value (Envoy strips it from external requests anyway) never stays.
    assert marked.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    for name, vhost in vhosts.items():
        if name != CATCH_ALL_VHOST:
            assert not vhost.request_headers_to_add, name


def test_routes_outlast_a_cold_start_and_retry_only_safe_failures(
    built: dict[str, dict[str, Resource]],
) -> None:
    for vhost in route_config(built).virtual_hosts:
        retry_on = []
        for route in main_routes(vhost):
            action: route_components_pb2.RouteAction = route.route
            assert action.idle_timeout.ToSeconds() == STREAM_IDLE_TIMEOUT
            assert action.HasField("timeout")
            assert action.timeout.ToNanoseconds() == int(SETTINGS.route_timeout * 1e9)
            assert action.timeout.ToSeconds() > 15  # Envoy's default would cut cold starts
            policy = effective_policy(vhost, route)
            retry_on.append(set(policy.retry_on.split(",")))
            # No HTTP/1 service (the activator's marker is for HTTP/2 ones: see below)
            # retries on a response header: never on a service's own answer.
            assert not policy.retriable_headers
            assert policy.num_retries.value == SETTINGS.retries
            # A replay goes to another host: never back to the activator replica that died.
            assert [p.name for p in policy.retry_host_predicate] == [
                "envoy.retry_host_predicates.previous_hosts"
            ]
            assert policy.host_selection_retry_max_attempts == 3
        # "reset" (an upstream that died after the request was sent, before answering)
        # replays idempotent methods only: a POST may have run.
        assert retry_on == [HTTP1_SAFE | {"reset"}, HTTP1_SAFE]


def test_only_http2_services_retry_on_the_activators_replay_marker() -> None:
    """The activator's HTTP/2 holder answers "replay me" (x-torpor-retry) once the
    service is awake; its HTTP/1 holder proxies itself: only HTTP/2 services look for the
    marker (matching it costs every request)."""
    h2 = RoutedService("grpc", "grpc.localhost", ECHO.endpoints, http2=True)
    vhosts = {v.name: v for v in route_config(
        ResourceBuilder(SETTINGS).build([h2, ECHO])).virtual_hosts}
    for route in main_routes(vhosts["grpc"]):
        policy = effective_policy(vhosts["grpc"], route)
        assert "retriable-headers" in policy.retry_on.split(",")
        assert [(h.name, h.present_match) for h in policy.retriable_headers] == [
            (RETRY_HEADER, True)]
    for route in main_routes(vhosts["echo"]):
        assert "retriable-headers" not in effective_policy(vhosts["echo"], route).retry_on


def test_a_service_that_opts_in_replays_every_method_after_a_reset() -> None:
    opted = RoutedService("opted", "opted.localhost", ECHO.endpoints, retry_non_idempotent=True)
    built = ResourceBuilder(SETTINGS).build([opted, ECHO])
    vhosts = {v.name: v for v in route_config(built).virtual_hosts}
    (route,) = main_routes(vhosts["opted"])
    assert not route.match.headers
    assert set(route.route.retry_policy.retry_on.split(",")) == HTTP1_SAFE | {"reset"}
    assert len(main_routes(vhosts["echo"])) == 2
    # Opting out again rebuilds the virtual host (it is cached per service).
    builder = ResourceBuilder(SETTINGS)
    builder.build([opted])
    again = builder.build([dataclasses.replace(opted, retry_non_idempotent=False)])
    (vhost,) = (v for v in route_config(again).virtual_hosts if v.name == "opted")
    assert len(main_routes(vhost)) == 2


def test_every_vhost_buffers_request_bodies_up_to_the_retry_limit(
    built: dict[str, dict[str, Resource]],
) -> None:
    """What a retry can replay: without the body kept, a reset request is lost."""
    vhosts = route_config(built).virtual_hosts
    assert [v.name for v in vhosts][-1] == CATCH_ALL_VHOST
    for vhost in vhosts:
        assert vhost.HasField("request_body_buffer_limit"), vhost.name
        assert vhost.request_body_buffer_limit.value == SETTINGS.retry_buffer_bytes
        # The deprecated field stays unset (Envoy warns on it).
        assert not vhost.HasField("per_request_buffer_limit_bytes"), vhost.name


def test_the_default_retry_buffer_is_one_mebibyte() -> None:
    assert GatewaySettings(listen=LISTEN).retry_buffer_bytes == 1_048_576


def test_edge_limits_come_from_the_settings() -> None:
    settings = GatewaySettings(listen=LISTEN, activators=(ACTIVATOR,),
                               edge=EdgeLimits(max_request_headers_kb=16))
    built = ResourceBuilder(settings).build([ECHO])
    listener = unpack(built[types.LISTENER][LISTENER_NAME], listener_pb2.Listener())
    manager = hcm_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    assert manager.max_request_headers_kb.value == 16
    timeout = GatewaySettings(listen=LISTEN, edge=EdgeLimits(request_headers_timeout=2.5))
    built = ResourceBuilder(timeout).build([ECHO])
    listener = unpack(built[types.LISTENER][LISTENER_NAME], listener_pb2.Listener())
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    assert manager.stream_idle_timeout.ToMilliseconds() == 2500


def test_one_eds_cluster_per_service_over_ads_with_raised_circuit_breakers(
    built: dict[str, dict[str, Resource]],
) -> None:
    assert set(built[types.CLUSTER]) == {ACTIVATOR_CLUSTER, "asleep", "echo", "sentiment"}
    for name in ("asleep", "echo", "sentiment"):
        cluster = unpack(built[types.CLUSTER][name], cluster_pb2.Cluster())
        assert cluster.name == name
        assert cluster.type == cluster_pb2.Cluster.EDS
        assert cluster.eds_cluster_config.service_name == name
        assert cluster.eds_cluster_config.eds_config.HasField("ads")
        assert (cluster.eds_cluster_config.eds_config.resource_api_version
                == config_source_pb2.V3)
        assert_thresholds(cluster)


def test_the_activator_cluster_is_eds_over_ads_with_raised_circuit_breakers(
    built: dict[str, dict[str, Resource]],
) -> None:
    cluster = unpack(built[types.CLUSTER][ACTIVATOR_CLUSTER], cluster_pb2.Cluster())
    assert cluster.type == cluster_pb2.Cluster.EDS
    assert cluster.eds_cluster_config.service_name == ACTIVATOR_CLUSTER
    assert cluster.eds_cluster_config.eds_config.HasField("ads")
    assert not cluster.HasField("load_assignment")
    assert_thresholds(cluster)


def test_the_activator_cla_lists_every_http1_activator_sorted(
    built: dict[str, dict[str, Resource]],
) -> None:
    cla = activator_cla(built)
    assert cla.cluster_name == ACTIVATOR_CLUSTER
    assert addresses(cla) == [ACTIVATOR, ACTIVATOR_2]  # sorted; never the h2 holders


def activator_cla(built: dict[str, dict[str, Resource]]) -> endpoint_pb2.ClusterLoadAssignment:
    return unpack(built[types.ENDPOINT][ACTIVATOR_CLUSTER], endpoint_pb2.ClusterLoadAssignment())


def assert_thresholds(cluster: cluster_pb2.Cluster) -> None:
    (thresholds,) = cluster.circuit_breakers.thresholds
    assert thresholds.priority == base_pb2.DEFAULT
    # max_retries too: a dying activator replica's held requests all retry at once.
    for field in ("max_pending_requests", "max_requests", "max_retries"):
        value = getattr(thresholds, field)
        assert thresholds.HasField(field), field
        assert value.value >= SETTINGS.max_requests, field
    # Connections stop below the descriptors a held request each would take; the rest of
    # the requests queue in Envoy (pending), they are not refused.
    assert SETTINGS.max_requests > MAX_UPSTREAM_CONNECTIONS
    assert thresholds.max_connections.value == MAX_UPSTREAM_CONNECTIONS


def test_cla_endpoints_equal_the_given_endpoints(
    built: dict[str, dict[str, Resource]],
) -> None:
    assert set(built[types.ENDPOINT]) == {ACTIVATOR_CLUSTER, "asleep", "echo", "sentiment"}
    for service in (ECHO, SENTIMENT, ASLEEP):
        cla = unpack(built[types.ENDPOINT][service.name], endpoint_pb2.ClusterLoadAssignment())
        assert cla.cluster_name == service.name
        assert addresses(cla) == list(service.endpoints)


def test_an_empty_table_still_has_the_listener_activator_and_catch_all() -> None:
    built = ResourceBuilder(SETTINGS).build([])
    assert set(built[types.CLUSTER]) == {ACTIVATOR_CLUSTER}
    assert set(built[types.ENDPOINT]) == {ACTIVATOR_CLUSTER}
    assert set(built[types.LISTENER]) == {LISTENER_NAME}
    assert [v.name for v in route_config(built).virtual_hosts] == [CATCH_ALL_VHOST]


# --- caching --------------------------------------------------------------------------------

def test_unchanged_services_reuse_the_same_resource_objects() -> None:
    builder = ResourceBuilder(SETTINGS)
    first = builder.build([ECHO, SENTIMENT])
    moved = RoutedService("sentiment", SENTIMENT.host, (Endpoint("127.0.0.1", 9102),))
    second = builder.build([ECHO, moved])
    for type_url in (types.CLUSTER, types.LISTENER):
        for name, resource in first[type_url].items():
            assert second[type_url][name] is resource, (types.short(type_url), name)
    assert second[types.ENDPOINT]["echo"] is first[types.ENDPOINT]["echo"]
    assert second[types.ENDPOINT]["sentiment"] is not first[types.ENDPOINT]["sentiment"]
    assert second[types.ENDPOINT]["sentiment"].digest != first[types.ENDPOINT]["sentiment"].digest
    # Flipping back to a previous endpoint set builds it anew: only one CLA per service kept.
    assert "sentiment" in builder._endpoints
    # The routes did not change: same digest (the RouteConfiguration is repacked each build).
    assert (second[types.ROUTE][ROUTE_CONFIG_NAME].digest
            == first[types.ROUTE][ROUTE_CONFIG_NAME].digest)


def test_equal_tables_build_equal_digests_in_any_order() -> None:
    one = ResourceBuilder(SETTINGS).build([ECHO, SENTIMENT, ASLEEP])
    two = ResourceBuilder(SETTINGS).build([ASLEEP, SENTIMENT, ECHO])
    for type_url in one:
        assert {n: r.digest for n, r in one[type_url].items()} == {
            n: r.digest for n, r in two[type_url].items()
        }


def test_a_host_change_changes_only_the_routes() -> None:
    builder = ResourceBuilder(SETTINGS)
    first = builder.build([ECHO])
    second = builder.build([RoutedService("echo", "echo2.localhost", ECHO.endpoints)])
    assert second[types.CLUSTER]["echo"] is first[types.CLUSTER]["echo"]
    assert second[types.ENDPOINT]["echo"] is first[types.ENDPOINT]["echo"]
    assert list(route_config(second).virtual_hosts[0].domains) == [
        "echo2.localhost", "echo2.localhost:*",
    ]


def test_a_host_change_drops_the_old_vhost_from_the_cache() -> None:
    builder = ResourceBuilder(SETTINGS)
    builder.build([ECHO])
    builder.build([RoutedService("echo", "echo2.localhost", ECHO.endpoints)])
    assert {name: key[1] for name, (key, _) in builder._vhost_fields.items()} == {
        "echo": ("echo2.localhost",)}


def test_a_removed_services_caches_are_pruned() -> None:
    builder = ResourceBuilder(SETTINGS)
    first = builder.build([ECHO, SENTIMENT])
    second = builder.build([ECHO])
    assert set(second[types.CLUSTER]) == {ACTIVATOR_CLUSTER, "echo"}
    assert set(second[types.ENDPOINT]) == {ACTIVATOR_CLUSTER, "echo"}
    assert [v.name for v in route_config(second).virtual_hosts] == ["echo", CATCH_ALL_VHOST]
    assert set(builder._vhost_fields) == {"echo"}
    assert set(builder._clusters) == {"echo"}
    assert set(builder._endpoints) == {"echo"}
    # Coming back, it is built anew (nothing of it was kept), with the same content.
    third = builder.build([ECHO, SENTIMENT])
    assert third[types.CLUSTER]["sentiment"] is not first[types.CLUSTER]["sentiment"]
    assert third[types.CLUSTER]["sentiment"].digest == first[types.CLUSTER]["sentiment"].digest
    assert third[types.ENDPOINT]["sentiment"] is not first[types.ENDPOINT]["sentiment"]


def test_http2_services_get_an_h2_cluster() -> None:
    builder = ResourceBuilder(SETTINGS)
    built = builder.build([RoutedService("grpc", "grpc.localhost", (), http2=True),
                           RoutedService("web", "web.localhost", ())])
    grpc_cluster = unpack(built[types.CLUSTER]["grpc"], cluster_pb2.Cluster())
    web_cluster = unpack(built[types.CLUSTER]["web"], cluster_pb2.Cluster())
    key = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    assert key in grpc_cluster.typed_extension_protocol_options
    assert key not in web_cluster.typed_extension_protocol_options


# --- the activator fleet ------------------------------------------------------------------

def test_settings_keep_activator_sets_sorted_and_unique() -> None:
    settings = GatewaySettings(listen=LISTEN, activators=(ACTIVATOR_2, ACTIVATOR, ACTIVATOR_2))
    assert settings.activators == (ACTIVATOR, ACTIVATOR_2)
    assert settings.activators_h2 == ()


def test_activator_targets_are_the_h2_set_for_http2_services_else_the_http1_set() -> None:
    builder = ResourceBuilder(SETTINGS)
    assert builder.activator_targets(http2=False) == (ACTIVATOR, ACTIVATOR_2)
    assert builder.activator_targets(http2=True) == (ACTIVATOR_H2,)
    # No HTTP/2 holder anywhere: HTTP/2 services fall back to the HTTP/1 set.
    assert builder.set_activators((ACTIVATOR,), ())
    assert builder.activator_targets(http2=True) == (ACTIVATOR,)


def test_set_activators_changes_only_the_activator_cla() -> None:
    builder = ResourceBuilder(SETTINGS)
    first = builder.build([ECHO, ASLEEP])
    third = Endpoint("127.0.0.3", 18080)
    assert builder.set_activators((third, ACTIVATOR, third), (ACTIVATOR_H2,)) is True
    second = builder.build([ECHO, ASLEEP])
    assert addresses(activator_cla(second)) == [ACTIVATOR, third]
    assert builder.settings.activators == (ACTIVATOR, third)
    assert builder.activator_targets(http2=False) == (ACTIVATOR, third)
    for type_url in (types.CLUSTER, types.LISTENER):
        for name, resource in first[type_url].items():
            assert second[type_url][name] is resource, (types.short(type_url), name)
    # Services' CLAs are their callers' to change (the table passes activator_targets).
    assert second[types.ENDPOINT]["asleep"] is first[types.ENDPOINT]["asleep"]
    assert (second[types.ROUTE][ROUTE_CONFIG_NAME].digest
            == first[types.ROUTE][ROUTE_CONFIG_NAME].digest)


def test_hibernated_services_follow_the_new_targets() -> None:
    builder = ResourceBuilder(SETTINGS)
    asleep = RoutedService("asleep", "asleep.localhost", builder.activator_targets(False))
    first = builder.build([asleep])
    builder.set_activators((ACTIVATOR_2,), ())
    asleep = RoutedService("asleep", "asleep.localhost", builder.activator_targets(False))
    second = builder.build([asleep])
    cla = unpack(second[types.ENDPOINT]["asleep"], endpoint_pb2.ClusterLoadAssignment())
    assert addresses(cla) == [ACTIVATOR_2]
    assert second[types.ENDPOINT]["asleep"].digest != first[types.ENDPOINT]["asleep"].digest


def test_set_activators_reports_no_change_for_the_same_sets_in_any_order() -> None:
    builder = ResourceBuilder(SETTINGS)
    first = builder.build([ECHO])
    assert builder.set_activators((ACTIVATOR, ACTIVATOR_2, ACTIVATOR), (ACTIVATOR_H2,)) is False
    assert builder.build([ECHO])[types.ENDPOINT][ACTIVATOR_CLUSTER] is (
        first[types.ENDPOINT][ACTIVATOR_CLUSTER])


def test_an_h2_only_change_is_a_change_but_keeps_the_activator_cla() -> None:
    builder = ResourceBuilder(SETTINGS)
    first = builder.build([])
    assert builder.set_activators(SETTINGS.activators, ()) is True
    assert builder.activator_targets(http2=True) == SETTINGS.activators
    assert builder.build([])[types.ENDPOINT][ACTIVATOR_CLUSTER] is (
        first[types.ENDPOINT][ACTIVATOR_CLUSTER])


def test_no_activator_reachable_is_an_empty_activator_cla() -> None:
    builder = ResourceBuilder(SETTINGS)
    assert builder.set_activators((), ()) is True
    built = builder.build([])
    assert addresses(activator_cla(built)) == []
    assert builder.activator_targets(http2=True) == ()
    assert builder.set_activators((), ()) is False


def test_the_route_table_joined_from_cached_virtual_hosts_is_its_own_serialization() -> None:
    """The RouteConfiguration is joined from each service's serialized virtual host (no
    proto rebuilt per add): byte for byte what protobuf's deterministic serialization of
    the same message gives, before and after services come, change and go."""
    builder = ResourceBuilder(SETTINGS)
    opted = dataclasses.replace(SENTIMENT, retry_non_idempotent=True)
    for table in ([ECHO], [ECHO, SENTIMENT, ASLEEP], [opted, ASLEEP], []):
        resource = builder.build(table)[types.ROUTE][ROUTE_CONFIG_NAME]
        config = route_pb2.RouteConfiguration()
        assert resource.body.Unpack(config)
        assert resource.body.value == config.SerializeToString(deterministic=True)
        assert [v.name for v in config.virtual_hosts] == [
            *sorted(s.name for s in table), CATCH_ALL_VHOST]


def test_without_asynchronous_calls_no_route_looks_for_them() -> None:
    """activator.async_calls: false: no virtual host routes the status path or the
    preference to the activator (that header check is work on every request)."""
    settings = dataclasses.replace(SETTINGS, async_calls=False)
    config = route_config(ResourceBuilder(settings).build([ECHO, SENTIMENT]))
    for vhost in config.virtual_hosts:
        assert vhost.routes == main_routes(vhost), vhost.name
        assert all(not h.name == "prefer" for r in vhost.routes for h in r.match.headers)
