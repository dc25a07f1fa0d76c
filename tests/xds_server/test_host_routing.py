"""`gateway.routing: host_header`: a service with the gateway's default routes on one
exact lower-case host (`host_routed`) is the cluster its Host names (`cluster_header:
:authority` on the `*` virtual host), with no virtual host of its own; every other service
keeps its virtual host and its cluster named by itself, as with `virtual_hosts`. What the
builder, the quarantine, the listener, the routing of evicted services and the config do
in that mode, each against the default mode."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.api_key_auth.v3 import api_key_auth_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st

from tests.support.workloads import FixedWorkloads
from tests.xds_server.test_resources import addresses, main_routes, route_config, unpack
from tests.xds_server.test_validation_shapes import PROPERTY
from torpor.catalog import ServiceCatalog
from torpor.clock import ManualClock
from torpor.config import LocalServiceConfig, ServiceConfig, load_config
from torpor.errors import ConfigError
from torpor.model import Endpoint, ServiceRecord, ServiceState
from torpor.service_table import ServiceTable
from xds_server import types
from xds_server.cache import Resource, SnapshotCache
from xds_server.quarantine import QuarantineBuilder
from xds_server.resources import (
    ACTIVATOR_CLUSTER,
    API_KEY_FILTER,
    CATCH_ALL_MARKER,
    CATCH_ALL_VHOST,
    HOST_VHOST,
    LISTENER_NAME,
    ROUTE_CONFIG_NAME,
    ApiKeys,
    GatewaySettings,
    ResourceBuilder,
    RoutedService,
    host_routed,
)
from xds_server.routing import EnvoyRouting
from xds_server.server import AdsServer

ACTIVATOR = Endpoint("127.0.0.1", 18080)
BY_NAME = GatewaySettings(listen=Endpoint("127.0.0.1", 10000), activators=(ACTIVATOR,),
                          route_timeout=150.0)
BY_HOST = dataclasses.replace(BY_NAME, routing="host_header")

PLAIN = RoutedService("echo", "echo.test", (Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80)))
OTHER = RoutedService("sentiment", "sentiment.test", (Endpoint("10.0.0.3", 80),))

Built = dict[str, dict[str, Resource]]


def build(settings: GatewaySettings, table: list[RoutedService]) -> Built:
    return {t: dict(rs) for t, rs in ResourceBuilder(settings).build(table).items()}


def cluster(built: Built, name: str) -> cluster_pb2.Cluster:
    return unpack(built[types.CLUSTER][name], cluster_pb2.Cluster())


def cla(built: Built, name: str) -> endpoint_pb2.ClusterLoadAssignment:
    """The endpoints of cluster `name`: its ClusterLoadAssignment, or, for a cluster found
    by Host (STATIC), the assignment inside it."""
    if name in built[types.ENDPOINT]:
        return unpack(built[types.ENDPOINT][name], endpoint_pb2.ClusterLoadAssignment())
    return cluster(built, name).load_assignment


def vhosts(built: Built) -> dict[str, route_components_pb2.VirtualHost]:
    return {v.name: v for v in route_config(built).virtual_hosts}


def domains(built: Built) -> set[str]:
    return {d for v in route_config(built).virtual_hosts for d in v.domains}


def manager(built: Built) -> hcm_pb2.HttpConnectionManager:
    listener = unpack(built[types.LISTENER][LISTENER_NAME], listener_pb2.Listener())
    found = hcm_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(found)
    return found


# --- a plain service --------------------------------------------------------------------

def test_a_plain_service_is_a_cluster_named_by_its_host_with_no_virtual_host() -> None:
    assert host_routed(PLAIN) and host_routed(OTHER)
    built = build(BY_HOST, [PLAIN, OTHER])
    assert set(built[types.CLUSTER]) == {ACTIVATOR_CLUSTER, "echo.test", "sentiment.test"}
    # its endpoints are in its cluster (STATIC): no ClusterLoadAssignment of its own
    assert set(built[types.ENDPOINT]) == {ACTIVATOR_CLUSTER}
    made = cluster(built, "echo.test")
    assert made.name == "echo.test"
    assert made.alt_stat_name == "echo"  # Envoy's statistics stay cluster.echo.*
    assert not made.HasField("eds_cluster_config")
    assert made.type == cluster_pb2.Cluster.STATIC
    endpoints = cla(built, "echo.test")
    assert endpoints.cluster_name == "echo.test"
    assert addresses(endpoints) == list(PLAIN.endpoints)
    assert ResourceBuilder(BY_HOST).cluster_name(PLAIN) == "echo.test"

    # The route table: only the `*` virtual host, which reads the cluster from the Host.
    assert list(vhosts(built)) == [HOST_VHOST]
    assert domains(built) == {"*"}
    by_host = vhosts(built)[HOST_VHOST]
    assert list(by_host.domains) == ["*"]
    routes = main_routes(by_host)
    assert [r.name for r in routes] == [f"{HOST_VHOST}/idempotent", HOST_VHOST]
    for route in routes:
        assert route.match.prefix == "/"
        assert route.route.WhichOneof("cluster_specifier") == "cluster_header"
        assert route.route.cluster_header == ":authority"
        assert route.route.cluster_not_found_response_code == \
            route_components_pb2.RouteAction.NOT_FOUND
        assert route.route.timeout.ToSeconds() == 150
    # Asynchronous calls (their status, a preference for one) still go to the activator.
    rest = [r for r in by_host.routes if r not in routes]
    assert [r.name for r in rest] == [f"{HOST_VHOST}/async-status", f"{HOST_VHOST}/async"]
    assert all(r.route.cluster == ACTIVATOR_CLUSTER for r in rest)
    assert CATCH_ALL_VHOST not in vhosts(built)


def test_the_default_mode_builds_the_same_table_by_service_name() -> None:
    built = build(BY_NAME, [PLAIN, OTHER])
    assert ResourceBuilder(BY_NAME).cluster_name(PLAIN) == "echo"
    assert set(built[types.CLUSTER]) == {ACTIVATOR_CLUSTER, "echo", "sentiment"}
    assert set(built[types.ENDPOINT]) == {ACTIVATOR_CLUSTER, "echo", "sentiment"}
    made = cluster(built, "echo")
    assert made.alt_stat_name == "" and made.eds_cluster_config.service_name == "echo"
    assert cla(built, "echo").cluster_name == "echo"
    assert list(vhosts(built)) == ["echo", "sentiment", CATCH_ALL_VHOST]
    assert list(vhosts(built)["echo"].domains) == ["echo.test", "echo.test:*"]
    for vhost in route_config(built).virtual_hosts:
        for route in vhost.routes:
            assert route.route.WhichOneof("cluster_specifier") == "cluster", route.name
    assert main_routes(vhosts(built)["echo"])[0].route.cluster == "echo"


def test_an_empty_table_in_host_mode_has_the_by_host_virtual_host_only() -> None:
    built = build(BY_HOST, [])
    assert set(built[types.CLUSTER]) == {ACTIVATOR_CLUSTER}
    assert list(vhosts(built)) == [HOST_VHOST]


# --- services that keep their virtual host ----------------------------------------------

NOT_PLAIN = {
    "paths": dataclasses.replace(PLAIN, paths=("/v1",)),
    "rate limit": dataclasses.replace(PLAIN, rate_limit=(10, 20)),
    "http2": dataclasses.replace(PLAIN, http2=True),
    "extra host": dataclasses.replace(PLAIN, hosts=("alias.test",)),
    "wildcard host": dataclasses.replace(PLAIN, host="*.x.test"),
    "host without a dot": dataclasses.replace(PLAIN, host="echolocal"),
    "upper-case host": dataclasses.replace(PLAIN, host="Echo.test"),
    "host with a port": dataclasses.replace(PLAIN, host="echo.test:8080"),
    "host with an underscore": dataclasses.replace(PLAIN, host="echo_1.test"),
    "host with a trailing dot": dataclasses.replace(PLAIN, host="echo.test."),
    "rewrite": dataclasses.replace(PLAIN, paths=("/api",), rewrite="/"),
    "auth": dataclasses.replace(PLAIN, auth=ApiKeys((("client", "key"),))),
    "route timeout": dataclasses.replace(PLAIN, route_timeout=600.0),
    "retry non-idempotent": dataclasses.replace(PLAIN, retry_non_idempotent=True),
}


@pytest.mark.parametrize("why", sorted(NOT_PLAIN))
def test_a_service_with_routes_of_its_own_keeps_its_virtual_host_and_cluster_name(
        why: str) -> None:
    svc = NOT_PLAIN[why]
    assert not host_routed(svc)
    built = build(BY_HOST, [svc, OTHER])
    assert set(built[types.CLUSTER]) == {ACTIVATOR_CLUSTER, "echo", "sentiment.test"}
    assert set(built[types.ENDPOINT]) == {ACTIVATOR_CLUSTER, "echo"}
    assert cluster(built, "echo").alt_stat_name == ""
    assert cla(built, "echo").cluster_name == "echo"
    found = vhosts(built)
    assert list(found) == ["echo", HOST_VHOST]
    assert set(svc.all_hosts()) <= set(found["echo"].domains)
    for route in main_routes(found["echo"]):
        assert route.route.cluster == "echo", route.name
    # And byte for byte what the default mode makes of it.
    default = build(BY_NAME, [svc])
    assert built[types.CLUSTER]["echo"].digest == default[types.CLUSTER]["echo"].digest
    assert vhosts(default)["echo"] == found["echo"]


def test_a_plain_service_sharing_its_host_is_routed_by_the_shared_virtual_host() -> None:
    pathed = RoutedService("echo-v1", "echo.test", (Endpoint("10.0.0.9", 80),),
                           paths=("/v1",))
    builder = ResourceBuilder(BY_HOST)
    built = builder.build([PLAIN, pathed])
    assert set(built[types.CLUSTER]) == {ACTIVATOR_CLUSTER, "echo.test", "echo-v1"}
    assert set(built[types.ENDPOINT]) == {ACTIVATOR_CLUSTER, "echo-v1"}
    found = vhosts({t: dict(rs) for t, rs in built.items()})
    assert list(found) == ["@echo.test", HOST_VHOST]
    shared = found["@echo.test"]
    assert list(shared.domains) == ["echo.test", "echo.test:*"]
    clusters = {r.match.prefix or r.match.path_separated_prefix: r.route.cluster
                for r in main_routes(shared)}
    assert clusters == {"/v1": "echo-v1", "/": "echo.test"}
    # The pathed one leaves: the plain one is found by its Host again, no virtual host.
    again = builder.build([PLAIN])
    assert list(vhosts({t: dict(rs) for t, rs in again.items()})) == [HOST_VHOST]
    assert set(again[types.CLUSTER]) == {ACTIVATOR_CLUSTER, "echo.test"}


# --- changes ------------------------------------------------------------------------------

def renamed(builder: ResourceBuilder, svc: RoutedService, old: str, new: str,
            endpoints: set[str]) -> Mapping[str, Mapping[str, Resource]]:
    """Update `svc`, whose cluster `old` becomes `new`: the resources now, after checking
    what was touched (both cluster names, its endpoints' name, the route table)."""
    builder.update({svc.name: svc})
    desired = builder.desired()
    now, touched = desired.resources, desired.touched
    assert touched is not None
    assert old not in now[types.CLUSTER] and new in now[types.CLUSTER]
    assert {old, new} <= touched[types.CLUSTER]
    assert set(now[types.ENDPOINT]) == endpoints
    assert touched[types.ENDPOINT] == {svc.name}
    assert touched[types.ROUTE] == {ROUTE_CONFIG_NAME}
    return now


def test_a_plain_service_becoming_pathed_and_back_renames_its_cluster() -> None:
    builder = ResourceBuilder(BY_HOST)
    builder.build([PLAIN, OTHER])
    pathed = dataclasses.replace(PLAIN, paths=("/v1",))

    now = renamed(builder, pathed, "echo.test", "echo", endpoints={ACTIVATOR_CLUSTER, "echo"})
    assert unpack(now[types.ENDPOINT]["echo"],
                  endpoint_pb2.ClusterLoadAssignment()).cluster_name == "echo"
    found = vhosts({t: dict(rs) for t, rs in now.items()})
    assert list(found) == ["echo", HOST_VHOST]
    assert {r.route.cluster for r in main_routes(found["echo"])} == {"echo"}

    now = renamed(builder, PLAIN, "echo", "echo.test", endpoints={ACTIVATOR_CLUSTER})
    assert list(vhosts({t: dict(rs) for t, rs in now.items()})) == [HOST_VHOST]
    # Nothing of the old name is kept (and no assignment of a STATIC cluster).
    assert set(builder._endpoints) == set()
    # The same table built afresh gives the same resources.
    fresh = ResourceBuilder(BY_HOST).build([PLAIN, OTHER])
    assert {t: {n: r.digest for n, r in rs.items()} for t, rs in now.items()} == \
        {t: {n: r.digest for n, r in rs.items()} for t, rs in fresh.items()}


def test_a_host_change_of_a_plain_service_renames_its_cluster() -> None:
    builder = ResourceBuilder(BY_HOST)
    builder.build([PLAIN])
    moved = dataclasses.replace(PLAIN, host="echo2.test")
    builder.update({"echo": moved})
    desired = builder.desired()
    assert desired.touched is not None
    assert set(desired.resources[types.CLUSTER]) == {ACTIVATOR_CLUSTER, "echo2.test"}
    assert desired.touched[types.CLUSTER] == {"echo.test", "echo2.test"}
    assert set(desired.resources[types.ENDPOINT]) == {ACTIVATOR_CLUSTER}
    assert cluster({t: dict(rs) for t, rs in desired.resources.items()},
                   "echo2.test").alt_stat_name == "echo"


@pytest.mark.parametrize("order", ["added first", "removed first"])
@pytest.mark.parametrize("builder_type", [ResourceBuilder, QuarantineBuilder])
def test_a_service_renamed_on_its_host_keeps_the_host_cluster(
        order: str, builder_type: type[ResourceBuilder]) -> None:
    """One update removes `zeta` and adds `alpha` on the same host (a service renamed in
    the config): the cluster named by the host is `alpha`'s, whichever comes first (the
    quarantine hands its changes over sorted by name: the new one first here)."""
    builder = builder_type(BY_HOST)
    zeta = dataclasses.replace(PLAIN, name="zeta")
    alpha = dataclasses.replace(PLAIN, name="alpha",
                                endpoints=(Endpoint("10.0.0.7", 80),))
    builder.build([zeta, OTHER])
    changes: dict[str, RoutedService | None] = \
        {"alpha": alpha, "zeta": None} if order == "added first" else {"zeta": None,
                                                                       "alpha": alpha}
    builder.update(changes)
    desired = builder.desired()
    now = {t: dict(rs) for t, rs in desired.resources.items()}
    assert set(now[types.CLUSTER]) == {ACTIVATOR_CLUSTER, "echo.test", "sentiment.test"}
    assert cluster(now, "echo.test").alt_stat_name == "alpha"
    assert addresses(cla(now, "echo.test")) == list(alpha.endpoints)
    assert desired.touched is not None and "echo.test" in desired.touched[types.CLUSTER]
    # Its endpoints change later: still one cluster by that name, alpha's.
    builder.update({"alpha": dataclasses.replace(alpha, endpoints=PLAIN.endpoints)})
    later = {t: dict(rs) for t, rs in builder.desired().resources.items()}
    assert addresses(cla(later, "echo.test")) == list(PLAIN.endpoints)


@pytest.mark.parametrize("names", [("a", "b"), ("b", "a")])
def test_a_host_given_up_and_taken_in_one_update_keeps_its_cluster(
        names: tuple[str, str]) -> None:
    """`a` moves to `b`'s host while `b` moves on to another, in one update, in either
    order: every host in use has its cluster, the one given up by all has none."""
    builder = ResourceBuilder(BY_HOST)
    a, b = (RoutedService(n, f"{n}.test", (Endpoint("10.0.0.1", 80 + i),))
            for i, n in enumerate("ab"))
    builder.build([a, b])
    moved = {"a": dataclasses.replace(a, host="b.test"),
             "b": dataclasses.replace(b, host="c.test")}
    builder.update({n: moved[n] for n in names})
    now = {t: dict(rs) for t, rs in builder.desired().resources.items()}
    assert set(now[types.CLUSTER]) == {ACTIVATOR_CLUSTER, "b.test", "c.test"}
    assert set(now[types.ENDPOINT]) == {ACTIVATOR_CLUSTER}
    assert cluster(now, "b.test").alt_stat_name == "a"
    assert cluster(now, "c.test").alt_stat_name == "b"
    assert addresses(cla(now, "b.test")) == list(a.endpoints)
    # Swapped back and forth: the same as built afresh.
    builder.update({"a": a, "b": b})
    again = builder.desired().resources
    fresh = ResourceBuilder(BY_HOST).build([a, b])
    assert {t: {n: r.digest for n, r in rs.items()} for t, rs in again.items()} == \
        {t: {n: r.digest for n, r in rs.items()} for t, rs in fresh.items()}


@pytest.mark.parametrize("settings", [BY_HOST, BY_NAME], ids=["host_header", "virtual_hosts"])
def test_adding_a_plain_service_touches_the_routes_only_by_virtual_hosts(
        settings: GatewaySettings) -> None:
    builder = ResourceBuilder(settings)
    before = builder.build([OTHER])[types.ROUTE][ROUTE_CONFIG_NAME]
    builder.update({"echo": PLAIN})
    desired = builder.desired()
    assert desired.touched is not None
    after = desired.resources[types.ROUTE][ROUTE_CONFIG_NAME]
    named = builder.cluster_name(PLAIN)
    assert desired.touched[types.CLUSTER] == {named}
    # found by Host, its endpoints are in its cluster
    assert desired.touched[types.ENDPOINT] == (
        frozenset() if settings.routing == "host_header" else {named})
    assert desired.touched[types.LISTENER] == frozenset()
    if settings.routing == "host_header":
        assert desired.touched[types.ROUTE] == frozenset()
        assert after is before
    else:
        assert desired.touched[types.ROUTE] == {ROUTE_CONFIG_NAME}
        assert after.digest != before.digest


@pytest.mark.parametrize("settings", [BY_HOST, BY_NAME], ids=["host_header", "virtual_hosts"])
def test_removing_a_plain_service_removes_its_cluster_and_endpoints(
        settings: GatewaySettings) -> None:
    builder = ResourceBuilder(settings)
    builder.build([PLAIN, OTHER])
    named = builder.cluster_name(PLAIN)
    builder.update({"echo": None})
    desired = builder.desired()
    assert desired.touched is not None
    for type_url in (types.CLUSTER, types.ENDPOINT):
        assert named not in desired.resources[type_url], types.short(type_url)
    assert desired.touched[types.CLUSTER] == {named}
    assert desired.touched[types.ENDPOINT] == (
        frozenset() if settings.routing == "host_header" else {named})
    assert named not in builder._endpoints and "echo" not in builder._clusters
    assert "echo" not in builder._cluster_names
    if settings.routing == "host_header":
        assert desired.touched[types.ROUTE] == frozenset()
    else:
        assert desired.touched[types.ROUTE] == {ROUTE_CONFIG_NAME}
    # Back again: built anew, the same bytes.
    again = builder.build([PLAIN, OTHER])
    assert again[types.CLUSTER][named].digest == \
        ResourceBuilder(settings).build([PLAIN])[types.CLUSTER][named].digest


# --- shapes and the quarantine ------------------------------------------------------------

def plain(i: int) -> RoutedService:
    return RoutedService(f"svc-{i}", f"svc-{i}.models.test", (Endpoint(f"10.1.{i}.1", 8080),))


def test_many_plain_services_render_their_clusters_by_shape_and_pass_the_quarantine() -> None:
    table = [plain(i) for i in range(50)]
    builder = QuarantineBuilder(BY_HOST)
    built = builder.build(table)
    assert builder.quarantined() == {}
    assert set(built[types.CLUSTER]) == {ACTIVATOR_CLUSTER, *(s.host for s in table)}
    # Clusters are rendered from the host-named shape (made once, then reused) ...
    keys = [k for k in builder._shapes_by_key if k[0] == "cds"]  # type: ignore[index]
    assert keys == [("cds", (False, None), "host", (8080,))]
    assert builder._shapes_by_key[keys[0]] is not None
    # ... and the quarantine passes each by it, without a walk.
    for svc in table[2:]:
        assert builder._passes_by_shape("cds", svc, built[types.CLUSTER][svc.host].body.value)
    for svc in table:
        direct = ResourceBuilder(BY_HOST)
        assert built[types.CLUSTER][svc.host].body.value == direct._direct("cds", svc)
        fresh = direct.build([svc])
        assert built[types.CLUSTER][svc.host].digest == fresh[types.CLUSTER][svc.host].digest
        made = unpack(built[types.CLUSTER][svc.host], cluster_pb2.Cluster())
        assert (made.name, made.alt_stat_name, made.type) == \
            (svc.host, svc.name, cluster_pb2.Cluster.STATIC)
        assert addresses(made.load_assignment) == list(svc.endpoints)


def test_a_plain_service_is_judged_by_its_cluster_alone() -> None:
    """Found by Host, a service has no virtual host of its own: the quarantine judges its
    cluster (the endpoints in it too) and makes none for it (at 10,000 services making
    and checking them was ~0.2 s of a first build). The services beside it that keep
    theirs (hosts without a dot) are judged by them, by shape for the second one."""
    builder = QuarantineBuilder(BY_HOST)
    table = [RoutedService("a", "alocal", PLAIN.endpoints),
             RoutedService("b", "blocal", PLAIN.endpoints), PLAIN,
             dataclasses.replace(OTHER, endpoints=PLAIN.endpoints)]
    built = builder.build(table)
    assert builder.quarantined() == {}
    assert set(builder._vhost_serialized) == {"a", "b"}
    assert set(vhosts(built)) == {"a", "b", HOST_VHOST}
    for svc in table[:2]:
        assert builder._made("rds", svc) == builder._direct("rds", svc), svc.name
        assert {r.route.cluster for r in main_routes(builder._vhost(svc))} == {svc.name}
    assert builder._passes_by_shape("rds", table[1], builder._vhost_bytes(table[1]))
    for svc in table[2:]:
        assert builder._passes_by_shape("cds", svc, cluster(built, svc.host)
                                        .SerializeToString(deterministic=True),
                                        addresses=True), svc.name


def test_a_plain_service_with_a_bad_endpoint_address_is_quarantined() -> None:
    """The one check of a plain service's cluster covers the endpoints in it."""
    builder = QuarantineBuilder(BY_HOST)
    bad = dataclasses.replace(plain(1), endpoints=(Endpoint("10.0.0.300", 80),))
    built = builder.build([plain(0), bad, plain(2)])
    assert set(builder.quarantined()) == {bad.name}
    assert "10.0.0.300" in (builder.problem(bad.name) or "")
    assert set(built[types.CLUSTER]) == {ACTIVATOR_CLUSTER, plain(0).host, plain(2).host}


@pytest.mark.parametrize("host", ["bad\nhost.test", "ok.test\x00"])
def test_a_service_with_a_broken_host_is_quarantined_not_published(host: str) -> None:
    """A host that is not plain DNS labels keeps the service's virtual host, so the
    quarantine judges it as a domain (the domains' rule) and keeps the cluster out."""
    builder = QuarantineBuilder(BY_HOST)
    bad = RoutedService("bad", host, (Endpoint("10.0.0.5", 80),))
    assert not host_routed(bad)
    built = builder.build([plain(0), plain(1), bad, plain(2)])
    assert "HTTP_HEADER_VALUE" in (builder.problem("bad") or "")
    assert set(builder.quarantined()) == {"bad"}
    assert set(built[types.CLUSTER]) == {ACTIVATOR_CLUSTER, *(plain(i).host for i in range(3))}
    assert set(built[types.ENDPOINT]) == {ACTIVATOR_CLUSTER}


_POOL_HOSTS = ("h1.test", "h2.test", "h3.test", "nodot", "Up.test")
_KINDS = ("plain", "plain", "pathed", "http2")


@st.composite
def tables(draw: st.DrawFn) -> dict[str, RoutedService]:
    """A table of up to five services on a few hosts, plain or not, that the builder
    takes as it is (no two services under one path of one host: the quarantine's)."""
    chosen = draw(st.dictionaries(st.sampled_from("abcde"), st.tuples(
        st.sampled_from(_POOL_HOSTS), st.sampled_from(_KINDS), st.integers(0, 1)),
        max_size=5))
    rooted: set[str] = set()
    table: dict[str, RoutedService] = {}
    for name, (host, kind, port) in sorted(chosen.items()):
        if kind != "pathed" and host in rooted:
            kind = "pathed"
        if kind != "pathed":
            rooted.add(host)
        table[name] = RoutedService(
            name, host, (Endpoint("10.0.0.1", 8000 + port),), http2=kind == "http2",
            paths=(f"/{name}",) if kind == "pathed" else ())
    return table


_GATEWAY_AUTHS = st.sampled_from([None, None, ApiKeys((("c", "k1"),)), ApiKeys((("c", "k2"),))])


@PROPERTY
@given(st.lists(st.tuples(tables(), st.randoms(use_true_random=False), _GATEWAY_AUTHS),
                min_size=1, max_size=5))
def test_in_host_mode_updates_in_any_order_give_the_table_built_afresh(
        steps: list[tuple[dict[str, RoutedService], random.Random, ApiKeys | None]]) -> None:
    """Whatever order an update's changes come in (services renamed, moved between hosts,
    plain or not, gateway.auth changed: services a-c ask it, d and e have `auth: none`):
    the resources are those of the table built afresh, and every name whose resource
    came, changed or went is among the touched ones (what the publisher sends)."""
    builder = ResourceBuilder(BY_HOST)
    current: dict[str, RoutedService] = {}
    before = digests(builder.build([]))
    for plain_table, rnd, gateway in steps:
        table = {n: dataclasses.replace(s, auth=gateway) if n in "abc" else s
                 for n, s in plain_table.items()}
        builder.set_gateway_auth(gateway)
        fresh = ResourceBuilder(BY_HOST)
        fresh.set_gateway_auth(gateway)
        changes: dict[str, RoutedService | None] = {
            **{n: None for n in current if n not in table},
            **{n: s for n, s in table.items() if current.get(n) != s}}
        order = list(changes)
        rnd.shuffle(order)
        builder.update({n: changes[n] for n in order})
        desired = builder.desired()
        now = digests(desired.resources)
        assert now == digests(fresh.build(list(table.values()))), order
        assert desired.touched is not None
        for type_url in now:
            moved = {n for n in now[type_url].keys() | before.get(type_url, {}).keys()
                     if now[type_url].get(n) != before.get(type_url, {}).get(n)}
            assert moved <= desired.touched[type_url], (types.short(type_url), order)
        current, before = table, now


def digests(built: Mapping[str, Mapping[str, Resource]]) -> dict[str, dict[str, bytes]]:
    return {t: {n: r.digest for n, r in rs.items()} for t, rs in built.items()}


# --- the listener ---------------------------------------------------------------------------

def test_the_listener_strips_ports_and_logs_and_answers_unknown_hosts_in_host_mode() -> None:
    found = manager(build(BY_HOST, [PLAIN]))
    assert found.strip_any_host_port
    (log,) = found.access_log
    assert log.filter.WhichOneof("filter_specifier") == "or_filter"
    either = log.filter.or_filter.filters
    assert [f.WhichOneof("filter_specifier") for f in either] == [
        "header_filter", "response_flag_filter"]
    assert (either[0].header_filter.header.name,
            either[0].header_filter.header.present_match) == (CATCH_ALL_MARKER, True)
    assert list(either[1].response_flag_filter.flags) == ["NC"]
    (unknown,) = [m for m in found.local_reply_config.mappers
                  if list(m.filter.response_flag_filter.flags) == ["NC"]]
    body = json_format.MessageToDict(unknown.body_format_override.json_format)
    assert body["error"] == "unknown_host"
    assert unknown.body_format_override.content_type == "application/json"


def test_the_listener_of_the_default_mode_has_none_of_it() -> None:
    found = manager(build(BY_NAME, [PLAIN]))
    # Not even set to false: the field is in a oneof, which would serialize it and change
    # the listener of every deployment that does not use the mode.
    assert found.WhichOneof("strip_port_mode") is None
    (log,) = found.access_log
    assert log.filter.WhichOneof("filter_specifier") == "header_filter"
    assert not [m for m in found.local_reply_config.mappers
                if "NC" in m.filter.response_flag_filter.flags]


# --- routing evicted services ----------------------------------------------------------------

class NoPublisher:
    async def publish(self, build: object) -> bool:
        return True


def evicted_routing(settings: GatewaySettings) -> EnvoyRouting:
    services = [ServiceConfig(name=n, host=f"{n}.test", local=LocalServiceConfig(command=("x",)))
                for n in ("awake", "gone")]
    workloads = FixedWorkloads({"awake": (Endpoint("127.0.0.1", 9),), "gone": ()})
    table = ServiceTable(ServiceCatalog(services), store=None,  # type: ignore[arg-type]
                         workloads=workloads, clock=ManualClock())
    for name, state in (("awake", ServiceState.ACTIVE), ("gone", ServiceState.EVICTED)):
        table.records[name] = dataclasses.replace(ServiceRecord.new(name, 1, 0.0),
                                                  state=state, revision=1)
    cache = SnapshotCache()
    return EnvoyRouting(table, workloads, builder=ResourceBuilder(settings), cache=cache,
                        ads=AdsServer(cache),
                        publisher=NoPublisher(),  # type: ignore[arg-type]
                        configured_activator=(ACTIVATOR, Endpoint("127.0.0.1", 18081)),
                        confirm_timeout=2.0)


def test_with_host_header_an_evicted_service_stays_routed_to_the_activator() -> None:
    envoy = evicted_routing(BY_HOST)
    shape = envoy._routed_service("gone")
    assert shape is not None and shape.endpoints == (ACTIVATOR,)
    resources = envoy.desired().resources
    assert set(resources[types.CLUSTER]) == {ACTIVATOR_CLUSTER, "awake.test", "gone.test"}
    built = {t: dict(rs) for t, rs in resources.items()}
    assert addresses(cla(built, "gone.test")) == [ACTIVATOR]
    assert addresses(cla(built, "awake.test")) == [Endpoint("127.0.0.1", 9)]
    assert envoy._routed_service("ghost") is None


def test_with_virtual_hosts_an_evicted_service_is_not_routed() -> None:
    envoy = evicted_routing(BY_NAME)
    assert envoy._routed_service("gone") is None
    resources = envoy.desired().resources
    assert set(resources[types.CLUSTER]) == {ACTIVATOR_CLUSTER, "awake"}
    assert "gone" not in {v.name for v in route_config(
        {t: dict(rs) for t, rs in resources.items()}).virtual_hosts}


# --- the config -------------------------------------------------------------------------------

CONFIG = """\
gateway: {{listen: 127.0.0.1:8080{routing}}}
services:
  - name: echo
    host: echo.localhost
    local: {{command: [python, -m, torpor.examples.model_server, --port, "{{port}}"]}}
"""


@pytest.mark.parametrize(("given_", "expected"), [
    ("", "virtual_hosts"), (", routing: virtual_hosts", "virtual_hosts"),
    (", routing: host_header", "host_header")])
def test_gateway_routing_loads(tmp_path: Path, given_: str, expected: str) -> None:
    path = tmp_path / "torpor.yaml"
    path.write_text(CONFIG.format(routing=given_), encoding="utf-8")
    assert load_config(path).gateway.routing == expected


@pytest.mark.parametrize("value", ["by_host", "HOST_HEADER", "1", "[host_header]"])
def test_an_unknown_gateway_routing_names_the_key(tmp_path: Path, value: str) -> None:
    path = tmp_path / "torpor.yaml"
    path.write_text(CONFIG.format(routing=f", routing: {value}"), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "gateway.routing"
    message = str(info.value)
    assert str(path) in message and ": gateway.routing: " in message
    assert "virtual_hosts" in message and "host_header" in message


@pytest.mark.parametrize("settings", [BY_HOST, BY_NAME], ids=["host_header", "virtual_hosts"])
def test_a_service_that_becomes_a_version_in_place_leaves_no_route_of_its_own(
        settings: GatewaySettings) -> None:
    """A routed service turned into a version of another (version_of set, same name): it is
    routed by its service's unit only, as in a table built afresh."""
    v1 = RoutedService("p-v1", "p.test", (Endpoint("10.0.0.1", 80),), version_of="p",
                       weight=100)
    before = RoutedService("a", "a.test", (Endpoint("10.0.0.2", 80),))
    after = RoutedService("a", "p.test", (Endpoint("10.0.0.2", 80),), version_of="p",
                          weight=0)
    builder = ResourceBuilder(settings)
    builder.build([before, v1])
    builder.update({"a": after})
    now = builder.desired().resources
    fresh = ResourceBuilder(settings).build([after, v1])
    assert {t: {n: r.digest for n, r in rs.items()} for t, rs in now.items()} == \
        {t: {n: r.digest for n, r in rs.items()} for t, rs in fresh.items()}
    assert set(vhosts({t: dict(rs) for t, rs in now.items()})) == {
        "p", HOST_VHOST if settings is BY_HOST else "torpor_catch_all"}


# --- gateway.auth ---------------------------------------------------------------------------

KEYS = ApiKeys((("client", "s3cret"),))


def api_keys_of(route: route_components_pb2.Route) -> list[str]:
    """The keys a route asks for (none: the route asks for nothing)."""
    found = route.typed_per_filter_config.get(API_KEY_FILTER)
    if found is None:
        return []
    turned_on = route_components_pb2.FilterConfig()
    found.Unpack(turned_on)
    per_route = api_key_auth_pb2.ApiKeyAuthPerRoute()
    turned_on.config.Unpack(per_route)
    return [c.key for c in per_route.credentials]


def test_with_gateway_auth_the_services_asking_it_are_found_by_host() -> None:
    """gateway.auth: the by-Host virtual host asks for its keys, and a service that asks
    the same (no auth of its own) is found by Host; one with `auth: none` has a virtual
    host of its own, which asks nothing; the listener has the API key filter."""
    builder = ResourceBuilder(BY_HOST)
    builder.set_gateway_auth(KEYS)
    open_one = dataclasses.replace(OTHER, auth=None)
    built = {t: dict(rs) for t, rs in builder.build(
        [dataclasses.replace(PLAIN, auth=KEYS), open_one]).items()}
    assert set(built[types.CLUSTER]) == {ACTIVATOR_CLUSTER, "echo.test", "sentiment"}
    found = vhosts(built)
    assert set(found) == {"sentiment", HOST_VHOST}
    assert all(api_keys_of(r) == ["s3cret"] for r in found[HOST_VHOST].routes)
    assert all(api_keys_of(r) == [] for r in found["sentiment"].routes)
    listener = unpack(built[types.LISTENER][LISTENER_NAME], listener_pb2.Listener())
    assert API_KEY_FILTER in json_format.MessageToJson(listener)


def test_a_change_of_gateway_auth_gives_the_table_built_with_it() -> None:
    """The keys file changes: every service that asks the gateway's keys asks the new ones
    and stays found by Host; a service whose own keys equal the new gateway keys joins."""
    new = ApiKeys((("client", "n3w"),))
    own_new = RoutedService("own", "own.test", (Endpoint("10.0.0.8", 80),), auth=new)
    builder = ResourceBuilder(BY_HOST)
    builder.set_gateway_auth(KEYS)
    builder.build([dataclasses.replace(PLAIN, auth=KEYS), own_new])
    assert builder.cluster_name(own_new) == "own"
    builder.set_gateway_auth(new)
    builder.update({"echo": dataclasses.replace(PLAIN, auth=new)})
    now = builder.desired().resources
    fresh = ResourceBuilder(BY_HOST)
    fresh.set_gateway_auth(new)
    expected = fresh.build([dataclasses.replace(PLAIN, auth=new), own_new])
    assert {t: {n: r.digest for n, r in rs.items()} for t, rs in now.items()} == \
        {t: {n: r.digest for n, r in rs.items()} for t, rs in expected.items()}
    assert set(now[types.CLUSTER]) == {ACTIVATOR_CLUSTER, "echo.test", "own.test"}
    assert all(api_keys_of(r) == ["n3w"] for r in vhosts(
        {t: dict(rs) for t, rs in now.items()})[HOST_VHOST].routes)


def test_gateway_auth_changes_nothing_with_virtual_hosts() -> None:
    builder = ResourceBuilder(BY_NAME)
    table = [dataclasses.replace(PLAIN, auth=KEYS), OTHER]
    before = builder.build(table)
    builder.set_gateway_auth(KEYS)
    builder.update({})
    after = builder.desired().resources
    assert {t: {n: r.digest for n, r in rs.items()} for t, rs in before.items()} == \
        {t: {n: r.digest for n, r in rs.items()} for t, rs in after.items()}
