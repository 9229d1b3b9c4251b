"""The changes other instances commit, as PostgreSQL announces them: what keeps the read cache honest.

A trigger on the secret tables (postgres_schema.py, schema 5) sends the
path of every changed row on `CHANNEL`, in the transaction that changes it,
whoever writes it: this spike, an older one, a person with psql.  One thread
per Nexus instance listens on a connection of its own and drops the paths
from the read cache (read_cache.py) as they come.

It also sends barriers: `SELECT 1` on that connection.  PostgreSQL sends a
listener the notifications of every transaction committed before a query
reached it ahead of that query's answer, so when the answer is in, every
write acknowledged before the barrier was sent has been dropped here: the
cache may serve reads for `staleness` seconds from the barrier's sending.
While reads come, a barrier goes every `staleness / 2`; while none come, one
a second (a listener that never reads lets the server's notification queue
grow).  A broken connection makes the cache serve nothing until a new one
listens, and everything kept before is dropped then: notifications sent
meanwhile are lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import psycopg

from spike.app.store.postgres_connections import one_line
from spike.app.store.read_cache import ReadCache

log = logging.getLogger("spike.nexus.store")

CHANNEL = "spike_secret_changes"
CHANGES_APPLICATION = "spike-nexus-changes"  # the listener's application_name, as pg_stat_activity shows it
EVERYTHING = ""  # the payload of a change that names no single path (TRUNCATE, a path too long to send)
IDLE_BARRIER = 1.0  # seconds between barriers while no read asks the cache
SLICE = 0.1  # seconds the thread waits at most before it looks at the reads (and at `close`) again
RETRY = 1.0  # seconds between attempts to listen again after the connection broke


class ChangeListener:
    """A thread that applies the database's change notifications to `cache` and sends its barriers."""

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection[Any]],
        cache: ReadCache,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connect = connect
        self._cache = cache
        self._clock = clock
        self._stop = threading.Event()
        self._broken = False  # logged once per outage
        self.barriers = 0  # barriers answered
        self.connections = 0  # times it started listening
        self.last_answered_sent = -float("inf")  # when the newest answered barrier was sent
        self._thread = threading.Thread(target=self._run, name="spike-pg-changes", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * SLICE + 1.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._connect() as conn:
                    self._listen(conn)
            except Exception as exc:  # psycopg's errors, or a bug here: either way the cache must stop answering
                self._cache.unsure()
                if not self._broken and not self._stop.is_set():
                    self._broken = True
                    log.warning(
                        "the read cache is off until the database answers again: %s",
                        one_line(exc),
                        extra={"event": "read_cache_off"},
                    )
            self._stop.wait(RETRY)

    def _listen(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(f"LISTEN {CHANNEL}")
        # Whatever changed while nobody listened was announced to nobody.
        self._cache.drop_all()
        self.connections += 1
        if self._broken:
            self._broken = False
            log.info("the read cache is on again", extra={"event": "read_cache_on"})
        asked = -1
        due = self._clock()
        while not self._stop.is_set():
            lookups = self._cache.hits + self._cache.misses
            if lookups != asked:  # reads are coming: barriers often enough for the cache to serve them
                asked = lookups
                due = min(due, self.last_answered_sent + self._cache.staleness / 2)
            if self._clock() >= due:
                sent = self._clock()
                conn.execute("SELECT 1")
                self._apply(conn.notifies(timeout=0))  # those that came ahead of the answer
                self._cache.barrier(sent)
                self.barriers += 1
                self.last_answered_sent = sent
                due = sent + IDLE_BARRIER
                continue
            # Until the next barrier, drop paths as their notifications come.
            self._apply(conn.notifies(timeout=min(due - self._clock(), SLICE)))

    def _apply(self, notes: Iterable[psycopg.Notify]) -> None:
        cache = self._cache
        for note in notes:
            if note.payload == EVERYTHING:
                cache.drop_all()
            else:
                cache.drop([note.payload])
