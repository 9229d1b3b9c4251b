"""A database that fails a read or a key-record write: a `StorageError` that says what, never a raw sqlite3 error.

The API maps `StorageError` to 500 and its `DatabaseUnavailable` kind ("not now":
busy, read-only, I/O error, disk full, cannot open) to 503; a raw `sqlite3.Error`
would reach the API's last resort instead, logged with a traceback.  The errors
here are real SQLite failures, provoked on real files.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spike.app.store.errors import DatabaseUnavailable, StorageError
from spike.app.store.sqlite import SecretStore
from spike.app.store.sqlite_schema import DB_NAME, NexusStore, sqlite_failure
from spike.protocol.material import RootKey
from spike.protocol.record import seal_key

READS: dict[str, Callable[[SecretStore], Any]] = {
    "get": lambda s: s.get("a/b", 0),
    "metadata": lambda s: s.metadata("a/b"),
    "list_paths": lambda s: s.list_paths("a/", limit=10),
    "count": lambda s: s.count(),
    "policy_rows": lambda s: s.policy_rows(),
    "policy_row": lambda s: s.policy_row("p"),
    "policy_names": lambda s: s.policy_names(),
}


@pytest.fixture
def denying(store: SecretStore) -> Iterator[SecretStore]:
    """The store's read connection refuses every statement (SQLITE_AUTH: a "broken" failure, not "not now")."""
    store.reader.set_authorizer(lambda *_: sqlite3.SQLITE_DENY)
    try:
        yield store
    finally:
        store.reader.set_authorizer(None)


@pytest.mark.parametrize("read", sorted(READS))
def test_a_failed_read_is_a_storage_error_that_names_what_it_read(denying: SecretStore, read: str) -> None:
    with pytest.raises(StorageError, match=r"^cannot read ") as caught:
        READS[read](denying)
    assert not isinstance(caught.value, DatabaseUnavailable)  # not authorised is not "try later"


def test_reads_work_again_once_the_cause_is_gone(store: SecretStore) -> None:
    assert store.put("a/b", {"k": "v"}, None).result(10) == 1
    store.reader.set_authorizer(lambda *_: sqlite3.SQLITE_DENY)
    with pytest.raises(StorageError):
        store.get("a/b", 0)
    store.reader.set_authorizer(None)
    assert store.get("a/b", 0) == (1, {"k": "v"})


def _busy(db_file: Path) -> sqlite3.Error:
    holder = sqlite3.connect(db_file, isolation_level=None)
    other = sqlite3.connect(db_file, isolation_level=None, timeout=0)
    try:
        holder.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        return exc
    finally:
        holder.close()
        other.close()
    raise AssertionError("no SQLITE_BUSY")


def _read_only(db_file: Path) -> sqlite3.Error:
    db = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True, isolation_level=None)
    try:
        db.execute("CREATE TABLE nope (x)")
    except sqlite3.Error as exc:
        return exc
    finally:
        db.close()
    raise AssertionError("no SQLITE_READONLY")


def _cannot_open(db_file: Path) -> sqlite3.Error:
    try:
        sqlite3.connect(f"file:{db_file.parent / 'missing' / DB_NAME}?mode=rw", uri=True).execute("SELECT 1")
    except sqlite3.Error as exc:
        return exc
    raise AssertionError("no SQLITE_CANTOPEN")


def _corrupt(db_file: Path) -> sqlite3.Error:
    bad = db_file.parent / "not-a-database"
    bad.write_bytes(b"this is not an SQLite file at all" * 200)
    try:
        sqlite3.connect(bad).execute("SELECT * FROM sqlite_master").fetchall()
    except sqlite3.Error as exc:
        return exc
    raise AssertionError("no SQLITE_NOTADB")


@pytest.mark.parametrize(
    ("provoke", "unavailable"),
    [(_busy, True), (_read_only, True), (_cannot_open, True), (_corrupt, False)],
    ids=["busy", "read-only", "cannot-open", "not-a-database"],
)
def test_not_now_failures_are_unavailable_and_broken_ones_are_not(
    store: SecretStore, db_file: Path, provoke: Callable[[Path], sqlite3.Error], unavailable: bool
) -> None:
    error = sqlite_failure("what failed", provoke(db_file))
    assert isinstance(error, StorageError) and str(error) == "what failed"
    assert isinstance(error, DatabaseUnavailable) is unavailable


def test_a_busy_database_refuses_a_key_record_as_unavailable(data_dir: Path) -> None:
    """Installing a key record (bootstrap) on a database another process holds: 503, nothing installed."""
    records = NexusStore(data_dir)
    record, _ = seal_key(RootKey(bytearray(range(1, 33))), epoch=1, threshold=2, keeper_ids=(1, 2, 3))
    holder = sqlite3.connect(data_dir / DB_NAME, isolation_level=None)
    records._db.execute("PRAGMA busy_timeout=0")
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(DatabaseUnavailable, match="cannot save the key record"):
            records.install_key_record(record, replace=None)
        holder.execute("ROLLBACK")
        assert records.load_key_record() is None
        assert records.install_key_record(record, replace=None) == record
    finally:
        holder.close()
        records.close()
