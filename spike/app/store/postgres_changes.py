"""The changes other instances commit, as PostgreSQL announces them: what keeps the read cache honest.

A trigger on the secret tables (postgres_schema.py, schema 5) sends the
path of every changed row on `CHANNEL`, in the transaction that changes it,
whoever writes it: this spike, an older one, a person with psql.  One thread
per Nexus instance listens on a connection of its own and drops the paths
from the read cache (read_cache.py) as they come.

It also sends barriers: a notification to itself, on a channel of its own
connection (`SELECT pg_notify(...)`, its own transaction).  PostgreSQL queues
notifications in commit order and a listener reads them in queue order, so
when the barrier comes back, the notifications of every transaction committed
before the barrier's transaction have come ahead of it: every write
acknowledged before the barrier was sent has been dropped here, and the cache
may serve reads for `staleness` seconds from the barrier's sending.  This
holds whatever sits between Nexus and PostgreSQL: a pooler that does not
deliver notifications (PgBouncer in transaction mode) never brings a barrier
back, and the cache then serves nothing (said once in the log).  While reads
come, a barrier goes every `staleness / 2`; while none come, one a second (a
listener that never reads lets the server's notification queue grow).  A
broken connection makes the cache serve nothing until a new one listens, and
everything kept before is dropped then: notifications sent meanwhile are lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
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
BARRIER_LOST = 5.0  # seconds after which a barrier not back is given up (and said once) and another one sent


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
        self._lost_said = False  # a barrier that never came back, logged once
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
        # A barrier's transaction changes nothing worth a flush to disk: its commit need not wait for one.
        conn.execute("SET synchronous_commit = off")
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        barrier_channel = f"spike_barrier_{row[0] if row else 0}"  # this session's own: no other sees it
        conn.execute(f"LISTEN {CHANNEL}")
        conn.execute(f"LISTEN {barrier_channel}")
        # Whatever changed while nobody listened was announced to nobody.
        self._cache.drop_all()
        self.connections += 1
        if self._broken:
            self._broken = False
            log.info("the read cache is on again", extra={"event": "read_cache_on"})
        asked = -1
        due = self._clock()
        sent = 0
        pending: tuple[str, float] | None = None  # the barrier sent and not yet back: its payload, when sent
        while not self._stop.is_set():
            lookups = self._cache.hits + self._cache.misses
            if lookups != asked:  # reads are coming: barriers often enough for the cache to serve them
                asked = lookups
                due = min(due, self.last_answered_sent + self._cache.staleness / 2)
            now = self._clock()
            if pending is not None and now - pending[1] > BARRIER_LOST:
                self._say_lost()
                pending = None
            if pending is None and now >= due:
                sent += 1
                pending = (str(sent), now)
                conn.execute("SELECT pg_notify(%s, %s)", (barrier_channel, pending[0]))
                due = now + IDLE_BARRIER
            wait = SLICE if pending is not None else min(due - self._clock(), SLICE)
            # stop_after=1: back after the first packet of notifications, every one of them handed over.
            for note in conn.notifies(timeout=max(wait, 0.0), stop_after=1):
                if note.channel != barrier_channel:
                    self._apply(note)
                elif pending is not None and note.payload == pending[0]:
                    # Everything committed before the barrier's own commit came ahead of it.
                    self._cache.barrier(pending[1])
                    self.barriers += 1
                    self.last_answered_sent = pending[1]
                    pending = None

    def _apply(self, note: psycopg.Notify) -> None:
        if note.payload == EVERYTHING:
            self._cache.drop_all()
        else:
            self._cache.drop([note.payload])

    def _say_lost(self) -> None:
        if not self._lost_said:
            self._lost_said = True
            log.warning(
                "the read cache serves nothing: the database did not deliver this instance's own notification "
                "within %gs (a connection pooler in transaction mode drops them: reach PostgreSQL directly, or "
                "set --read-cache-staleness 0)",
                BARRIER_LOST,
                extra={"event": "read_cache_barrier_lost"},
            )
