"""Versioned snapshots of Envoy resources, and watches on them.

Owns: the current desired set of resources per type, its version, and notifying watchers
when it changes. Knows nothing of gRPC, streams or nonces (that is server.py), nor of what
a resource means (that is resources.py). One version per snapshot: setting content equal
to the current content creates no version and wakes no one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Callable, Collection, Mapping

import immutables
from google.protobuf import any_pb2
from google.protobuf.message import Message

ResourceMap = Mapping[str, "Resource"]  # resource name -> Resource
SnapshotWatcher = Callable[["Snapshot"], None]


@dataclasses.dataclass(frozen=True)
class Resource:
    """One packed resource and the digest of its deterministic serialization.

    The digest decides whether a stream must be sent the resource again; computing it once
    here keeps 10k-service rebuilds cheap.
    """

    name: str
    body: any_pb2.Any
    digest: bytes

    @property
    def size(self) -> int:
        """Bytes of the packed resource on the wire (what a response carrying it costs)."""
        return len(self.body.value)

    @property
    def version(self) -> str:
        """Its per-resource version in delta xDS: the digest's hex (the same content has
        the same version across restarts, so a reconnecting Envoy is not sent it again)."""
        return self.digest.hex()

    @classmethod
    def serialized(cls, name: str, type_url: str, value: bytes) -> Resource:
        """A resource from its deterministic serialization (built without a proto)."""
        body = any_pb2.Any(type_url=type_url, value=value)
        return cls(name=name, body=body, digest=hashlib.sha256(value).digest()[:16])

    @classmethod
    def pack(cls, name: str, message: Message) -> Resource:
        body = any_pb2.Any()
        body.Pack(message, deterministic=True)
        return cls(name=name, body=body, digest=hashlib.sha256(body.value).digest()[:16])


@dataclasses.dataclass(frozen=True)
class Changes:
    """What changed in one type from the previous snapshot: names added or with a new
    digest, and names gone."""

    changed: frozenset[str]
    removed: frozenset[str]

    def __bool__(self) -> bool:
        return bool(self.changed or self.removed)


NO_CHANGES = Changes(frozenset(), frozenset())


def changes(old: ResourceMap, new: ResourceMap) -> Changes:
    """What changed from `old` to `new` (pure). Unchanged resources are mostly the same
    objects (the builder caches them): identity is checked before the digest."""
    if old is new:
        return NO_CHANGES
    changed = frozenset(name for name, r in new.items()
                        if (o := old.get(name)) is None or (o is not r and o.digest != r.digest))
    return Changes(changed, frozenset(name for name in old if name not in new))


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Every resource of every type at one version, and what changed from the version
    before it (`changes`, type URL -> Changes; None for the first): a delta stream that
    held the previous version exactly is sent just that, without comparing every resource
    again (an endpoint flip at 10k services)."""

    version: int
    resources: Mapping[str, ResourceMap]  # type URL -> name -> Resource
    changes: Mapping[str, Changes] | None = None

    def of_type(self, type_url: str) -> ResourceMap:
        return self.resources.get(type_url, {})

    def same_content(self, other: Mapping[str, ResourceMap]) -> bool:
        """True when `other` holds exactly these resources (by name and digest)."""
        types = set(self.resources) | set(other)
        return not any(changes(self.of_type(t), other.get(t, {})) for t in types
                       if self.of_type(t) is not other.get(t))


@dataclasses.dataclass(frozen=True)
class Desired:
    """A whole config to publish (type URL -> name -> Resource, persistent maps: holding
    it costs nothing), and the names per type that may differ from the config handed out
    before it (`touched`; None: unknown, compare everything)."""

    resources: Mapping[str, ResourceMap]
    touched: Mapping[str, frozenset[str]] | None = None


@dataclasses.dataclass(frozen=True)
class Delta:
    """A change of one type's resources: resources to put (new or changed) and names to
    drop. What a push of a few services carries, whatever the table's size."""

    put: Mapping[str, Resource] = dataclasses.field(default_factory=dict)
    drop: Collection[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.put or self.drop)


def apply_delta(old: ResourceMap, delta: Delta) -> tuple[immutables.Map[str, Resource], Changes]:
    """`old` with `delta` applied, and what really changed (pure; a put equal to what
    `old` holds and a drop of a name it lacks are no change). Costs what the delta holds:
    the new map shares everything else with `old` (a persistent map)."""
    base = old if isinstance(old, immutables.Map) else immutables.Map(old)
    changed = frozenset(name for name, r in delta.put.items()
                        if (o := base.get(name)) is None or (o is not r and o.digest != r.digest))
    removed = frozenset(name for name in delta.drop if name in base and name not in delta.put)
    if not changed and not removed:
        return base, NO_CHANGES
    m = base.mutate()
    for name in changed:
        m[name] = delta.put[name]
    for name in removed:
        del m[name]
    return m.finish(), Changes(changed, removed)


class SnapshotCache:
    """The current snapshot, shared by every Envoy (all nodes get the same config)."""

    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None
        self._watchers: dict[int, SnapshotWatcher] = {}
        self._next_watch = 0
        self._loaded = asyncio.Event()

    def snapshot(self) -> Snapshot | None:
        """The current snapshot, or None before the desired state was first loaded."""
        return self._snapshot

    async def wait_loaded(self) -> Snapshot:
        """Wait until a first snapshot exists (streams must never see an empty one)."""
        await self._loaded.wait()
        assert self._snapshot is not None
        return self._snapshot

    def set_resources(self, resources: Mapping[str, ResourceMap]) -> Snapshot:
        """Make `resources` the current content. A new version only if the content differs.
        Compares every resource: for whole configs (the first load, tests); a push of a
        few services goes through `apply`."""
        current = self._snapshot
        frozen = {t: rs if isinstance(rs, immutables.Map) else immutables.Map(rs)
                  for t, rs in resources.items()}
        diff = None
        if current is not None:
            diff = {t: changes(current.of_type(t), frozen.get(t, {}))
                    for t in set(current.resources) | set(frozen)}
            if not any(diff.values()):
                return current
        return self._publish(frozen, diff)

    def apply(self, deltas: Mapping[str, Delta],
              whole: Mapping[str, ResourceMap] | None = None) -> Snapshot:
        """Apply a change of some types (type URL -> Delta) to the current content: a new
        version, sharing every untouched resource with the last, only if something
        changed. Costs what the deltas hold, not the number of resources.

        `whole`: the content these deltas lead to, when the caller knows it (a publisher's
        last stage): its maps are kept as they are, so that a later comparison with that
        config finds the same objects (Snapshot.same_content) instead of comparing them."""
        current = self._snapshot
        if current is None:
            return self.set_resources({t: dict(d.put) for t, d in deltas.items()})
        resources = dict(current.resources)
        diff: dict[str, Changes] = {}
        for type_url, delta in deltas.items():
            resources[type_url], diff[type_url] = apply_delta(current.of_type(type_url), delta)
        if not any(diff.values()):
            return current
        if whole is not None:
            resources.update({t: rs for t, rs in whole.items() if isinstance(rs, immutables.Map)
                              and len(rs) == len(resources.get(t, ()))})
        return self._publish(resources, diff)

    def _publish(self, resources: Mapping[str, ResourceMap],
                 diff: Mapping[str, Changes] | None) -> Snapshot:
        current = self._snapshot
        version = 1 if current is None else current.version + 1
        self._snapshot = Snapshot(version=version, resources=resources, changes=diff)
        self._loaded.set()
        for watcher in list(self._watchers.values()):
            watcher(self._snapshot)
        return self._snapshot

    def create_watch(self, watcher: SnapshotWatcher) -> Callable[[], None]:
        """Call `watcher(snapshot)` on every new version; returns the cancel function."""
        key = self._next_watch
        self._next_watch += 1
        self._watchers[key] = watcher

        def cancel() -> None:
            self._watchers.pop(key, None)

        return cancel
