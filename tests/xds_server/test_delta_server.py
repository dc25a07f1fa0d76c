"""Delta ADS (xds_server/delta_server.py) through the real gRPC listener, with a raw delta
client that subscribes and ACKs as Envoy does: a flip sends one ClusterLoadAssignment, a
new service its cluster, endpoints and routes only, a removal arrives as
removed_resources, a reconnect with initial_resource_versions gets only what changed, and
a NACK is counted, handed on and not answered again until a newer snapshot."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.ads_client import AdsClient, DeltaAdsClient
from tests.support.net import wait_until
from tests.support.xds import XdsHarness, svc
from torpor import metrics
from torpor.model import Endpoint
from xds_server import types
from xds_server.resources import RoutedService

SERVICES = 20


def table(skip: str = "", moved: str = "", extra: str = "") -> list[RoutedService]:
    """SERVICES services on their own port; `moved` on another port, `skip` left out,
    `extra` added."""
    out = []
    for i in range(SERVICES):
        name = f"s{i}"
        if name != skip:
            port = 30000 + i + (500 if name == moved else 0)
            out.append(svc(name, Endpoint("127.0.0.1", port)))
    if extra:
        out.append(svc(extra, Endpoint("127.0.0.1", 31999)))
    return out


@pytest.fixture
async def harness() -> AsyncIterator[XdsHarness]:
    h = XdsHarness(Endpoint("127.0.0.1", 9), ack_timeout=5.0)
    await h.start(table())
    yield h
    await h.stop()


@pytest.fixture
async def client(harness: XdsHarness) -> AsyncIterator[DeltaAdsClient]:
    c = DeltaAdsClient(f"127.0.0.1:{harness.xds_port}", "delta-1")
    await c.start()
    await synced(harness)
    yield c
    await c.stop()


async def synced(harness: XdsHarness, streams: int = 1) -> None:
    """Until every stream applied the current snapshot in all four types."""

    def done() -> bool:
        snapshot = harness.cache.snapshot()
        found = harness.ads.streams()
        return snapshot is not None and len(found) == streams and all(
            len(s.synced_versions) == 4
            and all(v == snapshot.version for v in s.synced_versions.values())
            for s in found)

    await wait_until(done, 10, "every stream synced")


def carried(responses: list[object]) -> set[tuple[str, str]]:
    """(type, name) of every resource the responses carried."""
    return {(r.type, name) for r in responses for name in r.versions}  # type: ignore[attr-defined]


def removals(responses: list[object]) -> set[tuple[str, str]]:
    return {(r.type, name) for r in responses for name in r.removed}  # type: ignore[attr-defined]


ROUTES = ("rds", "torpor_routes")


async def test_the_initial_sync_carries_everything_with_digest_versions(
    harness: XdsHarness, client: DeltaAdsClient
) -> None:
    snapshot = harness.cache.snapshot()
    assert snapshot is not None
    for type_url in types.ADD_ORDER:
        expected = {n: r.version for n, r in snapshot.of_type(type_url).items()}
        assert client.holds[type_url] == expected, types.short(type_url)
    (stream,) = harness.ads.streams()
    assert stream.protocol == "delta"
    assert stream.node_id == "delta-1"


async def test_a_flip_sends_exactly_one_cluster_load_assignment(
    harness: XdsHarness, client: DeltaAdsClient
) -> None:
    before = len(client.responses)
    sent_before = harness.ads.streams()[0].resources_sent
    assert await harness.publish(table(moved="s7"))
    after = client.since(before)
    assert [(r.type, list(r.versions), r.removed) for r in after] == [("eds", ["s7"], [])]
    assert harness.ads.streams()[0].resources_sent == sent_before + 1


async def test_adding_a_service_sends_its_cluster_endpoints_and_routes_only(
    harness: XdsHarness, client: DeltaAdsClient
) -> None:
    before = len(client.responses)
    assert await harness.publish(table(extra="fresh"))
    after = client.since(before)
    assert carried(after) == {("cds", "fresh"), ("eds", "fresh"), ROUTES}
    assert not removals(after)
    # The cluster first, routes once it is applied (publisher's stages). The endpoints
    # follow the client's subscription to them, which may come after the routes here.
    assert [r.type for r in after].index("rds") > [r.type for r in after].index("cds")


async def test_a_removed_service_arrives_as_removed_resources(
    harness: XdsHarness, client: DeltaAdsClient
) -> None:
    before = len(client.responses)
    assert await harness.publish(table(skip="s3"))
    after = client.since(before)
    assert carried(after) == {ROUTES}  # the route table without s3's virtual host
    assert ("cds", "s3") in removals(after)
    assert "s3" not in client.holds[types.CLUSTER]
    assert "s3" not in client.holds[types.ENDPOINT]
    # Routes first, then the cluster (the last stage).
    types_seen = [r.type for r in after]
    assert types_seen.index("rds") < types_seen.index("cds")


async def test_a_reconnect_with_initial_versions_gets_only_what_changed(
    harness: XdsHarness, client: DeltaAdsClient
) -> None:
    held = {t: dict(v) for t, v in client.holds.items()}
    await client.stop()
    await wait_until(lambda: not harness.ads.streams(), 5, "the stream closed")
    await harness.publish(table(moved="s2", skip="s4"))  # while nobody is connected

    again = DeltaAdsClient(f"127.0.0.1:{harness.xds_port}", "delta-1", initial=held)
    await again.start()
    try:
        await synced(harness)
        assert carried(again.responses) == {("eds", "s2"), ROUTES}
        assert ("cds", "s4") in removals(again.responses)
        snapshot = harness.cache.snapshot()
        assert snapshot is not None
        assert again.holds[types.CLUSTER] == {
            n: r.version for n, r in snapshot.of_type(types.CLUSTER).items()}
    finally:
        await again.stop()


async def test_a_reconnect_that_holds_everything_gets_nothing(
    harness: XdsHarness, client: DeltaAdsClient
) -> None:
    held = {t: dict(v) for t, v in client.holds.items()}
    await client.stop()
    await wait_until(lambda: not harness.ads.streams(), 5, "the stream closed")
    again = DeltaAdsClient(f"127.0.0.1:{harness.xds_port}", "delta-1", initial=held)
    await again.start()
    try:
        await synced(harness)
        assert carried(again.responses) == set()
    finally:
        await again.stop()


def nacks(kind: str) -> float:
    return metrics.XDS_NACKS.labels(type=kind)._value.get()  # type: ignore[no-any-return]


async def test_a_nack_is_counted_reported_and_not_resent(
    harness: XdsHarness, client: DeltaAdsClient
) -> None:
    rejected = []
    harness.ads.add_listeners(rejected.append, lambda snapshot: None)
    client.nack_types.add(types.ENDPOINT)
    before, counted = len(client.responses), nacks("eds")
    assert not await harness.publish(table(moved="s1"))  # rejected: not applied
    snapshot = harness.cache.snapshot()
    assert snapshot is not None
    assert nacks("eds") == counted + 1
    (rejection,) = rejected
    assert (rejection.type_url, rejection.version, rejection.error) == (
        types.ENDPOINT, snapshot.version, "rejected by the test")
    assert harness.ads.rejections() == rejected
    assert harness.ads.lagging(snapshot.version)
    assert len(client.since(before)) == 1

    # The same snapshot is not sent again; a newer one is, and its ACK clears the NACK.
    client.nack_types.clear()
    assert await harness.publish(table(moved="s1", extra="fresh"))
    assert not harness.ads.rejections()
    assert ("eds", "s1") in carried(client.since(before + 1))


async def test_sotw_and_delta_envoys_are_waited_for_alike(
    harness: XdsHarness, client: DeltaAdsClient
) -> None:
    sotw = AdsClient(f"127.0.0.1:{harness.xds_port}", "sotw-1")
    await sotw.start()
    try:
        await synced(harness, streams=2)
        assert {s.protocol for s in harness.ads.streams()} == {"delta", "sotw"}
        sotw.hold_acks()
        push = await harness.publish(table(moved="s9"))  # the sotw client never ACKs
        assert not push
        snapshot = harness.cache.snapshot()
        assert snapshot is not None
        assert [lag for lag in harness.ads.lagging(snapshot.version)
                if lag.startswith("delta-1")] == []
        assert any(lag.startswith("sotw-1") for lag in harness.ads.lagging(snapshot.version))
        sotw.release_acks()
        assert not await harness.ads.wait_synced(snapshot.version, 5)
    finally:
        await sotw.stop()
