"""The snapshot cache: one version per distinct content, watches, and deterministic digests."""

from __future__ import annotations

import asyncio

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2, wrappers_pb2

from xds_server import types
from xds_server.cache import Resource, Snapshot, SnapshotCache


def res(name: str, value: str) -> Resource:
    return Resource.pack(name, wrappers_pb2.StringValue(value=value))


def content(**clusters: str) -> dict[str, dict[str, Resource]]:
    """A CDS-only content: cluster name -> its value."""
    return {types.CLUSTER: {name: res(name, value) for name, value in clusters.items()}}


class Recorder:
    def __init__(self) -> None:
        self.calls: list[Snapshot] = []

    def __call__(self, snapshot: Snapshot) -> None:
        self.calls.append(snapshot)


# --- versions and watchers --------------------------------------------------------------

def test_empty_cache_has_no_snapshot() -> None:
    assert SnapshotCache().snapshot() is None


def test_first_set_is_version_one() -> None:
    cache = SnapshotCache()
    watcher = Recorder()
    cache.create_watch(watcher)
    first = cache.set_resources(content(a="1"))
    assert first.version == 1
    assert cache.snapshot() is first
    assert watcher.calls == [first]


def test_same_content_keeps_version_and_wakes_no_one() -> None:
    cache = SnapshotCache()
    first = cache.set_resources(content(a="1", b="2"))
    watcher = Recorder()
    cache.create_watch(watcher)
    # Equal content, built anew (new Resource objects, equal digests).
    again = cache.set_resources(content(b="2", a="1"))
    assert again is first
    assert again.version == 1
    assert cache.snapshot() is first
    assert watcher.calls == []


def test_an_empty_type_map_is_the_same_content_as_no_map() -> None:
    cache = SnapshotCache()
    first = cache.set_resources(content(a="1"))
    assert cache.set_resources({**content(a="1"), types.ROUTE: {}}) is first


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param(content(a="1", b="3"), id="digest-changed"),
        pytest.param(content(a="1"), id="resource-removed"),
        pytest.param(content(a="1", b="2", c="3"), id="resource-added"),
        pytest.param({**content(a="1", b="2"), types.ROUTE: {"r": res("r", "1")}},
                     id="type-added"),
    ],
)
def test_changed_content_bumps_version_and_calls_each_watcher_once(
    changed: dict[str, dict[str, Resource]],
) -> None:
    cache = SnapshotCache()
    cache.set_resources(content(a="1", b="2"))
    one, two = Recorder(), Recorder()
    cache.create_watch(one)
    cache.create_watch(two)
    second = cache.set_resources(changed)
    assert second.version == 2
    assert cache.snapshot() is second
    assert one.calls == [second]
    assert two.calls == [second]
    assert {t: set(rs) for t, rs in second.resources.items()} == {
        t: set(rs) for t, rs in changed.items()
    }


def test_versions_count_distinct_contents_only() -> None:
    cache = SnapshotCache()
    watcher = Recorder()
    cache.create_watch(watcher)
    for value in ["1", "1", "2", "2", "2", "1"]:
        cache.set_resources(content(a=value))
    assert [s.version for s in watcher.calls] == [1, 2, 3]


def test_snapshot_does_not_alias_the_callers_maps() -> None:
    cache = SnapshotCache()
    given = content(a="1")
    snapshot = cache.set_resources(given)
    given[types.CLUSTER]["b"] = res("b", "2")
    assert set(snapshot.of_type(types.CLUSTER)) == {"a"}


def test_cancel_stops_calls() -> None:
    cache = SnapshotCache()
    kept, cancelled = Recorder(), Recorder()
    cache.create_watch(kept)
    cancel = cache.create_watch(cancelled)
    cache.set_resources(content(a="1"))
    cancel()
    cache.set_resources(content(a="2"))
    cancel()  # idempotent
    assert [s.version for s in cancelled.calls] == [1]
    assert [s.version for s in kept.calls] == [1, 2]


def test_a_watcher_may_cancel_itself_while_called() -> None:
    cache = SnapshotCache()
    calls: list[int] = []

    def once(snapshot: Snapshot) -> None:
        calls.append(snapshot.version)
        cancel()

    cancel = cache.create_watch(once)
    other = Recorder()
    cache.create_watch(other)
    cache.set_resources(content(a="1"))
    cache.set_resources(content(a="2"))
    assert calls == [1]
    assert [s.version for s in other.calls] == [1, 2]


def test_of_type_of_a_missing_type_is_empty() -> None:
    snapshot = SnapshotCache().set_resources(content(a="1"))
    assert snapshot.of_type(types.ENDPOINT) == {}


# --- wait_loaded ------------------------------------------------------------------------

async def test_wait_loaded_blocks_until_the_first_set() -> None:
    cache = SnapshotCache()
    waiter = asyncio.create_task(cache.wait_loaded())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiter.done()
    first = cache.set_resources(content(a="1"))
    assert await asyncio.wait_for(waiter, 1.0) is first


async def test_wait_loaded_returns_the_current_snapshot_once_loaded() -> None:
    cache = SnapshotCache()
    cache.set_resources(content(a="1"))
    second = cache.set_resources(content(a="2"))
    assert await asyncio.wait_for(cache.wait_loaded(), 1.0) is second


# --- Resource.pack ----------------------------------------------------------------------

def cluster_with_metadata(keys: list[str]) -> cluster_pb2.Cluster:
    """A cluster whose map fields were filled in the order of `keys`."""
    cluster = cluster_pb2.Cluster(name="svc", type=cluster_pb2.Cluster.EDS)
    metadata = base_pb2.Metadata()
    for key in keys:
        fields = struct_pb2.Struct()
        fields.update({k: ord(k) for k in keys})
        metadata.filter_metadata[key].CopyFrom(fields)
    cluster.metadata.CopyFrom(metadata)
    return cluster


def test_pack_digest_is_deterministic_for_equal_messages() -> None:
    forward = cluster_with_metadata(["a", "b", "c", "d", "e"])
    backward = cluster_with_metadata(["e", "d", "c", "b", "a"])
    assert forward == backward
    one, two = Resource.pack("svc", forward), Resource.pack("svc", backward)
    assert one.digest == two.digest
    assert one.body == two.body
    assert one.name == "svc"
    assert one.body.type_url == types.CLUSTER
    assert len(one.digest) == 16


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(cluster_pb2.Cluster(name="svc", type=cluster_pb2.Cluster.STATIC), id="enum"),
        pytest.param(cluster_pb2.Cluster(name="svc2", type=cluster_pb2.Cluster.EDS), id="name"),
        pytest.param(cluster_with_metadata(["a"]), id="metadata"),
    ],
)
def test_pack_digest_differs_for_different_messages(other: cluster_pb2.Cluster) -> None:
    base = Resource.pack("svc", cluster_pb2.Cluster(name="svc", type=cluster_pb2.Cluster.EDS))
    assert Resource.pack("svc", other).digest != base.digest


def test_unpacked_body_equals_the_message() -> None:
    message = cluster_with_metadata(["x", "y"])
    unpacked = cluster_pb2.Cluster()
    assert Resource.pack("svc", message).body.Unpack(unpacked)
    assert unpacked == message
