"""Secret values read from PostgreSQL in batches: every GET waiting at one moment in one statement.

A GET on PostgreSQL used to cost a thread hand-off, a pool checkout and a
round trip of its own; measured on loopback, the checkout and the round trip
cost more CPU (in Nexus and in the database) than the rest of the request.
Here a few reader threads share one queue: a thread takes every read waiting
(up to `MAX_READS`), asks for all of them in one statement on one pooled
connection, and answers each with its row.  Under load the cost of a round
trip is shared by the reads of a batch; alone, a read is one statement as
before.

What each read sees: the statement is sent after every read of its batch was
queued, so its snapshot holds every write acknowledged before any of them
arrived (a write is acknowledged after its commit): the same read-after-write
promise as one statement per read.  One statement is one snapshot, so the
reads of a batch also agree with each other.

A failure of the statement (the database away, a timeout) fails every read of
its batch, with the error one read alone would have had (`Connections.query`:
one retry on a fresh connection, then 503).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from spike.app.store.group_commit import WriteQueue
from spike.app.store.postgres_connections import Connections
from spike.app.store.postgres_sql import SELECT_VALUES
from spike.app.store.sql_store import ValueRow

MAX_READS = 64  # reads answered by one statement at most

# path, version asked for, what makes the answer from the row (or None), the caller's future
Read = tuple[str, int, Callable[[ValueRow | None], Any], Future[Any]]


class ValueReads:
    """Reader threads answering value reads from a shared queue, each batch with one statement."""

    def __init__(self, db: Connections, *, threads: int) -> None:
        self._db = db
        self._queue: WriteQueue[Read] = WriteQueue()
        self.batches = 0  # statements sent (each answering one batch); for tests and curious operators
        self._threads = [
            threading.Thread(target=self._loop, name=f"spike-pg-get-{i}", daemon=True) for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, path: str, version: int, finish: Callable[[ValueRow | None], Any]) -> Future[Any]:
        """A future of `finish(row)`, where row is the value's row for (path, version), or None."""
        future: Future[Any] = Future()
        self._queue.put((path, version, finish, future))
        return future

    def _loop(self) -> None:
        while (batch := self._queue.next_batch(MAX_READS)) is not None:
            self._answer(batch)

    def _answer(self, batch: list[Read]) -> None:
        self.batches += 1
        paths = [path for path, _, _, _ in batch]
        versions = [version for _, version, _, _ in batch]
        try:
            rows = self._db.query(lambda c: c.execute(SELECT_VALUES, (paths, versions)).fetchall())
        except Exception as exc:  # StorageError or DatabaseUnavailable: each read answers it
            for _, _, _, future in batch:
                future.set_exception(exc)
            return
        found: dict[int, ValueRow] = {index: tuple(rest) for index, *rest in rows}
        # The connection is back in the pool: opening a value may read the keyring (another instance's
        # new data key) through it.
        for index, (_, _, finish, future) in enumerate(batch, start=1):
            try:
                result = finish(found.get(index))
            except Exception as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

    def close(self) -> None:
        for _ in self._threads:
            self._queue.stop()
        for thread in self._threads:
            thread.join(timeout=10)
