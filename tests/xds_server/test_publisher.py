"""Staged pushes: `stages()` as a table, each stage checked against the ordering invariants
of Envoy (clusters and endpoints before the routes that use them; routes gone
before their clusters), and `Publisher` pushing those stages through the cache in order."""

from __future__ import annotations

import dataclasses

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from torpor.model import Endpoint
from xds_server import types
from xds_server.cache import NO_CHANGES, Desired, ResourceMap, Snapshot, SnapshotCache, changes
from xds_server.publisher import Publisher, Resources, stages
from xds_server.resources import (
    ACTIVATOR_CLUSTER,
    GatewaySettings,
    ResourceBuilder,
    RoutedService,
)
from xds_server.server import Rejection

SETTINGS = GatewaySettings(listen=Endpoint("127.0.0.1", 10000),
                           activators=(Endpoint("127.0.0.1", 18080),))


def svc(name: str, port: int = 9000, host: str | None = None) -> RoutedService:
    return RoutedService(name=name, host=host or f"{name}.test",
                         endpoints=(Endpoint("127.0.0.1", port),))


# --- reading a stage ------------------------------------------------------------------

def routed_clusters(stage: Resources) -> set[str]:
    """Every cluster a route of the stage's RouteConfigurations points at."""
    out: set[str] = set()
    for resource in stage.get(types.ROUTE, {}).values():
        config = route_pb2.RouteConfiguration()
        assert resource.body.Unpack(config)
        for vhost in config.virtual_hosts:
            for route in vhost.routes:
                out.add(route.route.cluster)
    return out


def eds_clusters(stage: Resources) -> set[str]:
    out = set()
    for name, resource in stage.get(types.CLUSTER, {}).items():
        cluster = cluster_pb2.Cluster()
        assert resource.body.Unpack(cluster)
        if cluster.type == cluster_pb2.Cluster.EDS:
            out.add(name)
    return out


def describe(stage: Resources) -> tuple[set[str], set[str]]:
    """(service clusters, clusters routed to), without the always-present activator."""
    clusters = set(stage.get(types.CLUSTER, {})) - {ACTIVATOR_CLUSTER}
    return clusters, routed_clusters(stage) - {ACTIVATOR_CLUSTER}


def digests(resources: ResourceMap) -> dict[str, bytes]:
    return {name: r.digest for name, r in resources.items()}


def same(a: Resources, b: Resources) -> bool:
    keys = set(a) | set(b)
    return all(digests(a.get(k, {})) == digests(b.get(k, {})) for k in keys)


def assert_invariants(current: Resources | None, staged: list[Resources],
                      desired: Resources) -> None:
    for index, stage in enumerate(staged):
        clusters = set(stage[types.CLUSTER])
        # No route points at a cluster absent in the same stage.
        missing = routed_clusters(stage) - clusters
        assert not missing, f"stage {index + 1} routes to absent clusters {missing}"
        # Every EDS cluster has its ClusterLoadAssignment (else it warms 15 s).
        no_cla = eds_clusters(stage) - set(stage.get(types.ENDPOINT, {}))
        assert not no_cla, f"stage {index + 1} has EDS clusters without a CLA: {no_cla}"
    previous = current
    for index, stage in enumerate(staged):
        if previous is not None:
            assert not same(previous, stage), f"stage {index + 1} changes nothing"
            # Routes only move to clusters the previous (ACKed) stage already had...
            new_targets = routed_clusters(stage) - set(previous[types.CLUSTER])
            assert not new_targets, f"stage {index + 1} routes to unapplied {new_targets}"
            # ...and clusters only go once no route of the previous stage uses them.
            dropped = routed_clusters(previous) - set(stage[types.CLUSTER])
            assert not dropped, f"stage {index + 1} removes routed clusters {dropped}"
        previous = stage
    if staged:
        assert same(staged[-1], desired), "the last stage is not the desired config"
    else:
        assert current is not None and same(current, desired)


# --- stages() as a table --------------------------------------------------------------

S = set[str]


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        pytest.param(None, [svc("a")], [({"a"}, {"a"})], id="first-load-one-stage"),
        pytest.param(None, [], [(set(), set())], id="first-load-empty-table"),
        pytest.param([svc("a")], [svc("a")], [], id="no-change-no-stage"),
        pytest.param([svc("a")], [svc("a"), svc("b")],
                     [({"a", "b"}, {"a"}), ({"a", "b"}, {"a", "b"})],
                     id="add-clusters-then-routes"),
        pytest.param([svc("a"), svc("b")], [svc("a")],
                     [({"a", "b"}, {"a"}), ({"a"}, {"a"})],
                     id="remove-routes-then-clusters"),
        pytest.param([svc("a")], [], [({"a"}, set()), (set(), set())],
                     id="remove-last-service"),
        pytest.param([svc("a", 9000)], [svc("a", 9001)], [({"a"}, {"a"})],
                     id="endpoint-only-one-stage"),
        pytest.param([svc("a")], [svc("a", host="other.test")], [({"a"}, {"a"})],
                     id="host-only-one-stage"),
        pytest.param([svc("a"), svc("b")], [svc("a"), svc("c")],
                     [({"a", "b", "c"}, {"a", "b"}),
                      ({"a", "b", "c"}, {"a", "c"}),
                      ({"a", "c"}, {"a", "c"})],
                     id="add-and-remove-three-stages"),
        pytest.param([svc("a", 9000)], [svc("a", 9001), svc("b")],
                     [({"a", "b"}, {"a"}), ({"a", "b"}, {"a", "b"})],
                     id="add-with-endpoint-change"),
    ],
)
def test_stages(before: list[RoutedService] | None, after: list[RoutedService],
                expected: list[tuple[S, S]]) -> None:
    builder = ResourceBuilder(SETTINGS)
    current = None if before is None else builder.build(before)
    desired = builder.build(after)
    staged = stages(current, desired)
    assert [describe(s) for s in staged] == expected
    assert_invariants(current, staged, desired)


def test_first_stage_of_an_add_keeps_the_old_routes_and_listener() -> None:
    builder = ResourceBuilder(SETTINGS)
    current = builder.build([svc("a")])
    desired = builder.build([svc("a"), svc("b")])
    first, second = stages(current, desired)
    assert digests(first[types.ROUTE]) == digests(current[types.ROUTE])
    assert digests(first[types.LISTENER]) == digests(current[types.LISTENER])
    assert digests(first[types.ENDPOINT]) == digests(desired[types.ENDPOINT])
    assert same(second, desired)


def test_endpoint_only_change_touches_only_eds() -> None:
    builder = ResourceBuilder(SETTINGS)
    current = builder.build([svc("a", 9000), svc("b", 9100)])
    desired = builder.build([svc("a", 9001), svc("b", 9100)])
    (only,) = stages(current, desired)
    for type_url in (types.CLUSTER, types.LISTENER, types.ROUTE):
        assert digests(only[type_url]) == digests(current[type_url]), types.short(type_url)
    assert digests(only[types.ENDPOINT]) == digests(desired[types.ENDPOINT])
    assert only[types.ENDPOINT]["a"].digest != current[types.ENDPOINT]["a"].digest


def test_new_cluster_definitions_win_in_the_merged_stage() -> None:
    """A service kept across the change gets its new CLA in stage 1, not its old one."""
    builder = ResourceBuilder(SETTINGS)
    current = builder.build([svc("a", 9000), svc("b")])
    desired = builder.build([svc("a", 9001), svc("c")])
    first = stages(current, desired)[0]
    assert first[types.ENDPOINT]["a"] is desired[types.ENDPOINT]["a"]
    assert first[types.ENDPOINT]["b"] is current[types.ENDPOINT]["b"]


# --- Publisher ---------------------------------------------------------------------------

class FakeAds:
    """Stands in for AdsServer: records each version waited on; may report a lagging Envoy."""

    def __init__(self, cache: SnapshotCache, lagging: bool = False,
                 rejecting: bool = False) -> None:
        self.cache = cache
        self.lagging = lagging
        self.rejecting = rejecting  # every version waited on is NACKed
        self.waited: list[Snapshot] = []

    async def wait_synced(self, version: int, timeout: float) -> list[str]:
        snapshot = self.cache.snapshot()
        assert snapshot is not None and snapshot.version == version
        self.waited.append(snapshot)
        return ["envoy-1 cds at v0"] if self.lagging or self.rejecting else []

    def rejections(self) -> list[Rejection]:
        if not self.rejecting or not self.waited:
            return []
        return [Rejection("envoy-1", types.CLUSTER, self.waited[-1].version, "bad")]


async def test_a_rejected_stage_ends_the_push() -> None:
    """The later stages would build on what Envoy refused: the push stops there."""
    builder = ResourceBuilder(SETTINGS)
    cache = SnapshotCache()
    ads = FakeAds(cache)
    publisher = Publisher(cache, ads, ack_timeout=1.0)  # type: ignore[arg-type]
    assert await publisher.publish(lambda: builder.build([svc("a"), svc("b")]))
    ads.rejecting = True
    assert not await publisher.publish(lambda: builder.build([svc("a"), svc("c")]))
    assert [s.version for s in ads.waited] == [1, 2]  # stages 2 and 3 never pushed


@pytest.mark.parametrize("lagging", [False, True], ids=["synced", "lagging"])
async def test_publisher_pushes_every_stage_in_order(lagging: bool) -> None:
    builder = ResourceBuilder(SETTINGS)
    cache = SnapshotCache()
    ads = FakeAds(cache, lagging=lagging)
    publisher = Publisher(cache, ads, ack_timeout=1.0)  # type: ignore[arg-type]
    assert await publisher.publish(lambda: builder.build([svc("a"), svc("b")])) is not lagging
    assert await publisher.publish(lambda: builder.build([svc("a"), svc("c")])) is not lagging
    assert [s.version for s in ads.waited] == [1, 2, 3, 4]
    assert [describe(s.resources) for s in ads.waited] == [
        ({"a", "b"}, {"a", "b"}),
        ({"a", "b", "c"}, {"a", "b"}),
        ({"a", "b", "c"}, {"a", "c"}),
        ({"a", "c"}, {"a", "c"}),
    ]


async def test_publishing_the_current_state_pushes_nothing() -> None:
    builder = ResourceBuilder(SETTINGS)
    cache = SnapshotCache()
    ads = FakeAds(cache)
    publisher = Publisher(cache, ads, ack_timeout=1.0)  # type: ignore[arg-type]
    table = [svc("a")]
    assert await publisher.publish(lambda: builder.build(table))
    assert await publisher.publish(lambda: builder.build(table))
    assert [s.version for s in ads.waited] == [1]


# --- pushes that cost what changed ---------------------------------------------------

_OPS = st.lists(st.tuples(st.sampled_from(["add", "remove", "flip", "host", "http2"]),
                          st.integers(0, 7)), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(ops=_OPS)
async def test_incremental_pushes_reach_what_a_full_build_gives(
        ops: list[tuple[str, int]]) -> None:
    """Service by service (the builder's touched names, the publisher's delta stages,
    the cache's persistent maps), every push leaves the cache holding exactly what a
    fresh builder makes of the same table; each snapshot's `changes` is what a full
    comparison finds; and every stage keeps routes pointing at existing clusters."""
    builder = ResourceBuilder(SETTINGS)
    cache = SnapshotCache()
    ads = FakeAds(cache)
    publisher = Publisher(cache, ads, ack_timeout=1.0)  # type: ignore[arg-type]
    table: dict[str, RoutedService] = {"s0": svc("s0")}
    publisher.load(Desired(builder.build(table.values())))
    for op, i in ops:
        name = f"s{i}"
        current = table.get(name)
        change: RoutedService | None
        if op == "add" or current is None:
            change = svc(name, port=9000 + i)
        elif op == "remove":
            change = None
        elif op == "flip":
            change = dataclasses.replace(current, endpoints=(
                Endpoint("127.0.0.1", current.endpoints[0].port + 100),))
        elif op == "host":
            change = dataclasses.replace(current, host=f"{name}-{len(ops)}.test")
        else:
            change = dataclasses.replace(current, http2=not current.http2)
        if change is None:
            table.pop(name, None)
        else:
            table[name] = change
        before = cache.snapshot()
        waited = len(ads.waited)

        def build(change: RoutedService | None = change, name: str = name) -> Desired:
            builder.update({name: change})
            return builder.desired()

        assert await publisher.publish(build)
        after = cache.snapshot()
        assert before is not None and after is not None
        expected = ResourceBuilder(SETTINGS).build(table.values())
        assert after.same_content(expected)
        for stage in ads.waited[waited:]:
            clusters, routed = describe(stage.resources)
            assert routed <= clusters
            previous = next(s for s in [before, *ads.waited[waited:]]
                            if s.version == stage.version - 1)
            assert stage.changes is not None
            for type_url in set(previous.resources) | set(stage.resources):
                assert stage.changes.get(type_url, NO_CHANGES) == changes(
                    previous.of_type(type_url), stage.of_type(type_url))


def test_a_flip_touches_one_endpoint_resource() -> None:
    """The builder hands out, for an endpoint flip, that service's name under EDS and
    nothing else: the publisher's work is one resource whatever the table's size."""
    builder = ResourceBuilder(SETTINGS)
    builder.build([svc(f"s{i}") for i in range(50)])
    builder.update({"s7": svc("s7", port=9100)})
    desired = builder.desired()
    assert desired.touched is not None
    assert {t: set(n) for t, n in desired.touched.items() if n} == {types.ENDPOINT: {"s7"}}
