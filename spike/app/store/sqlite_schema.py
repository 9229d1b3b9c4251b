"""Nexus's SQLite database: one file in the data dir, WAL, fsync on commit.

It holds what Nexus needs to recognise its root key (the key record: epoch,
threshold, keeper ids, key check value and shard commitments) and never the
key itself.  The schema is versioned with ``PRAGMA user_version`` and
migrated forward in one transaction at open.
"""

from __future__ import annotations

import hmac
import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import msgspec

from spike.app.store.errors import DatabaseUnavailable, StorageError
from spike.app.store.key_state import KeyState, rendered_key_sql
from spike.protocol.record import KeyRecord

log = logging.getLogger("spike.nexus.store")

T = TypeVar("T")

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
    # Key rotation (docs/key-lifecycle.md): the epochs' high-water mark (a record stored before it is its
    # own mark), the keyring of data keys wrapped under the root key, and the pending rotation.
    (
        "ALTER TABLE key_record ADD COLUMN highest_epoch INTEGER NOT NULL DEFAULT 0",
        "UPDATE key_record SET highest_epoch = epoch",
        "ALTER TABLE key_record ADD COLUMN keyring BLOB",
        """CREATE TABLE pending_rotation (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            from_epoch INTEGER NOT NULL,
            epoch INTEGER NOT NULL,
            pending BLOB NOT NULL,
            keyring BLOB NOT NULL,
            created_at TEXT NOT NULL
        )""",
    ),  # The keyring of data keys (keyring.py).  A value names its data-key term, also in a column of its
    # row (0: the legacy term, which every value stored before this has); terms are never reused
    # (highest_term), terms below first_term went with a root key replaced by bootstrap --force, and a
    # database stored before this has its values sealed under its record's root key (legacy_epoch: the
    # legacy term is made from it at the first unlock).  rewrap_target: the term a re-wrap of stored
    # values to the newest term is under way to, so that it resumes after a restart.  Columns added
    # with a constant default: no row is rewritten.
    (
        "ALTER TABLE key_record ADD COLUMN highest_term INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE key_record ADD COLUMN first_term INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE key_record ADD COLUMN legacy_epoch INTEGER",
        "UPDATE key_record SET legacy_epoch = epoch",
        "ALTER TABLE key_record ADD COLUMN rewrap_target INTEGER",
        "ALTER TABLE secret_version ADD COLUMN key_term INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE secret ADD COLUMN custom_term INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE policy ADD COLUMN key_term INTEGER NOT NULL DEFAULT 0",
    ),
)


def memory_database() -> str:
    """The name of a new database held in this process's memory only (the memory backend, store/memory.py).

    SQLite's `memdb` VFS: every connection of this process that opens the name shares
    the one database, with SQLite's usual locking between them; no file is ever made,
    and the database is freed when its last connection closes (or the process dies).
    The random part keeps two stores of one process (tests) apart.
    """
    return f"file:/spike-memory-{os.urandom(16).hex()}?vfs=memdb"


def connect(path: Path | str) -> sqlite3.Connection:
    """A connection with the settings every user of the database relies on.

    `path` is the database file, or a `memory_database()` name (a `str`).
    """
    in_memory = isinstance(path, str)
    db = sqlite3.connect(path, uri=in_memory, isolation_level=None, check_same_thread=False)
    if not in_memory:  # memdb has no WAL and nothing to fsync
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


class NexusStore(KeyState[sqlite3.Connection]):
    """The SQLite file's key state (key_state.py), on a connection of its own."""

    _key_sql = rendered_key_sql(":%s")

    def __init__(self, data_dir: Path, *, memory: str | None = None) -> None:
        """The database in `data_dir`, or with `memory` (a `memory_database()` name) one in memory only."""
        path: Path | str
        try:
            if memory is None:
                data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                path = data_dir / DB_NAME
                if not path.exists():
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            else:
                path = memory
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
        if version:  # a new database's first schema is not news
            log.info("database schema upgraded from version %d to %d", version, len(MIGRATIONS))

    # ------------------------------------------------------------------ the key state (key_state.py)

    def _key_read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        with self._install_lock:  # one connection, callers on any thread
            try:
                return work(self._db)
            except sqlite3.Error as exc:
                raise sqlite_failure(f"cannot read the key record: {exc}", exc) from None

    def _key_change(self, work: Callable[[sqlite3.Connection], T]) -> T:
        with self._install_lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")  # excludes the secrets' writer too
                try:
                    result = work(self._db)
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise sqlite_failure(f"cannot save the key record: {exc}", exc) from None
            return result

    def save_key_record(self, record: KeyRecord) -> None:
        """Store `record` whatever is stored (tests and tools that prepare a data dir): as `bootstrap --force`
        would, except that a record of the same root key and epoch keeps the keyring."""
        sql = self._key_sql
        encoded = msgspec.json.encode(record)

        def save(conn: sqlite3.Connection) -> None:
            state = self._state(conn)
            current = state.record
            if current is None:
                conn.execute(sql.insert_record, {"epoch": record.epoch, "record": encoded})
            elif current.epoch == record.epoch and hmac.compare_digest(current.check, record.check):
                # The same root key (dealt again): its keyring still opens, and is kept.
                params = {"epoch": record.epoch, "record": encoded, "keyring": state.keyring}
                conn.execute(sql.commit_record, params)
            else:
                conn.execute(sql.force_record, {"epoch": record.epoch, "record": encoded})

        self._key_change(save)

    def close(self) -> None:
        self._db.close()
