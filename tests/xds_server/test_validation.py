"""The validator reads Envoy's own PGV rules from the protos' descriptors and states
Envoy's cross-resource rules (tables of cases, no Envoy here; the property test in
tests/integration/test_envoy_accepts_property.py checks it against a real Envoy)."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.route.v3 import route_components_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from torpor.model import Endpoint
from xds_server import types
from xds_server.resources import GatewaySettings, ResourceBuilder, RoutedService
from xds_server.validation import (
    MAX_DURATION_SECONDS,
    check_domains,
    check_endpoint_addresses,
    check_message,
    domain_table,
)

SETTINGS = GatewaySettings(listen=Endpoint("127.0.0.1", 8080),
                           activators=(Endpoint("127.0.0.1", 9),))


def test_what_torpor_builds_passes() -> None:
    built = ResourceBuilder(SETTINGS).build([
        RoutedService("a", "a.test", (Endpoint("127.0.0.1", 1),)),
        RoutedService("b", "b.test", (Endpoint("::1", 2),), http2=True)])
    for resources in built.values():
        for resource in resources.values():
            assert check_message(resource.body) == [], resource.name
    assert set(built) == {types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE}


def cluster(**fields: object) -> cluster_pb2.Cluster:
    base = cluster_pb2.Cluster(name="c", type=cluster_pb2.Cluster.STATIC,
                               connect_timeout=duration_pb2.Duration(seconds=1))
    for key, value in fields.items():
        field = getattr(base, key) if hasattr(value, "DESCRIPTOR") else None
        if field is not None:
            field.CopyFrom(value)
        else:
            setattr(base, key, value)
    return base


@pytest.mark.parametrize(("message", "expected"), [
    # duration {gt: 0s} on connect_timeout, and Envoy's "positive duration" check
    (cluster(connect_timeout=duration_pb2.Duration(seconds=-1)), "must be > 0s, got -1s"),
    (cluster(connect_timeout=duration_pb2.Duration(seconds=0)), "must be > 0s, got 0s"),
    (cluster(connect_timeout=duration_pb2.Duration(seconds=MAX_DURATION_SECONDS + 1)),
     "duration out of range"),
    (cluster(connect_timeout=duration_pb2.Duration(nanos=-5)), "expected a positive duration"),
    # string {min_len: 1}
    (cluster(name=""), "Cluster.name: must be at least 1 character(s)"),
    # enum {defined_only: true}
    (cluster(lb_policy=99), "lb_policy: must be"),
    # enum {defined_only: true} in a nested message
    (cluster(circuit_breakers=circuit_breaker_pb2.CircuitBreakers(thresholds=[
        circuit_breaker_pb2.CircuitBreakers.Thresholds(priority=7)])),
     "circuit_breakers.thresholds[0].priority: must be"),
])
def test_pgv_rules_from_the_descriptors(message: cluster_pb2.Cluster, expected: str) -> None:
    problems = check_message(message)
    assert any(expected in p for p in problems), problems


def test_nested_any_is_checked_as_what_it_carries() -> None:
    packed = any_pb2.Any()
    packed.Pack(cluster(connect_timeout=duration_pb2.Duration(seconds=-1)))
    assert any("connect_timeout" in p for p in check_message(packed, "cluster x"))
    assert check_message(packed, "cluster x")[0].startswith("cluster x.connect_timeout")


def test_oneof_member_rules_apply_only_when_set() -> None:
    route = route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix="/"),
        route=route_components_pb2.RouteAction(cluster="c"))
    assert check_message(route) == []  # cluster_header {min_len: 1} is not set: not checked
    route.route.cluster = ""  # set in the oneof, and empty
    assert check_message(route) == [
        "Route.route.cluster: must be at least 1 character(s), got ''"]


def test_required_oneof() -> None:
    route = route_components_pb2.Route(match=route_components_pb2.RouteMatch(prefix="/"))
    assert any("one of action is required" in p for p in check_message(route))


def test_header_value_rule_on_domains() -> None:
    vhost = route_components_pb2.VirtualHost(name="v", domains=["ok.test", "bad\nhost"])
    problems = check_message(vhost)
    assert any("domains[1]" in p and "HTTP_HEADER_VALUE" in p for p in problems), problems
    assert any("domains" in p and "at least 1" in p
               for p in check_message(route_components_pb2.VirtualHost(name="v")))


def test_wrapper_rules_apply_to_the_value() -> None:
    vhost = route_components_pb2.VirtualHost(
        name="v", domains=["x"],
        retry_policy=route_components_pb2.RetryPolicy(
            num_retries=wrappers_pb2.UInt32Value(value=1)))
    assert check_message(vhost) == []


def cla(*addresses: str) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(cluster_name="c", endpoints=[
        endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[
            endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
                address=address_pb2.Address(socket_address=address_pb2.SocketAddress(
                    address=a, port_value=80))))
            for a in addresses])])


def test_eds_endpoints_are_ip_addresses() -> None:
    assert check_endpoint_addresses(cla("10.0.0.1", "::1"), "c") == []
    problems = check_endpoint_addresses(cla("10.0.0.1", "pod.models.svc"), "c")
    assert problems == ["endpoints of c: 'pod.models.svc' is not an IP address "
                        "(EDS endpoints must be)"]


@pytest.mark.parametrize(("domain", "table"), [
    ("*", ("default", "*")),
    ("*.Example.com", ("suffix", "*.example.com")),
    ("a.test:*", ("prefix", "a.test:*")),
    ("a.test.:*", ("prefix", "a.test:*")),  # torpor's rule: a trailing dot does not count
    ("a.*", ("prefix", "a.*")),
    ("A.test", ("exact", "a.test")),
    ("a.test.", ("exact", "a.test")),
    ("a.test:8080", ("exact", "a.test:8080")),
])
def test_domain_tables(domain: str, table: tuple[str, str]) -> None:
    assert domain_table(domain) == table


def test_domain_clashes_blame_the_later_virtual_host() -> None:
    problems = check_domains([
        ("torpor_catch_all", ["*"]),
        ("a", ["a.test", "a.test:*"]),
        ("b", ["A.TEST", "A.TEST:*"]),  # Envoy lowercases: the same domains as a
        ("c", ["*"]),  # a second default
        ("d", ["a.test.", "a.test.:*"]),  # torpor: the same host as a
        ("e", ["e.test", "e.test:*"]),
        ("a", ["x.test"]),  # a name used twice
    ])
    assert set(problems) == {"b", "c", "d", "a"}
    assert problems["b"][0] == "domain 'a.test' is already served by 'a'"
    assert problems["c"] == ["a second '*' domain (one is allowed per route table)"]
    assert problems["a"] == ["virtual host name 'a' is used twice"]
    assert "e" not in problems
