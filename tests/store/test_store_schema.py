"""Schema versioning: migrations from an empty file or an older schema, refusal of a newer one."""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec
import pytest

from spike.app.store import sqlite_schema as storage
from spike.app.store.errors import StorageError
from spike.app.store.sqlite_schema import DB_NAME, MIGRATIONS, NexusStore
from spike.protocol.record import seal_key
from tests.store.store_helpers import ROOT_KEY, WAIT, open_store, raw_db

LATEST = len(MIGRATIONS)


def tables(data_dir: Path) -> set[str]:
    with raw_db(data_dir) as db:
        return {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def user_version(data_dir: Path) -> int:
    with raw_db(data_dir) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def test_a_missing_file_is_created_private_and_migrated(data_dir: Path) -> None:
    NexusStore(data_dir).close()
    assert user_version(data_dir) == LATEST
    assert {"key_record", "secret", "secret_version"} <= tables(data_dir)
    assert (data_dir / DB_NAME).stat().st_mode & 0o077 == 0
    assert data_dir.stat().st_mode & 0o077 == 0


def test_an_empty_file_is_migrated(data_dir: Path) -> None:
    data_dir.mkdir()
    (data_dir / DB_NAME).write_bytes(b"")
    NexusStore(data_dir).close()
    assert user_version(data_dir) == LATEST


def test_an_older_schema_is_migrated_and_keeps_its_data(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A database written by the first release (key record only) gains the secret tables."""
    data_dir.mkdir()
    record, _ = seal_key(ROOT_KEY, epoch=3, threshold=2, keeper_ids=[1, 2, 3])
    with raw_db(data_dir) as db:
        for statement in MIGRATIONS[0]:
            db.execute(statement)
        db.execute("PRAGMA user_version = 1")
        db.execute(
            "INSERT INTO key_record (id, epoch, record, updated_at) VALUES (1, 3, ?, '2025-01-01T00:00:00+00:00')",
            (msgspec.json.encode(record),),
        )

    with caplog.at_level(logging.INFO, logger="spike.nexus.store"):
        reopened = NexusStore(data_dir)
    try:
        assert reopened.load_key_record() == record
    finally:
        reopened.close()
    assert user_version(data_dir) == LATEST
    assert f"database schema upgraded from version 1 to {LATEST}" in caplog.text  # said once, in the log
    store = open_store(data_dir, epoch=3)
    try:
        assert store.put("after/migration", {"k": "v"}, None).result(WAIT) == 1
        assert store.get("after/migration", 0) == (1, {"k": "v"})
    finally:
        store.close()


def test_reopening_a_current_schema_changes_nothing(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = open_store(data_dir)
    store.put("kept", {"k": "v"}, None).result(WAIT)
    store.close()
    with caplog.at_level(logging.INFO, logger="spike.nexus.store"):
        store = open_store(data_dir)  # migrations run again: a no-op
    assert "schema upgraded" not in caplog.text
    try:
        assert store.get("kept", 0) == (1, {"k": "v"})
    finally:
        store.close()
    assert user_version(data_dir) == LATEST


def test_a_newer_schema_is_refused_untouched(data_dir: Path) -> None:
    NexusStore(data_dir).close()
    with raw_db(data_dir) as db:
        db.execute(f"PRAGMA user_version = {LATEST + 1}")
    before = (data_dir / DB_NAME).read_bytes()
    with pytest.raises(StorageError, match=rf"schema version {LATEST + 1}, newer than this spike knows"):
        NexusStore(data_dir)
    assert user_version(data_dir) == LATEST + 1
    assert (data_dir / DB_NAME).read_bytes() == before


def test_a_failing_migration_is_rolled_back_whole(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step runs in one transaction with the version bump: a failure leaves the old schema."""
    broken = (*MIGRATIONS, ("CREATE TABLE extra (x INTEGER)", "THIS IS NOT SQL"))
    monkeypatch.setattr(storage, "MIGRATIONS", broken)
    with pytest.raises(StorageError, match="cannot open the database"):
        NexusStore(data_dir)
    assert user_version(data_dir) == 0
    assert "extra" not in tables(data_dir) and "secret" not in tables(data_dir)
    monkeypatch.setattr(storage, "MIGRATIONS", MIGRATIONS)
    NexusStore(data_dir).close()
    assert user_version(data_dir) == LATEST


def test_a_file_that_is_not_a_database_is_a_storage_error(data_dir: Path) -> None:
    data_dir.mkdir()
    (data_dir / DB_NAME).write_bytes(b"this is not an sqlite file" * 100)
    with pytest.raises(StorageError, match="cannot open the database"):
        NexusStore(data_dir)


def test_a_database_from_before_rotations_gains_the_rotation_state_in_place(data_dir: Path) -> None:
    """Schema 4 (spike before key rotation), with a record and a secret: the record is its own high-water mark."""
    data_dir.mkdir()
    record, _ = seal_key(ROOT_KEY, epoch=3, threshold=2, keeper_ids=[1, 2, 3])
    with raw_db(data_dir) as db:
        for step in MIGRATIONS[:4]:
            for statement in step:
                db.execute(statement)
        db.execute("PRAGMA user_version = 4")
        db.execute(
            "INSERT INTO key_record (id, epoch, record, updated_at) VALUES (1, 3, ?, '2025-01-01T00:00:00+00:00')",
            (msgspec.json.encode(record),),
        )
    reopened = NexusStore(data_dir)
    try:
        assert reopened.load_key_record() == record
        assert reopened.load_rotation_state() == (None, None, 3)
        assert reopened.load_keyring() == (3, None)
    finally:
        reopened.close()
    assert user_version(data_dir) == LATEST
    assert "pending_rotation" in tables(data_dir)
