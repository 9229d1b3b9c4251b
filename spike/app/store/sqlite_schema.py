"""Nexus's SQLite database: one file in the data dir, WAL, fsync on commit.

It holds what Nexus needs to recognise its root key (the key record: epoch,
threshold, keeper ids, key check value and shard commitments) and never the
key itself.  The schema is versioned with ``PRAGMA user_version`` and
migrated forward in one transaction at open.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import threading
from pathlib import Path

import msgspec

from spike.app.store.errors import DatabaseUnavailable, StorageError
from spike.protocol.record import KeyRecord

DB_NAME = "spike.db"

# Entry i moves the schema from version i to i + 1: its statements run in one
# transaction.  Released entries never change; new ones are appended.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE key_record (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            epoch INTEGER NOT NULL,
            record BLOB NOT NULL,
            updated_at TEXT NOT NULL
        )""",
    ),
    (
        """CREATE TABLE secret (
            path TEXT PRIMARY KEY,
            current_version INTEGER NOT NULL,
            oldest_version INTEGER NOT NULL,
            max_versions INTEGER NOT NULL,
            cas_required INTEGER NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            custom_metadata BLOB
        ) WITHOUT ROWID""",
        """CREATE TABLE secret_version (
            path TEXT NOT NULL,
            version INTEGER NOT NULL,
            sealed BLOB,
            created_at REAL NOT NULL,
            deleted_at REAL,
            key_epoch INTEGER NOT NULL,
            PRIMARY KEY (path, version)
        ) WITHOUT ROWID""",
    ),
    (
        """CREATE TABLE policy (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            sealed BLOB NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
    ),
    # Policies in RE2 and SPIKE's rules (policy dialect 2; old bodies are upgraded when first read with
    # the key, see policy_legacy): an older spike must not open this file and misread them.  The change
    # counter lets a failed policy reload tell whether the policies in force are still the stored ones.
    (
        "CREATE TABLE policy_version (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)",
        "INSERT INTO policy_version (id, version) VALUES (1, 0)",
    ),
)


def connect(path: Path) -> sqlite3.Connection:
    """A connection with the settings every user of the database relies on."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # an acknowledged write survives power loss
    db.execute("PRAGMA busy_timeout=5000")
    return db


# SQLite's primary result codes that mean "not now" rather than "broken": busy or locked, out of
# memory, read-only, I/O error, disk full, cannot open.  Nothing was written; once the cause is gone
# (space freed, the file writable again) the same write succeeds, with no restart.  They answer 503,
# as an unreachable PostgreSQL does; anything else (a corrupt file, a bug) stays a 500.
_UNAVAILABLE_CODES = frozenset({5, 6, 7, 8, 10, 13, 14})


def sqlite_failure(message: str, exc: sqlite3.Error) -> StorageError:
    """The `StorageError` for a failed SQLite call: `DatabaseUnavailable` when it is "not now"."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF in _UNAVAILABLE_CODES:
        return DatabaseUnavailable(message)
    return StorageError(message)


class NexusStore:
    def __init__(self, data_dir: Path) -> None:
        try:
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            path = data_dir / DB_NAME
            if not path.exists():
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            self._db = connect(path)
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot open the database in {data_dir}: {exc}") from None
        self.path = path
        self._install_lock = threading.Lock()

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > len(MIGRATIONS):
            raise StorageError(
                f"the database has schema version {version}, newer than this spike knows "
                f"({len(MIGRATIONS)}): upgrade spike"
            )
        if version == len(MIGRATIONS):
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for step in MIGRATIONS[version:]:
                for statement in step:
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def load_key_record(self) -> KeyRecord | None:
        try:
            row = self._db.execute("SELECT record FROM key_record WHERE id = 1").fetchone()
        except sqlite3.Error as exc:
            raise sqlite_failure(f"cannot read the key record: {exc}", exc) from None
        if row is None:
            return None
        try:
            return msgspec.json.decode(row[0], type=KeyRecord).validate()
        except (msgspec.DecodeError, ValueError) as exc:
            raise StorageError(f"the stored key record is damaged: {exc}") from None

    def save_key_record(self, record: KeyRecord) -> None:
        now = dt.datetime.now(dt.UTC).isoformat()
        try:
            self._db.execute(
                "INSERT INTO key_record (id, epoch, record, updated_at) VALUES (1, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET epoch = excluded.epoch, record = excluded.record, "
                "updated_at = excluded.updated_at",
                (record.epoch, msgspec.json.encode(record), now),
            )
        except sqlite3.Error as exc:
            raise sqlite_failure(f"cannot save the key record: {exc}", exc) from None

    def install_key_record(self, record: KeyRecord, *, replace: KeyRecord | None) -> KeyRecord:
        """Store `record` unless another record than `replace` is there; the record now in force."""
        with self._install_lock:  # one connection, callers on any thread
            return self._install(record, replace)

    def _install(self, record: KeyRecord, replace: KeyRecord | None) -> KeyRecord:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                current = self.load_key_record()
                if current is None or (replace is not None and current == replace):
                    self.save_key_record(record)
                    current = record
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise sqlite_failure(f"cannot save the key record: {exc}", exc) from None
        return current

    def close(self) -> None:
        self._db.close()
