"""Connections to PostgreSQL and what an outage does to them.

Reads take a connection from a psycopg pool; the writer has one of its own
(postgres_writer.py).  Every statement has a timeout.  A lost connection is
retried once on a fresh one, then the call fails with `DatabaseUnavailable`
(503).  The outage is logged once when it starts and once when it ends
(`Health`); while it lasts, each read tries a connection of its own, and the
first that works ends it with a fresh pool.

The pool would log every failed reconnection attempt.  An outage is logged
here, once, so the `psycopg.pool` logger is set to CRITICAL when the first
pool opens (`quiet_pool_log`), not when this module is imported, and only if
nobody gave that logger a level of its own.  A level, not a filter: the pool
logs three INFO records per borrowed connection, which a filter would have
built and thrown away on every read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolClosed

from spike.app.config import mask_url
from spike.app.store.errors import DatabaseUnavailable, StorageError

log = logging.getLogger("spike.nexus.store")

T = TypeVar("T")
CONNECT_TIMEOUT = 3  # seconds, per attempt (libpq takes whole seconds)
POOL_WAIT = 3.0  # seconds a read waits for a pooled connection

UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or exc.__class__.__name__


def quiet_pool_log() -> None:
    """The pool's own records below CRITICAL go nowhere, unless that logger was given a level already."""
    pool_log = logging.getLogger("psycopg.pool")
    if pool_log.level == logging.NOTSET:
        pool_log.setLevel(logging.CRITICAL)


class Health:
    """One log line when the database goes away, one when it is back: never one per request."""

    def __init__(self, where: str) -> None:
        self._where = where
        self._down_since: float | None = None
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def failed(self, exc: BaseException) -> DatabaseUnavailable:
        with self._lock:
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.error(
                    "PostgreSQL at %s is unavailable (%s): data routes answer 503 until it is back",
                    self._where,
                    one_line(exc),
                    extra={"event": "database_down"},
                )
        return DatabaseUnavailable(f"PostgreSQL is unavailable: {one_line(exc)}")

    def ok(self) -> None:
        if self._down_since is None:  # the common case, without the lock
            return
        with self._lock:
            if self._down_since is not None:
                log.info(
                    "PostgreSQL at %s is available again after %.1fs",
                    self._where,
                    time.monotonic() - self._down_since,
                    extra={"event": "database_up"},
                )
                self._down_since = None


class Connections:
    """How this instance reaches its database: new connections, pooled reads, outage bookkeeping."""

    def __init__(self, url: str, *, statement_timeout_ms: int, pool_size: int) -> None:
        self.url = url
        self.description = f"PostgreSQL at {mask_url(url)}"
        self.health = Health(mask_url(url))
        try:
            options = conninfo_to_dict(url).get("options") or ""
        except psycopg.ProgrammingError as exc:
            raise StorageError(f"the database URL {mask_url(url)} is not valid: {one_line(exc)}") from None
        self._connect_kwargs: dict[str, Any] = {
            "connect_timeout": CONNECT_TIMEOUT,
            "application_name": "spike-nexus",
            # Added to the URL's own options (a search_path, for example), never replacing them.
            "options": f"{options} -c statement_timeout={statement_timeout_ms}".strip(),
        }
        self._pool_size = pool_size
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None
        self._pool_lock = threading.Lock()

    def connect(self, *, autocommit: bool, application_name: str = "spike-nexus") -> psycopg.Connection[Any]:
        kwargs = self._connect_kwargs | {"application_name": application_name}
        return psycopg.connect(self.url, autocommit=autocommit, **kwargs)

    def open_pool(self) -> None:
        quiet_pool_log()
        self._pool = self._new_pool()

    def _new_pool(self) -> ConnectionPool[psycopg.Connection[Any]]:
        pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            self.url,
            min_size=self._pool_size,
            max_size=self._pool_size,
            kwargs={"autocommit": True, **self._connect_kwargs},
            timeout=POOL_WAIT,
            reconnect_timeout=24 * 3600.0,  # keeps trying; after an outage `query` replaces it anyway
            name="spike-nexus",
            open=False,
        )
        pool.open(wait=False)
        return pool

    def query(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run `work` on a pooled connection; a broken connection is replaced and the work tried once more."""
        assert self._pool is not None, "open_pool first"
        if self.health.down:
            return self._query_while_down(work)
        retried = False
        while True:
            pool = self._pool
            assert pool is not None
            try:
                with pool.connection() as conn:
                    return work(conn)
            except PoolClosed as exc:
                # Replaced (an outage ended) while this read waited for it, or between its two tries: not news.
                if pool is not self._pool:
                    continue
                raise self.health.failed(exc) from None
            except UNAVAILABLE as exc:
                if not retried and not isinstance(exc, psycopg.errors.QueryCanceled):
                    retried = True
                    pool.check()  # after a server restart every idle connection is stale: drop them all
                    continue
                raise self.health.failed(exc) from None
            except psycopg.Error as exc:
                raise StorageError(f"the database refused a read: {one_line(exc)}") from None

    def _query_while_down(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """During an outage every query tries a connection of its own: it fails at once while the database
        is away, and the first one to succeed ends the outage with a fresh pool (the old one backs off)."""
        try:
            with self.connect(autocommit=True) as conn:
                result = work(conn)
        except UNAVAILABLE as exc:
            raise self.health.failed(exc) from None
        except psycopg.Error as exc:
            raise StorageError(f"the database refused a read: {one_line(exc)}") from None
        self.back()
        return result

    def back(self) -> None:
        """The database answered: if that ends an outage, start over with a fresh pool."""
        if not self.health.down:
            return
        with self._pool_lock:
            if self.health.down:
                old, self._pool = self._pool, self._new_pool()
                if old is not None:
                    threading.Thread(target=old.close, name="spike-pg-old-pool", daemon=True).start()
                self.health.ok()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
