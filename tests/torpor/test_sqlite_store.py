"""SqliteStore against real sqlite files in a temp folder."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from torpor.errors import ConflictError, StoreError
from torpor.model import ServiceRecord, ServiceState
from torpor.store.sqlite import SCHEMA_VERSION, SqliteStore

NOW = 1_700_000_000.0


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "nested" / "state.db")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def test_create_then_get_and_list(store: SqliteStore) -> None:
    b = await store.put(ServiceRecord.new("b", replicas=2, now=NOW))
    a = await store.put(ServiceRecord.new("a", replicas=1, now=NOW))

    assert b.revision > 0
    assert a.revision > b.revision  # one counter for the whole store
    assert await store.get("a") == a
    assert await store.get("missing") is None
    assert [r.name for r in await store.list()] == ["a", "b"]


async def test_put_is_compare_and_set(store: SqliteStore) -> None:
    created = await store.put(ServiceRecord.new("echo", replicas=2, now=NOW))
    hibernating = created.with_state(ServiceState.HIBERNATING, NOW + 1, "idle")
    updated = await store.put(hibernating)
    assert updated.revision > created.revision
    assert (await store.get("echo")) == updated

    with pytest.raises(ConflictError, match="changed meanwhile"):
        await store.put(created.with_state(ServiceState.HIBERNATING, NOW + 2, "stale writer"))
    with pytest.raises(ConflictError, match="already exists"):
        await store.put(ServiceRecord.new("echo", replicas=1, now=NOW))
    assert (await store.get("echo")) == updated  # the losers changed nothing


async def test_update_of_deleted_record_conflicts(store: SqliteStore) -> None:
    created = await store.put(ServiceRecord.new("echo", replicas=1, now=NOW))
    await store.delete("echo")
    await store.delete("echo")  # unknown: no error

    assert await store.get("echo") is None
    with pytest.raises(ConflictError, match="deleted"):
        await store.put(dataclasses.replace(created, desired_replicas=3))
    recreated = await store.put(ServiceRecord.new("echo", replicas=1, now=NOW))
    assert recreated.revision > created.revision + 1  # the delete used a revision too


async def test_listeners_see_each_successful_put(store: SqliteStore) -> None:
    seen: list[ServiceRecord] = []
    remove = store.add_listener(seen.append)

    stored = await store.put(ServiceRecord.new("echo", replicas=1, now=NOW))
    with pytest.raises(ConflictError):
        await store.put(ServiceRecord.new("echo", replicas=1, now=NOW))
    assert seen == [stored]

    remove()
    await store.put(dataclasses.replace(stored, desired_replicas=2))
    assert seen == [stored]


async def test_failing_listener_does_not_break_put(store: SqliteStore) -> None:
    seen: list[ServiceRecord] = []

    def broken(record: ServiceRecord) -> None:
        raise RuntimeError("listener bug")

    store.add_listener(broken)
    store.add_listener(seen.append)
    stored = await store.put(ServiceRecord.new("echo", replicas=1, now=NOW))
    assert seen == [stored]


async def test_records_and_history_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = SqliteStore(path)
    await first.open()
    record = await first.put(ServiceRecord.new("echo", replicas=3, now=NOW))
    record = await first.put(record.with_state(ServiceState.HIBERNATING, NOW + 5, "idle"))
    record = await first.put(record.with_state(ServiceState.HIBERNATED, NOW + 6, "scaled to 0"))
    await first.close()

    second = SqliteStore(path)
    await second.open()
    try:
        reopened = await second.get("echo")
        assert reopened == record
        assert reopened is not None
        assert [t.to_state for t in reopened.history] == [
            ServiceState.ACTIVE,
            ServiceState.HIBERNATING,
            ServiceState.HIBERNATED,
        ]
        # The revision counter survives too: a new write never reuses an old revision.
        other = await second.put(ServiceRecord.new("other", replicas=1, now=NOW))
        assert other.revision > record.revision
    finally:
        await second.close()


async def test_schema_version_is_recorded(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStore(path)
    await store.open()
    await store.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        mode = conn.execute("PRAGMA journal_mode").fetchone()
    assert row == (SCHEMA_VERSION,)
    assert mode == ("wal",)


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStore(path)
    await store.open()
    await store.close()
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE meta SET value = 999 WHERE key = 'schema_version'")

    with pytest.raises(StoreError, match="newer"):
        await SqliteStore(path).open()


async def test_corrupt_file_raises_store_error(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database\n" * 100)

    with pytest.raises(StoreError, match=str(path)):
        await SqliteStore(path).open()


async def test_unwritable_path_raises_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    # Its parent is a regular file: no permission bits needed (tests may run as root).
    with pytest.raises(StoreError, match="a-file"):
        await SqliteStore(blocker / "state.db").open()
    # The path itself is a folder.
    with pytest.raises(StoreError, match=str(tmp_path)):
        await SqliteStore(tmp_path).open()


async def test_use_before_open_raises_store_error(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    with pytest.raises(StoreError, match="not open"):
        await store.get("echo")


# --- calling statistics ---------------------------------------------------------------


def stats_dict(total: int, last_call: float | None = None) -> dict[str, object]:
    """Shaped like CallStats.to_dict(); the store keeps whatever JSON object it is given."""
    return {"format": 1, "created_at": NOW, "last_call": last_call, "total": total,
            "buckets": {"minute": {"340000000": total}}, "by_hour_of_week": [0] * 168}


async def test_call_stats_round_trip_and_upsert(store: SqliteStore) -> None:
    assert await store.load_call_stats() == {}
    await store.save_call_stats({})  # nothing to write: no error

    await store.save_call_stats({"a": stats_dict(1), "b": stats_dict(2, NOW)})
    assert await store.load_call_stats() == {"a": stats_dict(1), "b": stats_dict(2, NOW)}

    # Replaces the names given, leaves the others alone.
    await store.save_call_stats({"b": stats_dict(5, NOW + 1), "c": stats_dict(3)})
    assert await store.load_call_stats() == {
        "a": stats_dict(1), "b": stats_dict(5, NOW + 1), "c": stats_dict(3)
    }


async def test_call_stats_are_not_service_records(store: SqliteStore) -> None:
    record = await store.put(ServiceRecord.new("echo", replicas=1, now=NOW))
    await store.save_call_stats({"echo": stats_dict(7)})
    # Outside the revision counter and the records: no listener, no revision used.
    assert await store.list() == [record]
    later = await store.put(ServiceRecord.new("other", replicas=1, now=NOW))
    assert later.revision == record.revision + 1


async def test_call_stats_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = SqliteStore(path)
    await first.open()
    try:
        await first.save_call_stats({"echo": stats_dict(4, NOW)})
    finally:
        await first.close()
    second = SqliteStore(path)
    await second.open()
    try:
        assert await second.load_call_stats() == {"echo": stats_dict(4, NOW)}
    finally:
        await second.close()


async def test_unreadable_call_stats_rows_are_skipped_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.db"
    store = SqliteStore(path)
    await store.open()
    try:
        await store.save_call_stats({"good": stats_dict(1)})
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("INSERT INTO call_stats (name, data) VALUES ('torn', '{\"format\": 1')")
            conn.execute("INSERT INTO call_stats (name, data) VALUES ('listed', '[1, 2]')")

        with caplog.at_level(logging.WARNING, logger="torpor.store.sqlite"):
            assert await store.load_call_stats() == {"good": stats_dict(1)}
    finally:
        await store.close()
    skipped = sorted(
        r.__dict__["service"] for r in caplog.records
        if r.getMessage() == "store.call_stats_unreadable"
    )
    assert skipped == ["listed", "torn"]


async def test_call_stats_errors_are_store_errors(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    with pytest.raises(StoreError, match="not open"):
        await store.save_call_stats({"echo": stats_dict(1)})
    with pytest.raises(StoreError, match="not open"):
        await store.load_call_stats()

    await store.open()
    try:
        # Another process holds the write lock longer than the busy timeout allows.
        with contextlib.closing(sqlite3.connect(store.path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            store._connection().execute("PRAGMA busy_timeout = 0")
            with pytest.raises(StoreError, match="locked"):
                await store.save_call_stats({"echo": stats_dict(1)})
            other.execute("ROLLBACK")
        # The failed save left nothing half-written and the store usable.
        assert await store.load_call_stats() == {}
        await store.save_call_stats({"echo": stats_dict(1)})
        assert await store.load_call_stats() == {"echo": stats_dict(1)}
    finally:
        await store.close()


#: Schema version 1 exactly as torpor 0.1 wrote it (a frozen copy: migrations must keep
#: opening such files, whatever _MIGRATIONS grows into).
_SCHEMA_1 = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "CREATE TABLE services (name TEXT PRIMARY KEY, revision INTEGER NOT NULL, data TEXT NOT NULL)",
    "INSERT INTO meta (key, value) VALUES ('revision', 1)",
    "INSERT INTO meta (key, value) VALUES ('schema_version', 1)",
)


async def test_schema_1_file_migrates_and_gains_call_stats(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    old = dataclasses.replace(ServiceRecord.new("echo", replicas=2, now=NOW), revision=1)
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        for statement in _SCHEMA_1:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO services (name, revision, data) VALUES (?, 1, ?)",
            ("echo", json.dumps(old.to_dict())),
        )

    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.get("echo") == old  # records kept
        assert await store.load_call_stats() == {}  # the new table exists
        await store.save_call_stats({"echo": stats_dict(3)})
        assert await store.load_call_stats() == {"echo": stats_dict(3)}
        newer = await store.put(ServiceRecord.new("other", replicas=1, now=NOW))
        assert newer.revision == 2  # the revision counter carried over
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert version == (SCHEMA_VERSION,) == (3,)

    # Opening again runs no migration twice.
    again = SqliteStore(path)
    await again.open()
    try:
        assert await again.load_call_stats() == {"echo": stats_dict(3)}
    finally:
        await again.close()


# --- documents ------------------------------------------------------------------------


async def test_documents_round_trip_per_kind_and_upsert(store: SqliteStore) -> None:
    assert await store.load_documents("ledger") == {}
    await store.save_documents("ledger", {})  # nothing to write: no error
    await store.delete_documents("ledger", [])

    await store.save_documents("ledger", {"a": {"saved": 1.5}, "b": {"saved": 2}})
    await store.save_documents("learned", {"a": {"gaps": [1, 2, 3]}})
    assert await store.load_documents("ledger") == {"a": {"saved": 1.5}, "b": {"saved": 2}}
    assert await store.load_documents("learned") == {"a": {"gaps": [1, 2, 3]}}

    # Replaces the names given, leaves the others (and the other kind) alone.
    await store.save_documents("ledger", {"b": {"saved": 5}, "c": {"saved": 3}})
    assert await store.load_documents("ledger") == {
        "a": {"saved": 1.5}, "b": {"saved": 5}, "c": {"saved": 3}
    }
    await store.delete_documents("ledger", ["a", "c", "unknown"])
    assert await store.load_documents("ledger") == {"b": {"saved": 5}}
    assert await store.load_documents("learned") == {"a": {"gaps": [1, 2, 3]}}
    # Outside the records and the calling statistics.
    assert await store.list() == []
    assert await store.load_call_stats() == {}


async def test_documents_survive_reopen_and_unreadable_ones_are_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.db"
    first = SqliteStore(path)
    await first.open()
    try:
        await first.save_documents("ledger", {"echo": {"saved": 4.0}})
    finally:
        await first.close()
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("INSERT INTO documents VALUES ('ledger', 'torn', '{\"saved\": 1')")
        conn.execute("INSERT INTO documents VALUES ('ledger', 'listed', '[1]')")

    second = SqliteStore(path)
    await second.open()
    try:
        with caplog.at_level(logging.WARNING, logger="torpor.store.sqlite"):
            assert await second.load_documents("ledger") == {"echo": {"saved": 4.0}}
    finally:
        await second.close()
    skipped = sorted(
        (r.__dict__["kind"], r.__dict__["service"]) for r in caplog.records
        if r.getMessage() == "store.document_unreadable"
    )
    assert skipped == [("ledger", "listed"), ("ledger", "torn")]


async def test_schema_2_file_migrates_and_gains_documents(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        for statement in _SCHEMA_1:
            conn.execute(statement)
        conn.execute("CREATE TABLE call_stats (name TEXT PRIMARY KEY, data TEXT NOT NULL)")
        conn.execute("UPDATE meta SET value = 2 WHERE key = 'schema_version'")
        conn.execute("INSERT INTO call_stats VALUES ('echo', ?)", (json.dumps(stats_dict(2)),))

    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.load_call_stats() == {"echo": stats_dict(2)}  # kept
        assert await store.load_documents("ledger") == {}
        await store.save_documents("ledger", {"echo": {"saved": 1}})
        assert await store.load_documents("ledger") == {"echo": {"saved": 1}}
    finally:
        await store.close()
