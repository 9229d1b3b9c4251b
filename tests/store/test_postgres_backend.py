"""What only PostgreSQL has: a server that goes away and comes back, instances starting at once, key epochs.

A real server (tests/pg_server.py), stopped and started under the backend:
reads and writes fail with `DatabaseUnavailable` (the API's 503) while it is
away, the outage is logged once, and the same backend serves again when it is
back, without being reopened.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest

from spike.app.model import kv
from spike.app.store.errors import DatabaseUnavailable, StorageError
from spike.app.store.postgres import PostgresBackend
from spike.app.store.postgres_connections import Connections
from spike.app.store.postgres_schema import MIGRATIONS
from spike.app.store.postgres_writer import StaleKey
from spike.protocol.record import seal_key
from tests import pg_server
from tests.store.store_helpers import EPOCH, RECORD, ROOT_KEY, WAIT, open_postgres


def open_pg(url: str) -> PostgresBackend:
    backend: PostgresBackend = open_postgres(url)
    return backend


@pytest.fixture
def url() -> str:
    return pg_server.server().database()


def outcome(future: Any) -> Any:
    try:
        return future.result(WAIT)
    except Exception as exc:
        return exc


def test_a_lost_server_is_503_logged_once_and_served_again_when_back(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = pg_server.server()
    backend = open_pg(url)
    try:
        assert backend.put("p", {"k": "1"}, None).result(WAIT) == 1
        caplog.set_level(logging.INFO, logger="spike.nexus.store")
        server.stop("fast")
        try:
            for _ in range(5):
                with pytest.raises(DatabaseUnavailable):
                    backend.get("p", 0)
                assert isinstance(outcome(backend.put("p", {"k": "x"}, None)), DatabaseUnavailable)
                assert isinstance(outcome(backend.read(backend.count)), DatabaseUnavailable)
        finally:
            server.start()
        # Back: the same backend, no reopen; the stale pooled connections are replaced on the way.
        assert backend.get("p", 0) == (1, {"k": "1"})
        assert backend.put("p", {"k": "2"}, 1).result(WAIT) == 2
        assert backend.read(lambda: backend.get("p", 0)).result(WAIT) == (2, {"k": "2"})
    finally:
        backend.close()
    down = [r for r in caplog.records if "is unavailable" in r.getMessage()]
    up = [r for r in caplog.records if "available again" in r.getMessage()]
    assert len(down) == 1, [r.getMessage() for r in caplog.records]
    assert len(up) == 1
    assert server.password not in caplog.text  # the URL is logged without its password


def test_a_read_waiting_for_the_pool_an_outage_replaced_is_answered_from_the_new_pool(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The outage's end replaces the pool and closes the old one; a read that was waiting for a connection of the
    old pool then takes one from the new pool, instead of failing (503) and logging a second outage."""
    connections = Connections(url, statement_timeout_ms=5000, pool_size=1)
    connections.open_pool()
    try:
        holding, release = threading.Event(), threading.Event()

        def hold(conn: Any) -> int:
            holding.set()
            release.wait(10)
            return 1

        results: list[object] = []

        def waiting_read() -> None:  # waits for the one connection the first read holds
            try:
                results.append(connections.query(lambda conn: conn.execute("SELECT 2").fetchone()))
            except Exception as exc:
                results.append(exc)

        first = threading.Thread(target=lambda: connections.query(hold))
        first.start()
        assert holding.wait(10)
        second = threading.Thread(target=waiting_read)
        second.start()
        time.sleep(0.3)  # let it wait on the old pool (if it is not waiting yet, it takes the new pool anyway)
        caplog.set_level(logging.INFO, logger="spike.nexus.store")
        connections.health.failed(psycopg.OperationalError("the test's outage"))
        connections.back()  # the outage ends: a fresh pool, the old one closed
        second.join(10)
        release.set()
        first.join(10)
        assert results == [(2,)]
        assert [r.getMessage() for r in caplog.records if "is unavailable" in r.getMessage()] == [
            next(r.getMessage() for r in caplog.records if "is unavailable" in r.getMessage())
        ]  # the test's own outage, once
    finally:
        connections.close()


def test_a_restart_between_two_requests_costs_no_error(url: str) -> None:
    """Idle connections broken by a server restart are replaced before anything fails."""
    server = pg_server.server()
    backend = open_pg(url)
    try:
        backend.put("r", {"k": "1"}, None).result(WAIT)
        backend.get("r", 0)
        server.restart("fast")
        assert backend.get("r", 0) == (1, {"k": "1"})
        assert backend.put("r", {"k": "2"}, 1).result(WAIT) == 2
    finally:
        backend.close()


def test_writes_arriving_while_a_broken_commit_is_resolved_are_refused_at_once(url: str) -> None:
    """The server crashes in the middle of a COMMIT: that write waits to learn whether it happened (it
    did not: a crash before the commit record), but the writes behind it answer 503 at once while the
    database is away, instead of waiting in the queue for the resolution."""
    server = pg_server.server()
    backend = open_pg(url)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            # A deferred trigger that makes the COMMIT of a write to "slow" take long enough to crash under it.
            conn.execute(
                "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN IF NEW.path = 'slow' THEN PERFORM pg_sleep(60); END IF; RETURN NULL; END $$"
            )
            conn.execute(
                "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON secret_version "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()"
            )
        in_commit = backend.put("slow", {"k": "1"}, None)
        with psycopg.connect(url, autocommit=True) as conn:
            deadline = time.monotonic() + WAIT
            query = (
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'spike-nexus' "
                "AND wait_event = 'PgSleep'"
            )
            while conn.execute(query).fetchone() != (1,):  # the write's COMMIT is under way
                assert time.monotonic() < deadline, "the write never reached its COMMIT"
                time.sleep(0.02)
        server.stop("immediate")
        try:
            time.sleep(0.5)  # the writer has seen its connection break and is asking for the outcome
            started = time.monotonic()
            behind = outcome(backend.put("other", {"k": "1"}, None))
            assert isinstance(behind, DatabaseUnavailable), behind
            assert time.monotonic() - started < 2.0  # not held for the resolution (15 s)
            assert not in_commit.done()  # still waiting to learn its outcome
        finally:
            server.start()
        # Crashed before its commit record: the database says aborted, so it is a 503, never a success.
        assert isinstance(outcome(in_commit), DatabaseUnavailable)
        assert backend.put("other", {"k": "2"}, None).result(WAIT) == 1
        with pytest.raises(kv.NotFound):
            backend.get("slow", 0)
    finally:
        backend.close()


def test_instances_started_at_once_on_an_empty_database_share_one_schema(url: str) -> None:
    opened: list[Any] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        barrier.wait(WAIT)
        try:
            opened.append(open_pg(url))
        except Exception as exc:
            opened.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    try:
        assert all(isinstance(b, PostgresBackend) for b in opened), opened
        opened[0].put("once", {"k": "v"}, 0).result(WAIT)
        assert all(b.get("once", 0) == (1, {"k": "v"}) for b in opened)
    finally:
        for backend in opened:
            if isinstance(backend, PostgresBackend):
                backend.close()


def test_a_newer_schema_is_refused(url: str) -> None:
    open_pg(url).close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE spike_schema SET version = %s", (len(MIGRATIONS) + 1,))
    with pytest.raises(StorageError, match="newer than this spike knows"):
        PostgresBackend(url)


def test_an_unreachable_server_at_start_is_one_clear_error() -> None:
    server = pg_server.server()
    url = f"postgresql://spike:{server.password}@127.0.0.1:{pg_server._free_port()}/spike"
    with pytest.raises(DatabaseUnavailable, match=r"cannot reach PostgreSQL at postgresql://spike:\*\*\*@") as caught:
        PostgresBackend(url)
    assert server.password not in str(caught.value)


def test_a_write_sealed_under_a_replaced_key_is_refused(url: str) -> None:
    """bootstrap --force through another instance: this one's writes under the old keyring must not land."""
    first = RECORD
    newer, _ = seal_key(ROOT_KEY, epoch=EPOCH + 1, threshold=2, keeper_ids=[1, 2, 3])
    mine, other = open_pg(url), open_pg(url)
    told = threading.Event()
    mine.on_stale_key = told.set
    try:
        assert mine.install_key_record(first, replace=None) == first
        assert mine.put("s", {"k": "1"}, None).result(WAIT) == 1
        assert other.install_key_record(newer, replace=first) == newer
        refused = outcome(mine.put("s", {"k": "2"}, None))
        assert isinstance(refused, StaleKey)  # a DatabaseUnavailable: 503, try again once recovered
        assert told.is_set()
        # Writes that seal nothing still go through; the old value is as it was.
        mine.delete("s", [1]).result(WAIT)
        assert isinstance(outcome(mine.put("s", {"k": "2"}, 1)), StaleKey)
        other.unlock(ROOT_KEY, EPOCH + 1)
        assert other.put("s", {"k": "3"}, 1).result(WAIT) == 2
    finally:
        mine.close()
        other.close()


def test_policy_writes_move_the_change_counter_seen_by_other_instances(url: str) -> None:
    from spike.app.model.policy import Permission
    from spike.app.store.policies import PolicyStore

    mine, other = open_pg(url), open_pg(url)
    try:
        seen = other.cluster_state().policy_version
        PolicyStore(mine).put("p", "spiffe://x/.*", ".*", frozenset({Permission.READ}), create_only=False).result(WAIT)
        assert other.cluster_state().policy_version == seen + 1
        assert [p.name for p in PolicyStore(other).load_all()] == ["p"]
    finally:
        mine.close()
        other.close()


def test_cas_conflicts_are_kv_errors_not_storage_errors(url: str) -> None:
    backend = open_pg(url)
    try:
        backend.put("c", {"k": "v"}, 0).result(WAIT)
        assert isinstance(outcome(backend.put("c", {"k": "v"}, 0)), kv.CasMismatch)
    finally:
        backend.close()


def test_the_schema_lives_in_the_database_it_is_given(tmp_path: Path, url: str) -> None:
    """Nothing is written next to the process: the data dir stays empty."""
    backend = open_pg(url)
    backend.close()
    assert not any(tmp_path.iterdir())


def test_a_database_from_before_rotations_gains_the_rotation_state_in_place(url: str) -> None:
    """Schema 2 (spike before key rotation), with a record: it is its own high-water mark; nothing else moves."""
    record, _ = seal_key(ROOT_KEY, epoch=3, threshold=2, keeper_ids=[1, 2, 3])
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE spike_schema (id integer PRIMARY KEY CHECK (id = 1), version integer NOT NULL)")
        for step in MIGRATIONS[:2]:
            for statement in step:
                conn.execute(statement)
        conn.execute("INSERT INTO spike_schema (id, version) VALUES (1, 2)")
        conn.execute("INSERT INTO key_record (id, epoch, record) VALUES (1, 3, %s)", (msgspec.json.encode(record),))
    backend = PostgresBackend(url, read_threads=2)
    try:
        assert backend.load_key_record() == record
        assert backend.load_rotation_state() == (None, None, 3)
        assert backend.load_keyring() == (3, None)
        assert backend.cluster_state().highest_epoch == 3
    finally:
        backend.close()
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM spike_schema").fetchone() == (len(MIGRATIONS),)
