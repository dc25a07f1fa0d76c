"""The sqlite store: service records of one machine in one database file.

Owns: the schema (and its version, so later migrations are possible), compare-and-set
writes on a store-wide revision counter (etcd's model, so that the etcd store can replace
this one without callers noticing), the calling statistics the collector flushes and the
per-service documents (plain last-writer-wins rows, outside the revision counter), and
translating sqlite3's errors into StoreError.
Must not decide anything about services: it keeps what it is given.

Operations are short single-row statements on a local file, so they run inline on the
event loop instead of in a thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from torpor.errors import ConflictError, StoreError
from torpor.listeners import Listeners
from torpor.logs import event
from torpor.model import ServiceRecord
from torpor.store.base import RecordListener, Store

logger = logging.getLogger(__name__)

#: Schema changes, in order: entry i turns schema version i into version i + 1. Append new
#: entries for later migrations; never edit a published one.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE services ("
        " name TEXT PRIMARY KEY, revision INTEGER NOT NULL, data TEXT NOT NULL)",
        "INSERT INTO meta (key, value) VALUES ('revision', 0)",
    ),
    # 1 → 2: calling statistics, service name → CallStats.to_dict() as JSON.
    ("CREATE TABLE call_stats (name TEXT PRIMARY KEY, data TEXT NOT NULL)",),
    # 2 → 3: per-service JSON documents of a kind ("learned", "ledger").
    ("CREATE TABLE documents ("
     " kind TEXT NOT NULL, name TEXT NOT NULL, data TEXT NOT NULL, PRIMARY KEY (kind, name))",),
)

SCHEMA_VERSION = len(_MIGRATIONS)

#: How long a statement waits for another connection's write lock (another torpor process
#: on the same file) before failing.
_BUSY_TIMEOUT_MS = 5000


class SqliteStore(Store):
    """Service records in the sqlite file at `path` (WAL mode, one connection)."""

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._listeners: Listeners[[ServiceRecord]] = Listeners("store.listener_failed")

    @property
    def path(self) -> Path:
        return self._path

    async def open(self) -> None:
        if self._conn is not None:
            return
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"sqlite store {self._path}: cannot create its folder: {exc}") from exc
        with self._errors():
            conn = sqlite3.connect(str(self._path), isolation_level=None)
            try:
                conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
                conn.execute("PRAGMA journal_mode = WAL")
                self._migrate(conn)
            except BaseException:
                conn.close()
                raise
        self._conn = conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with self._errors():
                conn.close()

    async def get(self, name: str) -> ServiceRecord | None:
        with self._errors():
            row = (
                self._connection()
                .execute("SELECT revision, data FROM services WHERE name = ?", (name,))
                .fetchone()
            )
        return None if row is None else self._decode(row[0], row[1])

    async def list(self) -> list[ServiceRecord]:
        with self._errors():
            rows = (
                self._connection()
                .execute("SELECT revision, data FROM services ORDER BY name")
                .fetchall()
            )
        return [self._decode(revision, data) for revision, data in rows]

    async def put(self, record: ServiceRecord) -> ServiceRecord:
        data = json.dumps(record.to_dict(), sort_keys=True)
        with self._errors(), self._write() as conn:
            row = conn.execute(
                "SELECT revision FROM services WHERE name = ?", (record.name,)
            ).fetchone()
            _check_revision(record, None if row is None else int(row[0]))
            revision = _next_revision(conn)
            conn.execute(
                "INSERT INTO services (name, revision, data) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE"
                " SET revision = excluded.revision, data = excluded.data",
                (record.name, revision, data),
            )
        stored = dataclasses.replace(record, revision=revision)
        self._notify(stored)
        return stored

    async def delete(self, name: str) -> None:
        with self._errors(), self._write() as conn:
            deleted = conn.execute("DELETE FROM services WHERE name = ?", (name,)).rowcount
            if deleted:
                # A delete is a change too: a record re-created later must not reuse a
                # revision a reader may still hold.
                _next_revision(conn)

    def add_listener(self, listener: RecordListener) -> Callable[[], None]:
        return self._listeners.add(listener)

    async def save_call_stats(self, stats: Mapping[str, Mapping[str, Any]]) -> None:
        if not stats:
            return
        rows = [(name, json.dumps(data, separators=(",", ":"))) for name, data in stats.items()]
        with self._errors(), self._write() as conn:
            conn.executemany(
                "INSERT INTO call_stats (name, data) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET data = excluded.data",
                rows,
            )

    async def load_call_stats(self) -> dict[str, dict[str, Any]]:
        """Rows that are not a JSON object are skipped with a log line, not raised: one
        damaged entry must not cost every service its statistics."""
        with self._errors():
            rows = (
                self._connection().execute("SELECT name, data FROM call_stats ORDER BY name")
                .fetchall()
            )
        loaded: dict[str, dict[str, Any]] = {}
        for name, data in rows:
            value, problem = _json_object(data)
            if value is None:
                event(logger, "store.call_stats_unreadable", level=logging.WARNING,
                      service=name, path=str(self._path), error=problem)
                continue
            loaded[name] = value
        return loaded

    # --- documents --------------------------------------------------------------------

    async def save_documents(self, kind: str, docs: Mapping[str, Mapping[str, Any]]) -> None:
        if not docs:
            return
        rows = [(kind, name, json.dumps(data, separators=(",", ":")))
                for name, data in docs.items()]
        with self._errors(), self._write() as conn:
            conn.executemany(
                "INSERT INTO documents (kind, name, data) VALUES (?, ?, ?)"
                " ON CONFLICT (kind, name) DO UPDATE SET data = excluded.data",
                rows,
            )

    async def load_documents(self, kind: str) -> dict[str, dict[str, Any]]:
        with self._errors():
            rows = (
                self._connection()
                .execute("SELECT name, data FROM documents WHERE kind = ? ORDER BY name", (kind,))
                .fetchall()
            )
        loaded: dict[str, dict[str, Any]] = {}
        for name, data in rows:
            value, problem = _json_object(data)
            if value is None:
                event(logger, "store.document_unreadable", level=logging.WARNING,
                      kind=kind, service=name, path=str(self._path), error=problem)
                continue
            loaded[name] = value
        return loaded

    async def delete_documents(self, kind: str, names: Iterable[str]) -> None:
        rows = [(kind, name) for name in names]
        if not rows:
            return
        with self._errors(), self._write() as conn:
            conn.executemany("DELETE FROM documents WHERE kind = ? AND name = ?", rows)

    def _notify(self, record: ServiceRecord) -> None:
        """Tell listeners about a write; one failing listener must not hide it from the others."""
        self._listeners.notify(record)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"sqlite store {self._path} is not open")
        return self._conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE takes the write lock up front so that the
        compare and the set of a put cannot interleave with another process's write."""
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:  # sqlite may already have rolled back (disk full, I/O error)
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Callers catch StoreError, never sqlite3's errors; the message names the file."""
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite store {self._path}: {exc}") from exc

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Bring the schema to SCHEMA_VERSION, refusing a file written by a newer torpor."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)"
            )
            version = _meta_value(conn, "schema_version")
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"sqlite store {self._path}: schema version {version} is newer than"
                    f" this torpor's {SCHEMA_VERSION}"
                )
            for statements in _MIGRATIONS[version:]:
                for statement in statements:
                    conn.execute(statement)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (SCHEMA_VERSION,),
            )
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _decode(self, revision: int, data: str) -> ServiceRecord:
        try:
            return ServiceRecord.from_dict(json.loads(data), revision=int(revision))
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"sqlite store {self._path}: unreadable record: {exc!r}") from exc


def _check_revision(record: ServiceRecord, stored: int | None) -> None:
    """The compare of compare-and-set; raises ConflictError saying what changed."""
    if record.revision == 0 and stored is not None:
        raise ConflictError(f"{record.name}: already exists (revision {stored})")
    if record.revision != 0 and stored is None:
        raise ConflictError(f"{record.name}: was deleted (expected revision {record.revision})")
    if stored is not None and stored != record.revision:
        raise ConflictError(
            f"{record.name}: changed meanwhile (expected revision {record.revision},"
            f" stored {stored})"
        )


def _json_object(data: str) -> tuple[dict[str, Any] | None, str]:
    """A stored row as a JSON object, or (None, what is wrong with it)."""
    try:
        value = json.loads(data)
    except (ValueError, TypeError) as exc:
        return None, repr(exc)
    if not isinstance(value, dict):
        return None, f"not a JSON object but {type(value).__name__}"
    return value, ""


def _meta_value(conn: sqlite3.Connection, key: str) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return 0 if row is None else int(row[0])


def _next_revision(conn: sqlite3.Connection) -> int:
    """Advance the store-wide counter (inside the caller's write transaction)."""
    conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'revision'")
    return _meta_value(conn, "revision")
