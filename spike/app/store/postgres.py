"""Nexus's data in PostgreSQL: several Nexus instances on one database.

The same tables as SQLite, the same statements and operations (`SqlStore`,
sql_store.py), sealed the same way and changed by the same KV v2 rules
(model/kv.py); what differs is how writers on different machines stay exact
and what a network does to a database:

* **Writes** go to one writer thread per instance (postgres_writer.py), which
  commits every write waiting at that moment in one transaction, under
  advisory locks on the key epoch and on each path, refusing a write sealed
  under a key replaced meanwhile, and learning the outcome of a commit whose
  connection broke.
* **Reads** run on a few threads with connections from a psycopg pool
  (postgres_connections.py), each read one statement (one snapshot); the API
  awaits them as futures, so a slow network never stalls the event loop.
  Every statement has a timeout; an outage answers 503 and is logged once.
* **The key state** (key_state.py: the record, the epochs' high-water mark,
  a pending rotation): every change takes the epoch lock exclusively
  (waiting for the write transactions under way, which hold it shared) and
  is a compare-and-set, so two instances bootstrapped or rotating at once
  agree on one outcome.
* **The schema** (postgres_schema.py) is migrated at start, one instance
  after the other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg

from spike.app.model import kv
from spike.app.store.errors import DatabaseUnavailable, StorageError
from spike.app.store.key_state import rendered_key_sql
from spike.app.store.postgres_connections import UNAVAILABLE, Connections, one_line
from spike.app.store.postgres_schema import migrate
from spike.app.store.postgres_sql import (
    LOCK,
    LOCK_EPOCH,
    LOCK_POLICIES,
    LOCK_REWRAP,
    TRY_LOCK,
    PostgresDialect,
    path_lock,
)
from spike.app.store.postgres_writer import GroupCommitWriter, WriteOp
from spike.app.store.sql_store import SqlStore

T = TypeVar("T")
READ_THREADS = 4
STATEMENT_TIMEOUT_MS = 5000

Conn = psycopg.Connection[Any]


class PostgresBackend(SqlStore[Conn]):
    """The storage `Backend` on a PostgreSQL database shared by any number of Nexus instances."""

    shared = True
    inline_reads = False
    _key_sql = rendered_key_sql("%%(%s)s")

    def __init__(
        self,
        url: str,
        *,
        default_max_versions: int = kv.DEFAULT_MAX_VERSIONS,
        read_threads: int = READ_THREADS,
        statement_timeout_ms: int = STATEMENT_TIMEOUT_MS,
    ) -> None:
        super().__init__(PostgresDialect(), default_max_versions=default_max_versions)
        self._url = url
        self._db = Connections(url, statement_timeout_ms=statement_timeout_ms, pool_size=read_threads)
        self.description = self._db.description
        try:
            with self._db.connect(autocommit=True) as conn:
                migrate(conn)
        except UNAVAILABLE as exc:
            raise DatabaseUnavailable(f"cannot reach {self.description}: {one_line(exc)}") from None
        except psycopg.Error as exc:
            raise StorageError(f"cannot use {self.description}: {one_line(exc)}") from None
        self._db.open_pool()
        self._readers = ThreadPoolExecutor(read_threads, thread_name_prefix="spike-pg-read")
        self.on_stale_key: Callable[[], None] = lambda: None  # told when a write finds a newer key record
        # Late bound: the server sets `on_stale_key` after the backend is open.
        self._writer = GroupCommitWriter(self._db, on_stale_key=lambda: self.on_stale_key())  # noqa: PLW0108

    @property
    def batches(self) -> int:
        return self._writer.batches

    @property
    def writes(self) -> int:
        return self._writer.writes

    # ------------------------------------------------------------------ reads and writes

    def read(self, call: Callable[[], T]) -> Future[T]:
        return self._readers.submit(call)

    def _read(self, work: Callable[[Conn], T], what: str) -> T:
        return self._db.query(work)

    def _submit(self, op: WriteOp[T], *, path: str | None, term: int | None) -> Future[T]:
        return self._writer.submit((LOCK_POLICIES if path is None else path_lock(path),), term, op)

    # ------------------------------------------------------------------ the key state (key_state.py)

    def _key_read(self, work: Callable[[Conn], T]) -> T:
        return self._db.query(work)

    def _key_change(self, work: Callable[[Conn], T]) -> T:
        def change(conn: Conn) -> T:
            with conn.transaction():
                # Exclusive: waits for write transactions under way, which hold it shared.
                conn.execute(LOCK, (LOCK_EPOCH,))
                return work(conn)

        return self._db.query(change)

    @contextlib.contextmanager
    def _rewrap_claim(self) -> Iterator[bool]:
        """One instance re-wraps at a time: the one holding a session lock, on a connection of its own for as
        long as it runs (if it stops, its connection closes and another instance takes over)."""
        try:
            conn = self._db.connect(autocommit=True)
        except UNAVAILABLE as exc:
            raise self._db.health.failed(exc) from None
        try:
            row = conn.execute(TRY_LOCK, (LOCK_REWRAP,)).fetchone()
            yield bool(row and row[0])
        finally:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def close(self) -> None:
        self._stop_rewrap()
        self._writer.close()
        self._readers.shutdown(wait=True)
        self._db.close()
