"""PostgreSQL's group-commit writer on its own (spike/app/store/postgres_writer.py), on a real server.

The writer is driven directly with operations of the tests' own: what goes in one transaction, what a
refused or failing operation does to the others, the key epoch check, and `xact_status`, which tells
the outcome of a commit whose connection broke.  A crash in the middle of a COMMIT is in
test_postgres_backend.py (the writer behind a whole backend).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pg_server
import psycopg
import pytest
from store_helpers import WAIT

from spike.app.model import kv
from spike.app.store.errors import StorageError
from spike.app.store.postgres_connections import Connections
from spike.app.store.postgres_schema import migrate
from spike.app.store.postgres_writer import GroupCommitWriter, StaleKey, XactStatus, xact_status

Conn = psycopg.Connection[Any]


@pytest.fixture
def connections() -> Connections:
    url = pg_server.server().database()
    db = Connections(url, statement_timeout_ms=5000, pool_size=1)
    with db.connect(autocommit=True) as conn:
        migrate(conn)
        conn.execute("CREATE TABLE note (k text PRIMARY KEY, v text)")
    return db


@pytest.fixture
def writer(connections: Connections) -> Iterator[tuple[GroupCommitWriter, list[str]]]:
    told: list[str] = []
    writer = GroupCommitWriter(connections, on_stale_key=lambda: told.append("stale"))
    try:
        yield writer, told
    finally:
        writer.close()


def note(key: str, value: str = "v") -> Any:
    def op(conn: Conn) -> str:
        conn.execute("INSERT INTO note (k, v) VALUES (%s, %s)", (key, value))
        return key

    return op


def notes(connections: Connections) -> dict[str, str]:
    with connections.connect(autocommit=True) as conn:
        return dict(conn.execute("SELECT k, v FROM note").fetchall())


@contextlib.contextmanager
def writer_held(w: GroupCommitWriter) -> Iterator[Future[None]]:
    """The writer busy with a write of its own until the block ends: what is submitted inside queues up."""
    busy, release = threading.Event(), threading.Event()

    def hold(conn: Conn) -> None:
        busy.set()
        release.wait(WAIT)

    held = w.submit((1,), None, hold)
    assert busy.wait(WAIT)
    try:
        yield held
    finally:
        release.set()


def outcome(future: Future[Any]) -> Any:
    try:
        return future.result(WAIT)
    except Exception as exc:
        return exc


def test_writes_waiting_together_go_in_one_transaction(writer: tuple[GroupCommitWriter, list[str]]) -> None:
    w, _ = writer
    txids: list[int] = []

    def seen(key: str) -> Any:
        def op(conn: Conn) -> str:
            row = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
            assert row is not None
            txids.append(row[0])
            return str(note(key)(conn))

        return op

    with writer_held(w) as held:
        futures = [w.submit((100 + i,), None, seen(f"k{i}")) for i in range(20)]
    held.result(WAIT)
    assert [f.result(WAIT) for f in futures] == [f"k{i}" for i in range(20)]
    assert len(set(txids)) == 1  # the 20 queued writes: one transaction
    assert (w.batches, w.writes) == (2, 21)


def test_a_refused_write_is_left_out_and_the_others_commit(
    writer: tuple[GroupCommitWriter, list[str]], connections: Connections
) -> None:
    w, _ = writer

    def refused(conn: Conn) -> None:
        raise kv.NotFound("no such thing")

    with writer_held(w):
        first, no = w.submit((2,), None, note("a")), w.submit((3,), None, refused)
        last = w.submit((4,), None, note("b"))
    assert (first.result(WAIT), last.result(WAIT)) == ("a", "b")
    assert isinstance(outcome(no), kv.NotFound)
    assert notes(connections) == {"a": "v", "b": "v"}


def test_a_database_error_fails_the_batch_and_the_writer_goes_on(
    writer: tuple[GroupCommitWriter, list[str]], connections: Connections
) -> None:
    """Not a refusal but the database's error: the transaction is rolled back, every write of it fails."""
    w, _ = writer
    with writer_held(w):
        batch = [w.submit((2,), None, note("a")), w.submit((3,), None, note("a"))]  # the second breaks the key
    failures = [outcome(f) for f in batch]
    assert all(isinstance(f, StorageError) and "refused the write" in str(f) for f in failures), failures
    assert notes(connections) == {}
    assert w.submit((2,), None, note("c")).result(WAIT) == "c"


def test_a_write_sealed_under_a_replaced_keyring_is_refused_and_reported(
    writer: tuple[GroupCommitWriter, list[str]], connections: Connections
) -> None:
    """Terms below the stored first term went with a root key replaced by bootstrap --force; a root key rotation
    keeps the keyring, so a write under a term still held goes through whatever the epoch."""
    w, told = writer
    with connections.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO key_record (id, epoch, record, first_term) VALUES (1, 7, '\\x00', 7)")
    assert isinstance(outcome(w.submit((1,), 6, note("old"))), StaleKey)
    assert told == ["stale"]
    assert w.submit((1,), 7, note("current")).result(WAIT) == "current"
    assert w.submit((1,), 8, note("newer")).result(WAIT) == "newer"
    assert w.submit((1,), None, note("unsealed")).result(WAIT) == "unsealed"
    assert notes(connections) == {"current": "v", "newer": "v", "unsealed": "v"}
    assert told == ["stale"]


def test_xact_status_says_what_became_of_a_transaction(connections: Connections) -> None:
    def xid_of(conn: Conn) -> str:
        row = conn.execute("SELECT pg_current_xact_id()::text").fetchone()
        assert row is not None
        return str(row[0])

    with connections.connect(autocommit=False) as conn:
        committed = xid_of(conn)
        conn.commit()
        aborted = xid_of(conn)
        conn.rollback()
        running = xid_of(conn)
        assert xact_status(connections, running) is XactStatus.IN_PROGRESS
        conn.rollback()
    assert xact_status(connections, committed) is XactStatus.COMMITTED
    assert xact_status(connections, aborted) is XactStatus.ABORTED
    # A transaction id the server never handed out (it came back from a crash without it): aborted.
    assert xact_status(connections, str(int(running) + 1_000_000)) is XactStatus.ABORTED


def test_xact_status_is_unknown_while_the_database_cannot_be_asked() -> None:
    server = pg_server.server()
    url = f"postgresql://spike:{server.password}@127.0.0.1:{pg_server._free_port()}/spike"
    assert xact_status(Connections(url, statement_timeout_ms=5000, pool_size=1), "1000") is XactStatus.UNKNOWN


def test_importing_the_backend_changes_no_logger_and_opening_it_quiets_only_the_pool() -> None:
    """psycopg.pool would log every reconnection attempt of an outage; the backend logs the outage once."""
    url = pg_server.server().database()
    script = (
        "import logging, sys\n"
        "import psycopg, psycopg_pool\n"  # what they set for themselves at import is theirs
        "def levels():\n"
        "    names = sorted(logging.Logger.manager.loggerDict)\n"
        "    return {n: logging.getLogger(n).level for n in ['', *names]}\n"
        "before = levels()\n"
        "import spike.app.store.postgres as pg\n"
        "after = levels()\n"
        "print(all(after.get(n) == level for n, level in before.items()))\n"
        "b = pg.PostgresBackend(sys.argv[1], read_threads=1)\n"
        "print({n: level for n, level in levels().items() if level != after.get(n, 0)})\n"
        "b.close()\n"
        "logging.getLogger('psycopg.pool').setLevel(logging.INFO)\n"
        "pg.PostgresBackend(sys.argv[1], read_threads=1).close()\n"
        "print(logging.getLogger('psycopg.pool').level)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, url], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    imported, opened, configured = done.stdout.split("\n")[:3]
    assert imported == "True"  # importing the backend set no logger's level
    assert opened == "{'psycopg.pool': 50}"  # opening it: CRITICAL on the pool's logger, nothing else
    assert configured == "20"  # a level the application gave that logger is left alone
