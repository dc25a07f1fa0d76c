"""The etcd store: service records, calling statistics and history of a fleet.

Keys under the configured prefix:
- `services/<name>`: the ServiceRecord as JSON (its history inside). A record's revision is
  the key's mod_revision, so a put is one transaction "if mod_revision is still N" (or
  "if it does not exist" for a create): a reconciler hibernating and an activator waking
  the same service can never undo each other, whoever writes second gets ConflictError.
- `stats/<name>/<member>`: what one control plane counted (CallStats JSON). Each writes
  its own key: no control plane overwrites another's counts.
- `docs/<kind>/<name>`: a per-service JSON document of a kind ("learned", "ledger"), one
  value for the whole fleet (last writer wins: only the leader writes). Not watched.

Owns: the encoding, compare-and-set, and the watch that hands every record written by
any process to this process's listeners within milliseconds (control planes push it to
Envoy), resumed after an etcd outage from the last revision seen, and replaced by a full
listing when that revision was compacted. Peers' last calls are handed to call listeners
the same way (the leader's idle policy must see calls another control plane logged).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aetcd import rpc

from torpor import metrics
from torpor.errors import ConflictError, StoreError
from torpor.etcd.connection import (
    MAX_TXN_OPS,
    EtcdConnection,
    range_end,
    reraise_if_cancelling,
)
from torpor.etcd.watch import WatchCompactedError, is_delete, watch
from torpor.listeners import Listeners
from torpor.logs import event
from torpor.model import ServiceRecord
from torpor.store.base import CallListener, RecordListener, Store

log = logging.getLogger("torpor.store.etcd")

#: Keys per page of a full listing (each record is a few KB with its history).
_PAGE = 500


class EtcdStore(Store):
    def __init__(self, conn: EtcdConnection, member: str) -> None:
        self._conn = conn
        self._member = member
        self._services = conn.key("services") + b"/"
        self._stats = conn.key("stats") + b"/"
        self._docs = conn.key("docs") + b"/"
        self._listeners: Listeners[[ServiceRecord]] = Listeners("store.listener_failed")
        self._call_listeners: Listeners[[str, float]] = Listeners("store.listener_failed")
        self._watch_task: asyncio.Task[None] | None = None
        self._revision = 0  # the newest revision the watch has delivered

    async def open(self) -> None:
        if self._watch_task is not None:
            return
        await self._conn.open()
        response = await self._conn.call("open", self._conn.kv.Range,
                                          rpc.RangeRequest(key=self._services, count_only=True,
                                                           range_end=range_end(self._services)))
        self._revision = int(response.header.revision)
        if self._watch_task is None:
            self._watch_task = asyncio.create_task(self._follow())

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None

    # --- records ----------------------------------------------------------------------

    async def get(self, name: str) -> ServiceRecord | None:
        kv = await self._conn.get(self._services + name.encode())
        return None if kv is None else self._decode(kv)

    async def list(self) -> list[ServiceRecord]:
        records, _ = await self._list_records()
        return records

    async def put(self, record: ServiceRecord) -> ServiceRecord:
        key = self._services + record.name.encode()
        data = json.dumps(record.to_dict(), sort_keys=True).encode()
        if record.revision == 0:
            compare = rpc.Compare(key=key, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL,
                                  create_revision=0)
        else:
            compare = rpc.Compare(key=key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL,
                                  mod_revision=record.revision)
        txn = rpc.TxnRequest(
            compare=[compare],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=data))],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key, keys_only=True))],
        )
        response = await self._conn.call(f"put {record.name}", self._conn.kv.Txn, txn)
        if not response.succeeded:
            kvs = response.responses[0].response_range.kvs
            raise _conflict(record, int(kvs[0].mod_revision) if kvs else None)
        stored = dataclasses.replace(record, revision=int(response.header.revision))
        self._listeners.notify(stored)
        return stored

    async def delete(self, name: str) -> None:
        await self._conn.call(f"delete {name}", self._conn.kv.DeleteRange,
                              rpc.DeleteRangeRequest(key=self._services + name.encode()))

    def add_listener(self, listener: RecordListener) -> Callable[[], None]:
        return self._listeners.add(listener)

    def add_call_listener(self, listener: CallListener) -> Callable[[], None]:
        return self._call_listeners.add(listener)

    # --- calling statistics -------------------------------------------------------------

    async def save_call_stats(self, stats: Mapping[str, Mapping[str, Any]]) -> None:
        ops = [rpc.RequestOp(request_put=rpc.PutRequest(
                   key=self._stats_key(name),
                   value=json.dumps(data, separators=(",", ":")).encode()))
               for name, data in stats.items()]
        await self._txns("save call stats", ops)

    async def load_call_stats(self) -> dict[str, dict[str, Any]]:
        """This member's own entries, each with the latest `last_call` any member saw
        (another control plane may have logged a later call of the service)."""
        own: dict[str, dict[str, Any]] = {}
        latest: dict[str, float] = {}
        kvs, _ = await self._scan(self._stats)
        for kv in kvs:
            name, _, member = kv.key[len(self._stats):].decode().rpartition("/")
            value = _json_object(kv.value, name)
            if value is None:
                continue
            if member == self._member:
                own[name] = value
            at = value.get("last_call")
            if isinstance(at, int | float):
                latest[name] = max(latest.get(name, 0.0), float(at))
        for name, value in own.items():
            if name in latest:
                value["last_call"] = max(latest[name], value.get("last_call") or 0.0)
        return own

    def _stats_key(self, name: str) -> bytes:
        return self._stats + f"{name}/{self._member}".encode()

    # --- documents ----------------------------------------------------------------------

    async def save_documents(self, kind: str, docs: Mapping[str, Mapping[str, Any]]) -> None:
        ops = [rpc.RequestOp(request_put=rpc.PutRequest(
                   key=self._doc_key(kind, name),
                   value=json.dumps(data, separators=(",", ":")).encode()))
               for name, data in docs.items()]
        await self._txns(f"save {kind} documents", ops)

    async def load_documents(self, kind: str) -> dict[str, dict[str, Any]]:
        prefix = self._doc_key(kind, "")
        kvs, _ = await self._scan(prefix)
        loaded: dict[str, dict[str, Any]] = {}
        for kv in kvs:
            name = kv.key[len(prefix):].decode(errors="replace")
            value = _json_object(kv.value, name, "store.document_unreadable", kind=kind)
            if value is not None:
                loaded[name] = value
        return loaded

    async def delete_documents(self, kind: str, names: Iterable[str]) -> None:
        ops = [rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                   key=self._doc_key(kind, name)))
               for name in names]
        await self._txns(f"delete {kind} documents", ops)

    def _doc_key(self, kind: str, name: str) -> bytes:
        return self._docs + f"{kind}/{name}".encode()

    async def _txns(self, what: str, ops: builtins.list[Any]) -> None:
        """`ops` in transactions of at most MAX_TXN_OPS operations (etcd's limit)."""
        for start in range(0, len(ops), MAX_TXN_OPS):
            await self._conn.call(what, self._conn.kv.Txn,
                                  rpc.TxnRequest(success=ops[start:start + MAX_TXN_OPS]))

    # --- following other writers --------------------------------------------------------

    async def _follow(self) -> None:
        """Watch records and stats from the revision seen last; resume after an outage;
        list again after a compaction (listeners skip revisions they already have)."""
        while True:
            try:
                # services/ .. stats/ : records and statistics, not locks or leaders.
                async for revision, events in watch(self._conn, self._services,
                                                    range_end(self._stats),
                                                    self._revision + 1):
                    self._deliver(events)
                    self._revision = revision
            except WatchCompactedError as exc:
                event(log, "store.watch_compacted", revision=self._revision,
                      oldest=exc.compact_revision, level=logging.WARNING)
                await self._resync()
            except StoreError as exc:
                reraise_if_cancelling(exc)
                metrics.ETCD_WATCH_RESTARTS.labels(watch="store").inc()
                event(log, "store.watch_lost", error=str(exc), resume_from=self._revision + 1,
                      level=logging.WARNING)
                await asyncio.sleep(0.5)

    def _deliver(self, events: builtins.list[Any]) -> None:
        for e in events:
            key: bytes = e.kv.key
            if is_delete(e):
                continue
            if key.startswith(self._services):
                try:
                    record = self._decode(e.kv)
                except StoreError as exc:
                    event(log, "store.record_unreadable", key=key.decode(), error=str(exc),
                          level=logging.WARNING)
                    continue
                self._listeners.notify(record)
            elif key.startswith(self._stats):
                self._deliver_call(key, e.kv.value)

    def _deliver_call(self, key: bytes, value: bytes) -> None:
        name, _, member = key[len(self._stats):].decode().rpartition("/")
        if member == self._member:
            return
        data = _json_object(value, name)
        at = data.get("last_call") if data else None
        if isinstance(at, int | float):
            self._call_listeners.notify(name, float(at))

    async def _resync(self) -> None:
        """Everything as it is now, to every listener; then watch from there."""
        while True:
            try:
                records, revision = await self._list_records()
                break
            except StoreError as exc:
                reraise_if_cancelling(exc)
                event(log, "store.resync_failed", error=str(exc), level=logging.WARNING)
                await asyncio.sleep(0.5)
        for record in records:
            self._listeners.notify(record)
        self._revision = revision
        event(log, "store.resynced", records=len(records), revision=revision)

    async def _list_records(self) -> tuple[builtins.list[ServiceRecord], int]:
        kvs, revision = await self._scan(self._services)
        records = []
        for kv in kvs:
            try:
                records.append(self._decode(kv))
            except StoreError as exc:  # one damaged record must not cost every service
                event(log, "store.record_unreadable", key=kv.key.decode(), error=str(exc),
                      level=logging.ERROR)
        return sorted(records, key=lambda r: r.name), revision

    async def _scan(self, prefix: bytes) -> tuple[builtins.list[Any], int]:
        """Every key-value under `prefix`, read a page at a time but all at one revision
        (returned too: a watch from the next one misses nothing)."""
        start, end, at = prefix, range_end(prefix), 0
        found: builtins.list[Any] = []
        while True:
            response = await self._conn.call("list", self._conn.kv.Range, rpc.RangeRequest(
                key=start, range_end=end, limit=_PAGE, revision=at))
            at = at or int(response.header.revision)
            found.extend(response.kvs)
            if not response.more or not response.kvs:
                return found, at
            start = response.kvs[-1].key + b"\0"

    def _decode(self, kv: Any) -> ServiceRecord:
        try:
            return ServiceRecord.from_dict(json.loads(kv.value), revision=int(kv.mod_revision))
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"etcd {self._conn.where}: unreadable record at "
                             f"{kv.key.decode()}: {exc!r}") from exc


def _conflict(record: ServiceRecord, stored: int | None) -> ConflictError:
    if record.revision == 0:
        return ConflictError(f"{record.name}: already exists (revision {stored})")
    if stored is None:
        return ConflictError(f"{record.name}: was deleted (expected revision {record.revision})")
    return ConflictError(f"{record.name}: changed meanwhile (expected revision "
                         f"{record.revision}, stored {stored})")


def _json_object(value: bytes, name: str, what: str = "store.call_stats_unreadable",
                 **fields: Any) -> dict[str, Any] | None:
    try:
        data = json.loads(value)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        event(log, what, service=name, level=logging.WARNING, **fields)
        return None
    return data
