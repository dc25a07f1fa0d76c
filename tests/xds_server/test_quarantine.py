"""QuarantineBuilder and blame, without Envoy: what is published for a refused service,
whom a NACK is pinned on, and when a service leaves quarantine."""

from __future__ import annotations

import pytest
from envoy.config.route.v3 import route_pb2

from torpor import metrics
from torpor.model import Endpoint
from xds_server import types, validation
from xds_server.cache import SnapshotCache
from xds_server.quarantine import QuarantineBuilder, blame, envoy_words
from xds_server.resources import ROUTE_CONFIG_NAME, GatewaySettings, RoutedService
from xds_server.server import Rejection

SETTINGS = GatewaySettings(listen=Endpoint("127.0.0.1", 8080),
                           activators=(Endpoint("127.0.0.1", 9),))
IP1, IP2 = Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80)


def svc(name: str, host: str | None = None, *endpoints: Endpoint,
        http2: bool = False) -> RoutedService:
    return RoutedService(name, host or f"{name}.test", endpoints or (IP1,), http2=http2)


def domains(built: dict[str, dict[str, object]]) -> dict[str, list[str]]:
    routes = route_pb2.RouteConfiguration()
    built[types.ROUTE][ROUTE_CONFIG_NAME].body.Unpack(routes)  # type: ignore[attr-defined]
    return {v.name: list(v.domains) for v in routes.virtual_hosts}


def applied(builder: QuarantineBuilder, built: dict[str, dict[str, object]]) -> None:
    cache = SnapshotCache()
    builder.applied(cache.set_resources(built))  # type: ignore[arg-type]


def test_a_refused_service_is_left_out_and_the_others_published() -> None:
    builder = QuarantineBuilder(SETTINGS)
    built = builder.build([svc("a"), svc("b", "a.test."), svc("c", None,
                                                             Endpoint("pod.svc", 80))])
    assert set(built[types.CLUSTER]) == {"torpor_activator", "a"}
    assert set(domains(built)) == {"a", "torpor_catch_all"}
    assert "already served by 'a'" in (builder.problem("b") or "")
    assert "'pod.svc' is not an IP address" in (builder.problem("c") or "")
    assert builder.problem("a") is None
    assert metrics.SERVICE_QUARANTINED.labels(service="b")._value.get() == 1


def test_a_bad_change_keeps_the_last_good_shape_and_a_fix_releases_it() -> None:
    builder = QuarantineBuilder(SETTINGS)
    applied(builder, builder.build([svc("a"), svc("b")]))
    built = builder.build([svc("a"), svc("b", "a.test")])  # b's host edited into a clash
    assert domains(built)["b"] == ["b.test", "b.test:*"]  # still on its last good host
    assert "already served by 'a'" in (builder.problem("b") or "")
    built = builder.build([svc("a"), svc("b", "b2.test")])
    assert domains(built)["b"] == ["b2.test", "b2.test:*"]
    assert builder.problem("b") is None
    assert metrics.SERVICE_QUARANTINED.labels(service="b")._value.get() == 0


def test_the_newcomer_is_blamed_for_a_clash_not_the_service_that_was_there() -> None:
    builder = QuarantineBuilder(SETTINGS)
    applied(builder, builder.build([svc("z", "same.test")]))
    builder.build([svc("a", "same.test"), svc("z", "same.test")])
    assert builder.problem("z") is None
    assert "already served by 'z'" in (builder.problem("a") or "")


def test_a_nack_quarantines_the_named_changed_service_until_its_part_changes() -> None:
    builder = QuarantineBuilder(SETTINGS)
    cache = SnapshotCache()
    first = cache.set_resources(builder.build([svc("a"), svc("b")]))
    builder.applied(first)
    bad = cache.set_resources(builder.build([svc("a"), svc("b", None, IP2)]))
    error = "malformed IP address: 10.0.0.2"
    assert builder.rejected(Rejection("envoy-1", types.ENDPOINT, bad.version, error), bad)
    # The same rejection again (a second Envoy): nothing new to quarantine.
    assert not builder.rejected(Rejection("envoy-2", types.ENDPOINT, bad.version, error), bad)
    rebuilt = builder.build([svc("a"), svc("b", None, IP2)])  # the push that follows
    assert builder.problem("b") == f"Envoy rejected its endpoints: {error}"
    assert builder.problem("a") is None
    assert rebuilt[types.ENDPOINT]["b"].digest == first.resources[types.ENDPOINT]["b"].digest
    builder.build([svc("a"), svc("b", "b-renamed.test", IP2)])  # not the rejected part
    assert builder.problem("b") is not None
    builder.build([svc("a"), svc("b", None, IP1)])  # new endpoints: tried again
    assert builder.problem("b") is None


def test_a_rejection_of_an_older_snapshot_or_of_the_listener_blames_nobody() -> None:
    builder = QuarantineBuilder(SETTINGS)
    cache = SnapshotCache()
    old = cache.set_resources(builder.build([svc("a")]))
    current = cache.set_resources(builder.build([svc("a"), svc("b")]))
    assert not builder.rejected(Rejection("e", types.CLUSTER, old.version, "b"), current)
    assert builder.unresolved is None
    assert not builder.rejected(Rejection("e", types.LISTENER, current.version,
                                          "cannot bind"), current)
    assert builder.unresolved is not None and "cannot bind" in builder.unresolved
    assert builder.quarantined() == {}


def test_blame() -> None:
    a, b, c = svc("alpha", "alpha.test"), svc("beta", "beta.test"), svc("gamma", "g.test")
    good = {"alpha": a, "beta": b}
    changed_b = svc("beta", "beta2.test")
    admitted = [a, changed_b, c]
    # RDS: a duplicate domain names a host; the changed service is blamed.
    assert blame("Duplicate entry of domain g.test in route torpor_routes", "rds",
                 admitted, good) == ([c], True)
    # Named but none changed: the named ones.
    assert blame("Error adding/updating cluster(s) alpha: bad", "cds", admitted,
                 good) == ([a], True)
    # Nothing named: whoever changed in that part (RDS: hosts).
    assert blame("Proto constraint validation failed", "rds", admitted,
                 good) == ([changed_b, c], False)
    # CDS: hosts are not clusters; only the new service's cluster changed.
    assert blame("something", "cds", admitted, good) == ([c], False)
    assert blame("anything", "lds", admitted, good) == ([], False)


def test_validation_is_cached_by_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    builder = QuarantineBuilder(SETTINGS)
    calls: list[str] = []
    real = validation.check_message

    def counting(message: object, label: str = "") -> list[str]:
        calls.append(label)
        return real(message, label)  # type: ignore[arg-type]

    monkeypatch.setattr(validation, "check_message", counting)
    # Every resource walked (no verdict by shape), so that each check is counted.
    monkeypatch.setattr(QuarantineBuilder, "_passes_by_shape", lambda *_: False)
    builder.build([svc("a"), svc("b")])
    assert len(calls) == 6  # cluster, endpoints, virtual host of each
    builder.build([svc("a"), svc("b", None, IP2)])
    assert len(calls) == 9  # b's only
    builder.build([svc("a"), svc("b", None, IP2)])
    assert len(calls) == 9


def test_an_unnamed_rejection_of_many_is_narrowed_down_to_the_bad_one() -> None:
    """Eight services published at once, Envoy refuses the routes without naming one:
    all eight are suspects; Envoy's verdicts on halves let seven back in and leave the bad
    one confirmed, in a few pushes."""
    builder = QuarantineBuilder(SETTINGS)
    cache = SnapshotCache()
    services = [svc(f"s{i}") for i in range(8)]
    bad = "s5"
    pushes = 0
    for _ in range(20):
        snapshot = cache.set_resources(builder.build(services))
        pushes += 1
        published = set(builder._admitted)
        if bad in published:  # the fake Envoy: refuses any route table with s5 in it
            assert builder.rejected(Rejection("envoy", types.ROUTE, snapshot.version,
                                              "Proto constraint validation failed"), snapshot)
        elif not builder.applied(snapshot):
            break
    assert builder.quarantined() == {bad: "Envoy rejected its route: Proto constraint "
                                          "validation failed"}
    assert set(builder._admitted) == {f"s{i}" for i in range(8)} - {bad}
    assert pushes <= 10, pushes


def test_envoy_words_drop_the_dump_of_the_resource() -> None:
    assert envoy_words("malformed IP address: pod.svc") == "malformed IP address: pod.svc"
    dump = 'goo.gle/debugonly \nname: "torpor_routes"\nvirtual_hosts {\n  name: "a"' * 50
    assert envoy_words(dump) == ("(Envoy's message is a dump of the rejected resource, "
                                 "without a reason)")
    assert envoy_words("Proto constraint validation failed (X): " + dump).startswith(
        "Proto constraint validation failed (X) (Envoy's message is a dump")
    assert len(envoy_words("x" * 5000)) == 400


def test_a_domain_freed_by_one_service_lets_the_clashing_one_in_without_touching_it() -> None:
    """Service by service: `b` asks for `a`'s host and is quarantined naming `a`; when
    `a` moves to another host (only `a` changes), `b` gets the host in that same build."""
    builder = QuarantineBuilder(SETTINGS)
    builder.build([svc("a", "x.test"), svc("b", "x.test")])
    assert "already served by 'a'" in (builder.problem("b") or "")
    builder.update({"a": svc("a", "y.test")})
    built = builder.desired()
    assert builder.problem("b") is None
    config = route_pb2.RouteConfiguration()
    assert built.resources[types.ROUTE][ROUTE_CONFIG_NAME].body.Unpack(config)
    owners = {d: v.name for v in config.virtual_hosts for d in v.domains}
    assert owners["x.test"] == "b" and owners["y.test"] == "a"


def test_incremental_admission_equals_a_fresh_one() -> None:
    """Whatever order services came in, one at a time, the published set and the
    quarantined set are those a fresh builder gives the final table in one build."""
    table = {f"s{i}": svc(f"s{i}", f"h{i % 3}.test") for i in range(6)}
    table["bad"] = svc("bad", None, Endpoint("pod.svc", 80))  # EDS needs an IP address
    builder = QuarantineBuilder(SETTINGS)
    builder.build([])
    for name in ["s0", "bad", "s3", "s1", "s4", "s2", "s5"]:
        builder.update({name: table[name]})
    builder.update({"s0": None})
    del table["s0"]
    incremental = builder.desired().resources
    fresh = QuarantineBuilder(SETTINGS)
    full = fresh.build(sorted(table.values(), key=lambda s: s.name))
    assert set(builder.quarantined()) == set(fresh.quarantined()) == {"bad", "s4", "s5"}
    assert set(incremental[types.CLUSTER]) == set(full[types.CLUSTER])
