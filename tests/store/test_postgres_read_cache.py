"""PostgreSQL's read cache with a real server: two instances on one database, writers of every kind.

No timing is asserted.  Where a test needs "after the staleness bound", it
waits until the reading instance's listener has had a barrier answered that
was sent after the write was acknowledged (`barrier_after`), which is what
the bound rests on; the cache may then serve the new row or nothing, never
the old one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from spike.app.model import kv
from spike.app.store import postgres_changes
from spike.app.store.postgres import PostgresBackend
from spike.app.store.postgres_changes import CHANGES_APPLICATION, ChangeListener
from spike.app.store.read_cache import MISS, ReadCache
from tests import pg_server
from tests.e2e.harness import wait_until
from tests.store.store_helpers import EPOCH, ROOT_KEY, WAIT, open_postgres

STALENESS = 0.05


def open_pg(url: str, *, staleness: float = STALENESS) -> PostgresBackend:
    backend: PostgresBackend = open_postgres(url, read_cache_staleness=staleness)
    return backend


@pytest.fixture
def url() -> str:
    return pg_server.server().database()


@pytest.fixture
def pair(url: str) -> Iterator[tuple[PostgresBackend, PostgresBackend]]:
    one, two = open_pg(url), open_pg(url)
    try:
        yield one, two
    finally:
        one.close()
        two.close()


def barrier_after(backend: PostgresBackend) -> None:
    """Wait until `backend`'s listener has had a barrier answered that it sent after this call began."""
    listener = backend._changes
    assert listener is not None and backend.read_cache is not None
    start = time.monotonic()
    backend.read_cache.lookup("", 0)  # a read asks: barriers come every staleness / 2
    wait_until(lambda: listener.last_answered_sent > start, "a barrier sent after the write", 10)


def warm(backend: PostgresBackend, path: str) -> tuple[int, dict[str, str]]:
    """Read through the database (keeping the row) until the cache serves what it read: a notification of an
    earlier write that came after the read drops the row again, and a busy machine may let the newest
    barrier grow older than the bound before the lookup."""
    found = backend.get(path, 0)

    def served() -> bool:
        if backend.cached_get(path, 0) == found:
            return True
        assert backend.get(path, 0) == found
        return False

    wait_until(served, f"{path} served from the cache", 10)
    return found


def test_a_write_through_another_instance_is_never_served_old_after_the_bound(
    pair: tuple[PostgresBackend, PostgresBackend],
) -> None:
    one, two = pair
    assert one.put("app/db", {"password": "v1"}, None).result(WAIT) == 1
    assert warm(two, "app/db") == (1, {"password": "v1"})
    assert two.read_cache is not None
    hits = two.read_cache.hits
    for n in range(2, 6):
        assert one.put("app/db", {"password": f"v{n}"}, None).result(WAIT) == n
        barrier_after(two)
        assert two.cached_get("app/db", 0) in (None, (n, {"password": f"v{n}"}))
        assert warm(two, "app/db") == (n, {"password": f"v{n}"})
    assert two.read_cache.hits > hits
    # Deletes, destroys and whole-secret removals through the other instance are changes too.
    one.delete("app/db", []).result(WAIT)
    barrier_after(two)
    assert two.cached_get("app/db", 0) is None
    warm_missing(two, "app/db")
    one.delete_all("app/db").result(WAIT)
    barrier_after(two)
    assert two.cached_get("app/db", 3) is None


def warm_missing(backend: PostgresBackend, path: str) -> None:
    with pytest.raises(kv.NotFound):
        backend.get(path, 0)
    barrier_after(backend)


def test_a_write_through_this_instance_is_seen_at_once(pair: tuple[PostgresBackend, PostgresBackend]) -> None:
    one, _ = pair
    assert one.put("own", {"k": "1"}, None).result(WAIT) == 1
    warm(one, "own")
    for n in range(2, 20):
        # No wait: the path is dropped before the write's future resolves.
        assert one.put("own", {"k": str(n)}, None).result(WAIT) == n
        assert one.cached_get("own", 0) in (None, (n, {"k": str(n)}))
        assert warm(one, "own") == (n, {"k": str(n)})
    one.update_metadata("own", max_versions=3, cas_required=None, custom_metadata=None).result(WAIT)
    assert one.cached_get("own", 0) is None


def test_a_change_made_by_hand_in_the_database_is_a_change(
    url: str, pair: tuple[PostgresBackend, PostgresBackend]
) -> None:
    one, two = pair
    one.put("by-hand", {"k": "1"}, None).result(WAIT)
    one.put("by-hand", {"k": "2"}, None).result(WAIT)
    warm(two, "by-hand")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE secret SET current_version = 1 WHERE path = 'by-hand'")
    barrier_after(two)
    assert two.cached_get("by-hand", 0) in (None, (1, {"k": "1"}))
    assert warm(two, "by-hand") == (1, {"k": "1"})
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE secret_version")  # no row-level trigger fires: the statement-level one does
    barrier_after(two)
    assert two.cached_get("by-hand", 0) is None


def test_a_lost_listener_serves_nothing_until_it_listens_again_and_then_forgets_everything(
    url: str, pair: tuple[PostgresBackend, PostgresBackend]
) -> None:
    one, two = pair
    one.put("lost", {"k": "1"}, None).result(WAIT)
    warm(two, "lost")
    listener = two._changes
    assert listener is not None
    connections = listener.connections
    with psycopg.connect(url, autocommit=True) as conn:
        # The listener's connection is cut; a write lands while nobody listens for it.
        killed = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = %s AND datname = current_database()",
            (CHANGES_APPLICATION,),
        ).fetchone()
        assert killed is not None and killed[0] >= 1
        conn.execute("UPDATE secret_version SET deleted_at = 1 WHERE path = 'lost'")
    wait_until(lambda: listener.connections > connections, "the listener listening again", 10)
    barrier_after(two)
    assert two.cached_get("lost", 0) is None  # dropped when it listened again, announced or not


def test_no_cache_when_the_bound_is_zero(url: str) -> None:
    backend = open_pg(url, staleness=0)
    try:
        backend.put("p", {"k": "1"}, None).result(WAIT)
        assert backend.get("p", 0) == (1, {"k": "1"})
        assert backend.read_cache is None
        assert backend.cached_get("p", 0) is None
        with psycopg.connect(url, autocommit=True) as conn:
            listeners = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
                (CHANGES_APPLICATION,),
            ).fetchone()
        assert listeners == (0,)
    finally:
        backend.close()


def test_a_locked_store_serves_nothing_from_the_cache(pair: tuple[PostgresBackend, PostgresBackend]) -> None:
    one, _ = pair
    one.put("locked", {"k": "1"}, None).result(WAIT)
    warm(one, "locked")
    one.lock()
    assert one.cached_get("locked", 0) is None  # the database read says what a locked store answers
    one.unlock(ROOT_KEY, EPOCH)
    assert one.cached_get("locked", 0) in (None, (1, {"k": "1"}))


class LosesBarriers:
    """A real connection whose LISTEN on the barrier channel goes nowhere: as through a pooler in transaction
    mode, where a session's LISTEN does not follow the client (so its notifications never come back)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def __enter__(self) -> LosesBarriers:
        return self

    def __exit__(self, *exc: object) -> None:
        self._conn.close()

    def execute(self, query: str, params: Any = None) -> Any:
        if query.startswith("LISTEN spike_barrier_"):
            return None
        return self._conn.execute(query, params)

    def notifies(self, **kwargs: Any) -> Any:
        return self._conn.notifies(**kwargs)


def test_barriers_that_never_come_back_leave_the_cache_serving_nothing(
    url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(postgres_changes, "BARRIER_LOST", 0.3)
    caplog.set_level(logging.WARNING, logger="spike.nexus.store")
    cache = ReadCache(staleness=STALENESS, max_bytes=1 << 20, clock=time.monotonic)
    listener = ChangeListener(lambda: LosesBarriers(psycopg.connect(url, autocommit=True)), cache)  # type: ignore[arg-type,return-value]
    listener.start()
    try:
        wait_until(lambda: listener.connections == 1, "the listener listening", 10)
        cache.end_fill(cache.begin_fill(), ("p", 0, None))
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # reads keep asking; not one is answered from memory
            assert cache.lookup("p", 0) is MISS
            time.sleep(0.01)
        assert listener.barriers == 0
        wait_until(lambda: "did not deliver" in caplog.text, "the warning", 5)
        assert caplog.text.count("did not deliver") == 1
    finally:
        listener.close()
