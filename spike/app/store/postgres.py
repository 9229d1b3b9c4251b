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
* **A read cache** (read_cache.py) answers a secret's GET on the event loop
  from the sealed row a recent read found, within a staleness bound kept by
  the database's change notifications and barriers (postgres_changes.py);
  writes through this instance drop their paths before they are acknowledged.
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
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg

from spike.app.config import READ_CACHE_STALENESS
from spike.app.model import kv
from spike.app.store.errors import DatabaseUnavailable, StorageError
from spike.app.store.key_state import rendered_key_sql
from spike.app.store.keyring import LEGACY_TERM, NewerTerm
from spike.app.store.postgres_changes import CHANGES_APPLICATION, ChangeListener
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
from spike.app.store.read_cache import MISS, ReadCache
from spike.app.store.sealing import DataKeyGone, TamperedData
from spike.app.store.sql_store import SqlStore

T = TypeVar("T")
READ_THREADS = 4
STATEMENT_TIMEOUT_MS = 5000
READ_CACHE_BYTES = 64 << 20  # sealed bytes the read cache keeps at most, least recently read dropped first

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
        read_cache_staleness: float = READ_CACHE_STALENESS,
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
        self.read_cache: ReadCache | None = None
        self._changes: ChangeListener | None = None
        if read_cache_staleness > 0:
            self.read_cache = ReadCache(
                staleness=read_cache_staleness, max_bytes=READ_CACHE_BYTES, clock=time.monotonic
            )
            self._changes = ChangeListener(
                lambda: self._db.connect(autocommit=True, application_name=CHANGES_APPLICATION), self.read_cache
            )
            self._changes.start()

    @property
    def batches(self) -> int:
        return self._writer.batches

    @property
    def writes(self) -> int:
        return self._writer.writes

    # ------------------------------------------------------------------ reads and writes

    def read(self, call: Callable[[], T]) -> Future[T]:
        return self._readers.submit(call)

    def _value_row(self, path: str, version: int) -> Any:
        # Always the database (`get` stays exact for every caller); what it finds is kept for `cached_get`.
        cache = self.read_cache
        if cache is None:
            return super()._value_row(path, version)
        ticket = cache.begin_fill()
        try:
            row = super()._value_row(path, version)
        except BaseException:
            cache.end_fill(ticket)
            raise
        cache.end_fill(ticket, (path, version, row))
        return row

    def cached_get(self, path: str, version: int) -> tuple[int, dict[str, str]] | None:
        cache, keyring = self.read_cache, self._keyring
        if cache is None or keyring is None:  # no cache, or locked: the database read says what to answer
            return None
        row = cache.lookup(path, version)
        if row is MISS:
            return None

        def opener(sealed: bytes, aad: bytes, term: int, what: str, epoch: int) -> bytes:
            if term == LEGACY_TERM and keyring.legacy_epoch not in (None, epoch):
                raise DataKeyGone(what)
            return keyring.open(sealed, aad, term)

        try:
            return self._value(path, row, opener)
        except (NewerTerm, DataKeyGone, TamperedData):
            return None  # a term not loaded yet, a key gone, a bad blob: the database read (`get`) tells

    def _read(self, work: Callable[[Conn], T], what: str) -> T:
        return self._db.query(work)

    def _submit(self, op: WriteOp[T], *, path: str | None, term: int | None) -> Future[T]:
        future = self._writer.submit((LOCK_POLICIES if path is None else path_lock(path),), term, op)
        cache = self.read_cache
        if cache is not None and path is not None:
            # Registered before the caller's callbacks, so the path is dropped before the write is acknowledged
            # (whatever the outcome: a write whose commit could not be learnt may have landed).
            future.add_done_callback(lambda _: cache.drop([path]))
        return future

    def _submit_import(self, op: WriteOp[None], paths: list[str], term: int) -> Future[None]:
        # Every path imported, and the policies, locked as their own writes lock them.
        future = self._writer.submit((LOCK_POLICIES, *sorted({path_lock(p) for p in paths})), term, op)
        cache = self.read_cache
        if cache is not None:
            future.add_done_callback(lambda _: cache.drop(paths))
        return future

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
        if self._changes is not None:
            self._changes.close()
        self._stop_rewrap()
        self._writer.close()
        self._readers.shutdown(wait=True)
        self._db.close()
