"""Secret values read in batches on PostgreSQL (postgres_reads.py): each read answers exactly as `get` does.

A real server (tests/pg_server.py).  The reads of one batch go in one
statement; what each one answers (a value, the current version, not found,
deleted, destroyed) and when it fails must not depend on which other reads
shared its statement.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

import pytest

from spike.app.model import kv
from spike.app.store.errors import DatabaseUnavailable
from spike.app.store.postgres import PostgresBackend
from spike.app.store.postgres_reads import ValueReads
from tests import pg_server
from tests.store.store_helpers import EPOCH, RECORD, ROOT_KEY, WAIT


@pytest.fixture
def url() -> str:
    return pg_server.server().database()


def open_pg(url: str) -> PostgresBackend:
    backend = PostgresBackend(url, read_threads=2)
    backend.install_key_record(RECORD, replace=None)
    backend.unlock(ROOT_KEY, EPOCH)
    return backend


def outcome(future: Future[Any]) -> Any:
    try:
        return future.result(WAIT)
    except Exception as exc:
        return exc


def answer(future: Future[Any]) -> Any:
    """A read's answer, compared by kind for errors (an exception object equals only itself)."""
    result = outcome(future)
    return (type(result), str(result)) if isinstance(result, Exception) else result


def sync_answer(call: Any) -> Any:
    try:
        return call()
    except Exception as exc:
        return (type(exc), str(exc))


def test_every_read_of_a_batch_answers_what_get_answers(url: str) -> None:
    backend = open_pg(url)
    try:
        for path in ("a", "b", "c"):
            for n in range(3):
                backend.put(path, {"n": f"{path}{n}"}, None).result(WAIT)
        backend.delete("b", [3]).result(WAIT)
        backend.destroy("c", [2]).result(WAIT)
        asked = [(p, v) for p in ("a", "b", "c", "missing") for v in (0, 1, 2, 3, 4)]
        expected = [sync_answer(lambda p=p, v=v: backend.get(p, v)) for p, v in asked]
        # Held up behind one statement, the reads queue and go in one batch (asked twice: duplicates too).
        held = threading.Event()
        blocker = backend._values.submit("a", 0, lambda _row: held.wait(WAIT))
        futures = [backend.get_later(p, v) for p, v in asked + asked]
        batches = backend._values.batches
        held.set()
        blocker.result(WAIT)
        assert [answer(f) for f in futures] == expected + expected
        assert backend._values.batches - batches <= 2  # 40 reads (at most 64 a statement), queued behind one
        kinds = [e[0] if isinstance(e[0], type) else "value" for e in expected]
        assert kinds.count("value") == 9 and kinds.count(kv.NotFound) == 11
    finally:
        backend.close()


def test_a_write_acknowledged_on_one_instance_is_read_on_the_other(url: str) -> None:
    one, two = open_pg(url), open_pg(url)
    try:
        for n in range(1, 30):
            assert one.put("p", {"n": str(n)}, None).result(WAIT) == n
            assert two.get_later("p", 0).result(WAIT) == (n, {"n": str(n)})
    finally:
        one.close()
        two.close()


def test_a_lost_server_fails_every_read_of_the_batch_with_503_and_reads_work_when_back(url: str) -> None:
    server = pg_server.server()
    backend = open_pg(url)
    try:
        backend.put("p", {"k": "1"}, None).result(WAIT)
        server.stop("fast")
        try:
            futures = [backend.get_later("p", 0) for _ in range(10)]
            assert all(isinstance(outcome(f), DatabaseUnavailable) for f in futures)
        finally:
            server.start()
        assert backend.get_later("p", 0).result(WAIT) == (1, {"k": "1"})
    finally:
        backend.close()


def test_closing_answers_the_reads_queued_and_stops_the_threads(url: str) -> None:
    backend = PostgresBackend(url, read_threads=1)
    reads = ValueReads(backend._db, threads=3)
    try:
        futures = [reads.submit("nothing", 0, lambda row: row) for _ in range(5)]
    finally:
        reads.close()
        backend.close()
    assert [f.result(WAIT) for f in futures] == [None] * 5
    assert not any(t.is_alive() for t in reads._threads)
