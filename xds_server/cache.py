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
from collections.abc import Callable, Mapping

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
    def pack(cls, name: str, message: Message) -> Resource:
        body = any_pb2.Any()
        body.Pack(message, deterministic=True)
        return cls(name=name, body=body, digest=hashlib.sha256(body.value).digest()[:16])


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Every resource of every type at one version."""

    version: int
    resources: Mapping[str, ResourceMap]  # type URL -> name -> Resource

    def of_type(self, type_url: str) -> ResourceMap:
        return self.resources.get(type_url, {})

    def same_content(self, other: Mapping[str, ResourceMap]) -> bool:
        """True when `other` holds exactly these resources (by name and digest)."""
        types = set(self.resources) | set(other)
        return all(_digests(self.of_type(t)) == _digests(other.get(t, {})) for t in types)


def _digests(resources: ResourceMap) -> dict[str, bytes]:
    return {name: r.digest for name, r in resources.items()}


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
        """Make `resources` the current content. A new version only if the content differs."""
        current = self._snapshot
        if current is not None and current.same_content(resources):
            return current
        version = 1 if current is None else current.version + 1
        frozen = {t: dict(rs) for t, rs in resources.items()}
        self._snapshot = Snapshot(version=version, resources=frozen)
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
