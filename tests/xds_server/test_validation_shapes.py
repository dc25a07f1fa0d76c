"""Verdicts by shape (validation.Shape, QuarantineBuilder._passes_by_shape) are the full
walk's verdicts: for generated services, good and broken, a resource the shape passes is
one the walk passes, an ordinary service is passed by its shape (the fast path is taken),
and a QuarantineBuilder judging by shape quarantines and publishes exactly what one that
walks every resource does. Reproducible: derandomized, no example database."""

from __future__ import annotations

import dataclasses

import pytest
from envoy.config.route.v3 import route_components_pb2
from google.protobuf import any_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torpor.model import Endpoint
from xds_server.quarantine import QuarantineBuilder
from xds_server.resources import (
    ApiKeys,
    GatewaySettings,
    JwtRule,
    ResourceBuilder,
    RoutedService,
)
from xds_server.validation import Shape, check_endpoint_addresses, check_message, placeholder

SETTINGS = GatewaySettings(listen=Endpoint("127.0.0.1", 8080),
                           activators=(Endpoint("127.0.0.1", 9),))
#: `gateway.routing: host_header`: a plain service's cluster is named by its host (STATIC).
BY_HOST = dataclasses.replace(SETTINGS, routing="host_header")
ROUTINGS = pytest.mark.parametrize("gateway", [SETTINGS, BY_HOST],
                                   ids=["virtual_hosts", "host_header"])
PROPERTY = settings(max_examples=150, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True)
#: Strings that break a rule somewhere (a domain, a name, an address), or look like the
#: placeholders, or are empty.
_ODD = st.sampled_from(["", "a\nb", "a\x00", "x\r", "\x1e0\x1f", "\x1e1\x1f.test", "a b",
                        "É.test", "*", "x" * 300, "UPPER.Test", "h.test.", "h.test:8080"])
NAMES = st.one_of(_LABEL, _LABEL.map(lambda s: s + "_v2"), _ODD)
HOSTS = st.one_of(_LABEL.map(lambda s: f"{s}.test"), _LABEL.map(lambda s: f"*.{s}.test"), _ODD)
ENDPOINTS = st.lists(st.builds(Endpoint, st.one_of(
    st.sampled_from(["10.0.0.1", "10.0.0.2", "::1", "192.0.2.200", "pod.svc"]), _ODD),
    st.sampled_from([80, 8080, 0, 65535])), max_size=3)


@st.composite
def services(draw: st.DrawFn, name: str | None = None) -> RoutedService:
    return RoutedService(
        name if name is not None else draw(NAMES), draw(HOSTS), tuple(draw(ENDPOINTS)),
        http2=draw(st.booleans()), retry_non_idempotent=draw(st.booleans()),
        rate_limit=draw(st.sampled_from([None, (10, 20), (1000, 1)])),
        max_concurrent=draw(st.sampled_from([None, 1, 100])),
        hosts=tuple(draw(st.lists(HOSTS, max_size=2))),
        paths=tuple(draw(st.sampled_from([(), ("/v1",), ("/a", "/b/c")]))),
        rewrite=draw(st.sampled_from([None, "/", "/api"])),
        auth=draw(st.sampled_from([None, ApiKeys((("client", "key"),)),
                                   JwtRule("p", "https://issuer", ("aud",), '{"keys": []}')])),
        version_of=draw(st.sampled_from([None, None, "parent"])),
        weight=draw(st.sampled_from([0, 50])),
        split=draw(st.sampled_from([(), (("v1", 90), ("v2", 10))])))


@st.composite
def maybe_plain(draw: st.DrawFn) -> RoutedService:
    """Services most of which are plain (`host_routed` with host_header), with names and
    hosts good and bad."""
    host = draw(st.one_of(HOSTS, HOSTS.map(str.upper), st.sampled_from(
        ["a.test", "svc.test", "nodot", "x.test:8080", "h.test."])))
    return RoutedService(
        draw(NAMES), host, tuple(draw(ENDPOINTS)),
        max_concurrent=draw(st.sampled_from([None, 1, 100])),
        http2=draw(st.sampled_from([False, False, False, True])),
        paths=draw(st.sampled_from([(), (), (), ("/v1",)])))


#: Tables of every kind of service, plain ones often.
ANY_SERVICE = st.one_of(services(), maybe_plain())


def walked(builder: QuarantineBuilder, part: str, svc: RoutedService) -> list[str]:
    if part == "cds":
        return check_message(builder._cluster(svc).body)
    if part == "eds":  # and the EDS address rule
        body = builder._load_assignment(svc.name, svc.endpoints).body
        return check_message(body) or check_endpoint_addresses(body, svc.name)
    return check_message(builder._vhost(svc))


def serialized(builder: QuarantineBuilder, part: str, svc: RoutedService) -> bytes:
    if part == "cds":
        return builder._cluster(svc).body.value
    if part == "eds":
        return builder._load_assignment(svc.name, svc.endpoints).body.value
    return builder._vhost_bytes(svc)


@PROPERTY
@given(st.lists(services(), min_size=1, max_size=6))
def test_a_resource_its_shape_passes_is_one_the_walk_passes(table: list[RoutedService]) -> None:
    builder = QuarantineBuilder(SETTINGS)
    for svc in table:
        for part in ("cds", "eds", "rds"):
            if builder._passes_by_shape(part, svc, serialized(builder, part, svc)):
                assert walked(builder, part, svc) == [], (part, svc)


@PROPERTY
@given(services(), _LABEL, _LABEL)
def test_an_ordinary_service_is_judged_by_its_shape(template: RoutedService, first: str,
                                                    second: str) -> None:
    """Two services of one shape with ordinary names: the second is passed by the shape
    (no walk) whenever the walk passes it."""
    builder = QuarantineBuilder(SETTINGS)
    hosts = tuple(("*." if h.startswith("*") else "") + f"h{i}.test"
                  for i, h in enumerate(template.all_hosts()))
    one, two = (dataclasses.replace(
        template, name=n, host=f"{n}.{hosts[0].removeprefix('*.')}" if not
        hosts[0].startswith("*") else f"*.{n}.test", hosts=hosts[1:],
        endpoints=tuple(Endpoint(f"10.0.{i}.{k}", e.port)
                        for k, e in enumerate(template.endpoints))) for i, n in
        enumerate((first, second + "x")))
    for part in ("cds", "eds", "rds"):
        builder._passes_by_shape(part, one, serialized(builder, part, one))
        if walked(builder, part, two) == []:
            assert builder._passes_by_shape(part, two, serialized(builder, part, two)), part


@ROUTINGS
@PROPERTY
@given(st.lists(ANY_SERVICE, min_size=1, max_size=8),
       st.lists(st.tuples(st.integers(0, 7), ANY_SERVICE), max_size=4))
def test_a_quarantine_by_shape_is_the_quarantine_by_walk(
        gateway: GatewaySettings, table: list[RoutedService],
        edits: list[tuple[int, RoutedService]]) -> None:
    """Verdicts, words and what is published are the same as when every resource is
    walked, on a first build and after edits."""
    table = list({s.name: s for s in table}.values())
    by_shape, by_walk = QuarantineBuilder(gateway), QuarantineBuilder(gateway)
    by_walk._passes_by_shape = lambda *_, **__: False  # type: ignore[method-assign]
    for step in range(len(edits) + 1):
        if step:
            index, svc = edits[step - 1]
            table[index % len(table)] = dataclasses.replace(
                svc, name=table[index % len(table)].name)
        built = [b.build(table) for b in (by_shape, by_walk)]
        assert by_shape.quarantined() == by_walk.quarantined()
        assert {t: {n: r.digest for n, r in rs.items()} for t, rs in built[0].items()} == \
            {t: {n: r.digest for n, r in rs.items()} for t, rs in built[1].items()}


def test_a_shape_renders_its_own_serialization_and_defers_the_rules_on_placeholders() -> None:
    vhost = route_components_pb2.VirtualHost(
        name=placeholder(0), domains=[placeholder(1), f"{placeholder(1)}:*"],
        routes=[route_components_pb2.Route(
            name=f"{placeholder(0)}/x", match=route_components_pb2.RouteMatch(prefix="/"),
            route=route_components_pb2.RouteAction(cluster=placeholder(0)))])
    shape = Shape.of(vhost)
    assert shape is not None and shape.clean
    assert shape.render((placeholder(0), placeholder(1))) == \
        vhost.SerializeToString(deterministic=True)
    real = route_components_pb2.VirtualHost()
    real.ParseFromString(shape.render(("svc", "svc.test")))
    assert real.name == "svc" and list(real.domains) == ["svc.test", "svc.test:*"]
    assert real.routes[0].name == "svc/x" and real.routes[0].route.cluster == "svc"
    assert shape.passes(("svc", "svc.test"))
    assert not shape.passes(("svc", "bad\nhost"))  # the domains' header-value rule
    assert check_message(real) == []


def test_a_rule_broken_without_placeholders_makes_the_shape_unclean() -> None:
    vhost = route_components_pb2.VirtualHost(name=placeholder(0))  # no domains: min_items
    shape = Shape.of(vhost)
    assert shape is not None and not shape.clean


def test_no_shape_with_a_placeholder_in_a_type_url() -> None:
    route = route_components_pb2.Route(typed_per_filter_config={
        "f": any_pb2.Any(type_url="type.googleapis.com/" + placeholder(0))})
    assert Shape.of(route) is None


@pytest.mark.parametrize("host", ["bad\nhost.test", "ok.test\x00"])
def test_a_broken_host_in_a_shape_seen_clean_is_quarantined(host: str) -> None:
    builder = QuarantineBuilder(SETTINGS)
    builder.build([RoutedService("a", "a.test", (Endpoint("10.0.0.1", 80),)),
                   RoutedService("b", host, (Endpoint("10.0.0.2", 80),))])
    assert "HTTP_HEADER_VALUE" in (builder.problem("b") or "")
    assert builder.problem("a") is None


def test_the_shape_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import xds_server.resources as resources

    monkeypatch.setattr(resources, "MAX_SHAPES", 3)
    builder = QuarantineBuilder(SETTINGS)
    builder.build([RoutedService(f"s{i}", f"s{i}.test", (Endpoint("10.0.0.1", 80 + i),))
                   for i in range(10)])
    assert len(builder._shapes_by_key) <= 3
    assert builder.quarantined() == {}


@ROUTINGS
@PROPERTY
@given(st.lists(ANY_SERVICE, min_size=1, max_size=8))
def test_a_resource_rendered_from_its_shape_is_the_one_built(
        gateway: GatewaySettings, table: list[RoutedService]) -> None:
    """The builder renders each service's cluster, endpoints and virtual host from the
    shape of an earlier one: the bytes are those that building it gives (the first of a
    shape is built and checked against the render; the others must match too)."""
    builder = ResourceBuilder(gateway)
    for svc in table:
        for part in ("cds", "eds", "rds"):
            assert builder._made(part, svc) == builder._direct(part, svc), (part, svc)


@ROUTINGS
@PROPERTY
@given(st.lists(ANY_SERVICE, min_size=1, max_size=8))
def test_a_table_built_by_shape_is_the_table_built(
        gateway: GatewaySettings, table: list[RoutedService]) -> None:
    table = list({s.name: s for s in table}.values())
    by_shape, built = ResourceBuilder(gateway), ResourceBuilder(gateway)
    built._made = built._direct  # type: ignore[method-assign]
    assert {t: {n: r.body for n, r in rs.items()}
            for t, rs in by_shape.build([*table, *table[:1]]).items()} == \
        {t: {n: r.body for n, r in rs.items()} for t, rs in built.build(table).items()}


def test_a_resource_no_other_service_shares_gets_no_shape() -> None:
    """Endpoints on a port of their own (local replicas) are built and walked, as before
    shapes: a shape is made for the second service that has it."""
    builder = QuarantineBuilder(SETTINGS)
    builder.build([RoutedService(f"s{i}", f"s{i}.test", (Endpoint("10.0.0.1", 8000 + i),))
                   for i in range(5)])
    kinds = [key[0] for key in builder._shapes_by_key]  # type: ignore[index]
    assert "eds" not in kinds and "cds" in kinds and "rds" in kinds
    assert builder.quarantined() == {}
