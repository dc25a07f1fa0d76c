"""Traffic between a service's versions: the weights, their changes, one step back.

Owns the current split of every service with versions (the config's weights at first,
then what `torpor traffic`, `promote` and `rollback` set), the split before the last
change (what a rollback returns to), and the history of changes; all kept in the store
(documents of kind "traffic"), so a restart or another control plane of the fleet routes
the same split. Pure decisions (`checked_split`, `promoted`) and a thin keeper around them;
the routing reads `weight(service)` and pushes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

from torpor.catalog import ServiceCatalog
from torpor.clock import Clock
from torpor.config import ServiceConfig
from torpor.errors import InvalidArgumentError, UnknownServiceError
from torpor.logs import event
from torpor.store.base import Store

log = logging.getLogger("torpor.traffic")

KIND = "traffic"
#: Changes kept in a service's traffic history.
HISTORY = 50

Weights = dict[str, int]  # version name -> weight (relative)


@dataclasses.dataclass(frozen=True)
class Split:
    """A service's traffic now, before the last change, and the changes so far."""

    weights: Weights
    previous: Weights | None = None
    history: tuple[dict[str, Any], ...] = ()

    def to_doc(self) -> dict[str, Any]:
        return {"weights": self.weights, "previous": self.previous,
                "history": list(self.history)}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Split:
        return cls(weights={str(k): int(v) for k, v in doc["weights"].items()},
                   previous=({str(k): int(v) for k, v in doc["previous"].items()}
                             if doc.get("previous") else None),
                   history=tuple(doc.get("history") or ()))


def checked_split(versions: list[str], weights: Mapping[str, int]) -> Weights:
    """Every version's weight (those not named: 0), checked: known versions, weights
    from 0 to 1,000,000, not all 0. Raises InvalidArgumentError saying why (pure)."""
    unknown = sorted(set(weights) - set(versions))
    if unknown:
        raise InvalidArgumentError(f"unknown version(s) {', '.join(unknown)}; the versions "
                                   f"are {', '.join(versions)}")
    for version, weight in weights.items():
        if not 0 <= weight <= 1_000_000:
            raise InvalidArgumentError(f"weight of {version} must be from 0 to 1000000, "
                                       f"got {weight}")
    split = {v: int(weights.get(v, 0)) for v in versions}
    if not any(split.values()):
        raise InvalidArgumentError("every weight is 0: some version must take the traffic")
    return split


def promoted(versions: list[str], version: str) -> Weights:
    """All traffic to `version` (blue/green: one push)."""
    return checked_split(versions, {version: 100})


def describe(weights: Mapping[str, int]) -> str:
    """"v1=90 v2=10"."""
    return " ".join(f"{v}={w}" for v, w in sorted(weights.items()))


class TrafficBook:
    """The splits of every service with versions in the catalog."""

    def __init__(self, catalog: ServiceCatalog, store: Store, clock: Clock) -> None:
        self._catalog = catalog
        self._store = store
        self._clock = clock
        self._splits: dict[str, Split] = {}

    async def load(self) -> None:
        """The stored splits (a restarted control plane routes what was set)."""
        for name, doc in (await self._store.load_documents(KIND)).items():
            try:
                self._splits[name] = Split.from_doc(doc)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                event(log, "traffic.unreadable", level=logging.WARNING, service=name,
                      error=str(exc))

    def split(self, parent: str) -> Weights:
        """The weights now of `parent`'s versions (the config's until changed)."""
        versions = self._catalog.versions(parent)
        stored = self._splits.get(parent)
        if stored is not None and set(stored.weights) == {v.version for v in versions}:
            return dict(stored.weights)
        return {str(v.version): v.weight for v in versions}

    def weight(self, service: ServiceConfig) -> int:
        """A version's weight now (a plain service: 0, unused)."""
        if service.version_of is None or service.version is None:
            return 0
        return self.split(service.version_of).get(service.version, 0)

    def history(self, parent: str) -> tuple[dict[str, Any], ...]:
        stored = self._splits.get(parent)
        return stored.history if stored is not None else ()

    def previous(self, parent: str) -> Weights | None:
        stored = self._splits.get(parent)
        return dict(stored.previous) if stored and stored.previous else None

    async def set(self, parent: str, weights: Mapping[str, int], reason: str) -> Split:
        """Make `weights` the split of `parent` (stored first: what is routed is what a
        restart routes). Raises UnknownServiceError, InvalidArgumentError."""
        versions = [str(v.version) for v in self._catalog.versions(parent)]
        if not versions:
            raise UnknownServiceError(f"{parent!r} is not a service with versions")
        now = checked_split(versions, weights)
        before = self.split(parent)
        entry = {"at": self._clock.now(), "weights": now, "reason": reason}
        split = Split(now, before, (*self.history(parent), entry)[-HISTORY:])
        await self._store.save_documents(KIND, {parent: split.to_doc()})
        self._splits[parent] = split
        event(log, "traffic.changed", service=parent, weights=describe(now),
              before=describe(before), reason=reason)
        return split

    async def rollback(self, parent: str) -> Split:
        """Back to the split before the last change."""
        previous = self.previous(parent)
        if previous is None:
            raise InvalidArgumentError(f"{parent!r} has no earlier split to roll back to")
        return await self.set(parent, previous, f"rollback to {describe(previous)}")

    async def follow(self, every: float, on_change: Callable[[list[str]], None]) -> None:
        """In a fleet: splits another control plane set, read every `every` seconds;
        `on_change(parents)` when some changed."""
        while True:
            await asyncio.sleep(every)
            try:
                docs = await self._store.load_documents(KIND)
            except Exception as exc:  # the store is down: keep routing what we have
                event(log, "traffic.follow_failed", level=logging.WARNING, error=str(exc))
                continue
            changed = []
            for name, doc in docs.items():
                try:
                    split = Split.from_doc(doc)
                except (KeyError, TypeError, ValueError, AttributeError):
                    continue
                if self._splits.get(name) != split:
                    self._splits[name] = split
                    changed.append(name)
            if changed:
                on_change(changed)
