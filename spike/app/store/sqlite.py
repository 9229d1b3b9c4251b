"""Secrets and policies in SQLite: point reads on the caller's thread, writes group-committed.

Reads use their own connection and touch only the rows they name (primary
key lookups, or a range of the path index for listing), so they stay fast
with any number of secrets.  Writes go to one writer thread that takes every
write waiting at that moment, runs each in its own savepoint (one failing
write does not undo the others), and commits them with a single fsync: the
caller's future resolves only after that commit, so an acknowledged write
is durable.  Serialising writes in one thread also makes check-and-set
exact: there is no lost update between two writers.

The operations themselves are `SqlStore`'s (sql_store.py), shared with
PostgreSQL; this module runs them.  `SqliteBackend` is the whole storage
`Backend` (backend.py) on one SQLite file; the key state (record, rotation,
keyring: key_state.py) is on a connection of its own (`NexusStore`).  One
Nexus process uses the file; several instances need PostgreSQL (postgres.py).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from spike.app.model import kv
from spike.app.store.errors import DatabaseUnavailable, StorageError
from spike.app.store.group_commit import WriteOutcome, WriteQueue, resolved, settle
from spike.app.store.sql_store import SqlStore
from spike.app.store.sqlite_schema import DB_NAME, NexusStore, connect, sqlite_failure
from spike.app.store.sqlite_sql import SqliteDialect

log = logging.getLogger("spike.nexus.store")

T = TypeVar("T")
WriteOp = Callable[[sqlite3.Connection], T]


class SecretStore(SqlStore[sqlite3.Connection]):
    inline_reads = True  # a local file: reads are short enough for the event loop's thread
    _key_sql = NexusStore._key_sql

    def __init__(self, data_dir: Path, *, default_max_versions: int = kv.DEFAULT_MAX_VERSIONS) -> None:
        super().__init__(SqliteDialect(), default_max_versions=default_max_versions)
        self._path = data_dir / DB_NAME
        # The key state (record, rotation, keyring) on a connection of its own, whose transactions
        # exclude the writer's; it opens (creating and migrating) the file first.
        self._keys = NexusStore(data_dir)
        try:
            self._reader = connect(self._path)
        except sqlite3.Error as exc:
            self._keys.close()
            raise StorageError(f"cannot open the database in {data_dir}: {exc}") from None
        self._queue: WriteQueue[tuple[WriteOp[Any], Future[Any]]] = WriteQueue()
        self._writer = threading.Thread(target=self._write_loop, name="spike-writer", daemon=True)
        self._writer_db = connect(self._path)
        self.batches = 0
        self.writes = 0
        self.refused = 0  # writes refused by the database since the last commit that worked
        self._writer.start()

    @property
    def reader(self) -> sqlite3.Connection:
        """The read connection (for the event loop's thread only), shared with the policy store."""
        return self._reader

    # ------------------------------------------------------------------ reads

    def read(self, call: Callable[[], T]) -> Future[T]:
        return resolved(call)

    def _read(self, work: Callable[[sqlite3.Connection], T], what: str) -> T:
        try:
            return work(self._reader)
        except sqlite3.Error as exc:  # says what it was reading; 503 when it is "not now"
            raise sqlite_failure(f"cannot read {what}: {exc}", exc) from None

    def _key_read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return self._keys._key_read(work)

    def _key_change(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return self._keys._key_change(work)

    # ------------------------------------------------------------------ writes

    def submit(self, op: WriteOp[T]) -> Future[T]:
        future: Future[T] = Future()
        self._queue.put((op, future))
        return future

    def _submit(self, op: WriteOp[T], *, path: str | None, term: int | None) -> Future[T]:
        # One process writes the file: writes need no lock, and the key cannot change under them.
        return self.submit(op)

    # ------------------------------------------------------------------ writer thread

    def _write_loop(self) -> None:
        while (batch := self._queue.next_batch()) is not None:
            self._commit(self._writer_db, batch)

    def _commit(self, db: sqlite3.Connection, batch: list[tuple[WriteOp[Any], Future[Any]]]) -> None:
        try:
            outcomes = self._transaction(db, batch)
        except sqlite3.Error as exc:
            self._refuse(db, batch, exc)
            return
        if self.refused:
            log.warning("writes to %s work again (%d refused meanwhile)", self._path, self.refused)
            self.refused = 0
        self.batches += 1
        self.writes += len(batch)
        settle(outcomes)

    def _transaction(self, db: sqlite3.Connection, batch: list[tuple[WriteOp[Any], Future[Any]]]) -> list[WriteOutcome]:
        outcomes: list[WriteOutcome] = []
        db.execute("BEGIN IMMEDIATE")
        for op, future in batch:
            db.execute("SAVEPOINT op")
            try:
                result = op(db)
            except Exception as exc:  # the op's own failure: undo just this op
                db.execute("ROLLBACK TO op")
                db.execute("RELEASE op")
                outcomes.append((future, None, exc))
            else:
                db.execute("RELEASE op")
                outcomes.append((future, result, None))
        db.execute("COMMIT")
        return outcomes

    def _refuse(
        self, db: sqlite3.Connection, batch: list[tuple[WriteOp[Any], Future[Any]]], exc: sqlite3.Error
    ) -> None:
        """The transaction failed: roll it back and fail every write of the batch (nothing was written)."""
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error as again:  # SQLite rolls back by itself when it cannot; never end the thread
                log.debug("rollback after a failed write: %s", again)
        error = sqlite_failure(f"the database refused the write: {exc}", exc)
        if not isinstance(error, DatabaseUnavailable):
            log.error("write of %d operation(s) failed and was rolled back: %s", len(batch), exc)
        elif not self.refused:
            log.error(
                "writes to %s fail (%s): refused with 503 until they work again; reads go on",
                self._path,
                exc,
            )
        self.refused += len(batch)
        for _, future in batch:
            future.set_exception(error)

    def close(self) -> None:
        self._stop_rewrap()
        self._queue.stop()
        self._writer.join(timeout=10)
        self._reader.close()
        self._writer_db.close()
        self._keys.close()


class SqliteBackend(SecretStore):
    """The storage `Backend` on one SQLite file in the data dir: for one Nexus process."""

    shared = False

    def __init__(self, data_dir: Path, *, default_max_versions: int = kv.DEFAULT_MAX_VERSIONS) -> None:
        try:
            super().__init__(data_dir, default_max_versions=default_max_versions)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the database in {data_dir}: {exc}") from None
        self.description = f"the data dir {data_dir}"
