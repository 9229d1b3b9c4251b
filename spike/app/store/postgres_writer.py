"""PostgreSQL's writer: one thread that group-commits every write of this instance, and learns the
outcome of a commit whose connection broke.

* **One transaction per batch** (group_commit.py hands out the batches): it
  first takes PostgreSQL advisory locks, shared on the key epoch, then
  exclusive on every secret path it touches (and on the policies, for a
  policy write), in one global order, so no two transactions deadlock.  A
  write to a path therefore sees every committed write to it from every
  instance (READ COMMITTED takes a new snapshot per statement, after the
  locks): check-and-set is exact across instances.  A refused write
  (`kv.KvError`) is refused before it writes anything, so the others in the
  transaction commit without it.
* **The data key**: the first data-key term still in force is read in the
  transaction, after the locks: a value sealed under a keyring that was
  replaced meanwhile (`spike bootstrap --force` through another instance) is
  refused (`StaleKey`, 503), never stored.  A root key rotation keeps the
  keyring, so writes go on through it.
* **Outages**: a connection lost before COMMIT is retried once on a fresh
  one (nothing was committed), then the batch fails with
  `DatabaseUnavailable`.  If it breaks during COMMIT, the transaction's id
  says afterwards whether it committed (`xact_status`, `pg_xact_status`):
  the answer is then exact, or `OutcomeUnknown` if the database stays away
  too long to ask.  Writes that arrive while it is away answer 503 at once,
  not after that wait.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from enum import Enum
from typing import Any, TypeVar

import msgspec
import psycopg

from spike.app.model import kv
from spike.app.store.errors import DatabaseUnavailable, OutcomeUnknown, StorageError
from spike.app.store.group_commit import MAX_BATCH, WriteOutcome, WriteQueue, settle
from spike.app.store.postgres_connections import UNAVAILABLE, Connections, one_line
from spike.app.store.postgres_sql import FIRST_TERM_AND_XID, LOCK_EPOCH, LOCK_EPOCH_SHARED, LOCK_KEYS, XACT_STATUS

log = logging.getLogger("spike.nexus.store")

T = TypeVar("T")
WriteOp = Callable[[psycopg.Connection[Any]], T]
DOUBT_WINDOW = 15.0  # seconds to learn the outcome of a commit whose connection broke
DOUBT_POLL = 0.2  # seconds between two questions


class StaleKey(DatabaseUnavailable):
    """The keyring was replaced (bootstrap --force through another instance) since this write was sealed."""


class XactStatus(Enum):
    """What PostgreSQL says of a transaction id (`pg_xact_status`), or UNKNOWN when it cannot be asked."""

    COMMITTED = "committed"
    ABORTED = "aborted"
    IN_PROGRESS = "in progress"
    UNKNOWN = "unknown"


def xact_status(connections: Connections, xid: str) -> XactStatus:
    """Ask the database, on a connection of its own, what became of transaction `xid`."""
    try:
        with connections.connect(autocommit=True) as conn:
            row = conn.execute(XACT_STATUS, (xid,)).fetchone()
    except psycopg.errors.InvalidParameterValue:
        # "transaction ID ... is in the future": the server came back without it, so its
        # commit record never became durable (a crash before the commit was flushed).
        return XactStatus.ABORTED
    except psycopg.Error:
        return XactStatus.UNKNOWN
    if row is None or row[0] is None:
        # NULL: too old for its status to be known, which cannot happen seconds after the commit.
        # Taken as aborted, as spike always has.
        return XactStatus.ABORTED
    return XactStatus(row[0])


class _Write(msgspec.Struct):
    keys: tuple[int, ...]  # advisory locks this write needs
    term: int | None  # the data-key term it sealed under (None: it seals nothing)
    op: WriteOp[Any]
    future: Future[Any]


class _InDoubt(Exception):
    def __init__(self, xid: str, cause: BaseException, outcomes: list[WriteOutcome]):
        super().__init__(str(cause))
        self.xid = xid
        self.cause = cause
        self.outcomes = outcomes


class GroupCommitWriter:
    """The writer thread of one instance: its own connection, one transaction per batch of writes."""

    def __init__(self, connections: Connections, *, on_stale_key: Callable[[], None]) -> None:
        self._connections = connections
        self._health = connections.health
        self._on_stale_key = on_stale_key  # told when a write finds a newer key record
        self._conn: psycopg.Connection[Any] | None = None
        self._queue: WriteQueue[_Write] = WriteQueue()
        self.batches = 0
        self.writes = 0
        self._thread = threading.Thread(target=self._write_loop, name="spike-pg-writer", daemon=True)
        self._thread.start()

    def submit(self, keys: tuple[int, ...], term: int | None, op: WriteOp[T]) -> Future[T]:
        """Queue `op`, to run under advisory locks `keys`, refused if data-key term `term` is no longer in force."""
        future: Future[T] = Future()
        self._queue.put(_Write(keys, term, op, future))
        return future

    def close(self) -> None:
        self._queue.stop()
        self._thread.join(timeout=10)
        self._drop_connection()

    def _write_loop(self) -> None:
        while (batch := self._queue.next_batch()) is not None:
            self._commit(batch)

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = self._connections.connect(autocommit=False)
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):  # already broken
                conn.close()

    def _rollback(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            conn.rollback()
        except psycopg.Error:
            self._drop_connection()

    def _commit(self, batch: list[_Write]) -> None:
        outcomes: list[WriteOutcome]
        for attempt in (1, 2):
            try:
                outcomes = self._transaction(self._connection(), batch)
            except _InDoubt as doubt:
                self._drop_connection()
                outcomes = self._resolve(doubt, batch)
                break
            except UNAVAILABLE as exc:
                # Before COMMIT: nothing was written.  A connection broken while idle (a server
                # restart) gets one more try on a fresh one.
                self._drop_connection()
                if attempt == 1 and not isinstance(exc, psycopg.errors.QueryCanceled):
                    continue
                _fail(batch, self._health.failed(exc))
                return
            except Exception as exc:
                self._rollback()
                log.error("write of %d operation(s) failed and was rolled back: %s", len(batch), one_line(exc))  # noqa: TRY400
                _fail(batch, StorageError(f"the database refused the write: {one_line(exc)}"))
                return
            else:
                self._connections.back()
                break
        self.batches += 1
        self.writes += len(batch)
        settle(outcomes)
        if any(isinstance(failure, StaleKey) for _, _, failure in outcomes):
            with contextlib.suppress(Exception):  # e.g. the event loop is gone at shutdown
                self._on_stale_key()

    def _transaction(self, conn: psycopg.Connection[Any], batch: list[_Write]) -> list[WriteOutcome]:
        keys = sorted({key for write in batch for key in write.keys})
        with conn.pipeline():  # one round trip; the server still runs them one after the other
            conn.execute(LOCK_EPOCH_SHARED, (LOCK_EPOCH,))
            conn.execute(LOCK_KEYS, (keys,))
            cursor = conn.execute(FIRST_TERM_AND_XID)
        row = cursor.fetchone()
        assert row is not None
        first_term, xid = row
        outcomes: list[WriteOutcome] = []
        for write in batch:
            if write.term is not None and first_term is not None and write.term < first_term:
                failure = StaleKey(
                    f"the keyring was replaced (data-key terms from {first_term} on) since this write was sealed"
                )
                outcomes.append((write.future, None, failure))
                continue
            try:
                result = write.op(conn)
            except kv.KvError as exc:  # refused before it wrote anything
                outcomes.append((write.future, None, exc))
            else:
                outcomes.append((write.future, result, None))
        try:
            conn.commit()
        except UNAVAILABLE as exc:
            raise _InDoubt(str(xid), exc, outcomes) from None
        return outcomes

    def _resolve(self, doubt: _InDoubt, batch: list[_Write]) -> list[WriteOutcome]:
        """The connection broke during COMMIT: ask the database (once it answers) whether it happened."""
        error = self._health.failed(doubt.cause)
        deadline = time.monotonic() + DOUBT_WINDOW
        while True:
            status = xact_status(self._connections, doubt.xid)
            if status is XactStatus.COMMITTED:
                log.warning("the connection broke during a commit of %d write(s); it did commit", len(batch))
                self._connections.back()
                return doubt.outcomes
            if status is XactStatus.ABORTED:  # nothing was written
                return [(w.future, None, error) for w in batch]
            if time.monotonic() > deadline:
                log.error("the outcome of a commit of %d write(s) is unknown: the database did not answer", len(batch))
                unknown = OutcomeUnknown("the connection broke during the commit and the database did not answer since")
                return [(w.future, None, unknown) for w in batch]
            if status is XactStatus.UNKNOWN:
                # The database is away: the writes queued behind this batch were not tried, so they are
                # refused now (503) rather than held until the outcome is learnt.
                _fail(self._queue.waiting(MAX_BATCH), error)
            time.sleep(DOUBT_POLL)


def _fail(writes: list[_Write], error: BaseException) -> None:
    for write in writes:
        write.future.set_exception(error)
