"""The store interface: durable service records with compare-and-set writes.

Owns the contract every backend (sqlite for one machine, etcd for a fleet) implements.
Writes are compare-and-set on a record's `revision`, never last-writer-wins, so that a
reconciler and an activator racing on one service cannot silently undo each other.
Besides records: calling statistics, and per-service JSON documents of a kind ("learned",
"ledger"), plain last-writer-wins values that only a fleet's leader writes.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torpor.model import ServiceRecord

RecordListener = Callable[[ServiceRecord], None]
#: (service name, unix time of a call another process logged)
CallListener = Callable[[str, float], None]


class Store(abc.ABC):
    """Service records keyed by name."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect / create the schema. Raises StoreError when the store cannot be used."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections. Records stay."""

    @abc.abstractmethod
    async def get(self, name: str) -> ServiceRecord | None:
        """The record of `name`, or None."""

    @abc.abstractmethod
    async def list(self) -> list[ServiceRecord]:
        """Every record, sorted by name."""

    @abc.abstractmethod
    async def put(self, record: ServiceRecord) -> ServiceRecord:
        """Write `record` if the stored revision still equals `record.revision`.

        `record.revision == 0` means "create; must not exist". Returns the record with its
        new revision. Raises ConflictError when the stored record changed meanwhile.
        """

    @abc.abstractmethod
    async def delete(self, name: str) -> None:
        """Forget a service (no error if it is unknown)."""

    @abc.abstractmethod
    def add_listener(self, listener: RecordListener) -> Callable[[], None]:
        """Call `listener(record)` after every successful put seen by this store; returns
        a function that removes the listener. Listeners run on the event loop and must not block."""

    def add_call_listener(self, listener: CallListener) -> Callable[[], None]:
        """Call `listener(name, at)` when another process saved a later call of `name`
        (a fleet's control planes each log their own Envoys' calls). One process: never."""
        return lambda: None

    @abc.abstractmethod
    async def save_call_stats(self, stats: Mapping[str, Mapping[str, Any]]) -> None:
        """Write calling statistics (service name → CallStats.to_dict()), replacing what is
        stored for those names; names not given are left alone. Last writer wins: each
        control plane flushes what it counted itself."""

    @abc.abstractmethod
    async def load_call_stats(self) -> dict[str, dict[str, Any]]:
        """Every stored statistics entry (service name → dict), {} when none."""

    @abc.abstractmethod
    async def save_documents(self, kind: str, docs: Mapping[str, Mapping[str, Any]]) -> None:
        """Write JSON documents of `kind` (service name → JSON object), replacing what is
        stored for those names; names not given are left alone. One value per (kind, name)
        shared by every member of a fleet: last writer wins, so only the leader writes."""

    @abc.abstractmethod
    async def load_documents(self, kind: str) -> dict[str, dict[str, Any]]:
        """Every stored document of `kind` (service name → dict), {} when none. A document
        that is not a JSON object is skipped with a log line (`store.document_unreadable`)."""

    @abc.abstractmethod
    async def delete_documents(self, kind: str, names: Iterable[str]) -> None:
        """Forget the documents of `kind` for `names` (unknown names are no error)."""
