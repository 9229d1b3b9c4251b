"""Concurrent writers: check-and-set races, no lost update, group commit, durability before the answer."""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from spike.app.model import kv
from spike.app.store.group_commit import MAX_BATCH, WriteQueue
from spike.app.store.sqlite import SecretStore
from tests.store.store_helpers import WAIT

THREADS = 16


def race(threads: int, work: Any) -> list[Any]:
    """Run `work(i)` on `threads` threads released together; their results or exceptions."""
    barrier = threading.Barrier(threads)

    def run(i: int) -> Any:
        barrier.wait(timeout=WAIT)
        try:
            return work(i)
        except kv.KvError as exc:
            return exc

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(run, range(threads)))


def test_cas_race_has_exactly_one_winner_per_round(store: SecretStore) -> None:
    """Every round, 16 threads try to write version n+1 with cas=n: one wins, the others get a conflict."""
    for current in range(5):
        outcomes = race(THREADS, lambda i, c=current: store.put("race", {"by": str(i)}, cas=c).result(WAIT))
        winners = [(i, o) for i, o in enumerate(outcomes) if not isinstance(o, Exception)]
        assert len(winners) == 1, outcomes
        assert all(isinstance(o, kv.CasMismatch) for o in outcomes if isinstance(o, Exception)), outcomes
        ((winner, version),) = winners
        assert version == current + 1
        assert store.get("race", 0) == (current + 1, {"by": str(winner)})


def test_cas_zero_creates_a_secret_once(store: SecretStore) -> None:
    outcomes = race(THREADS, lambda i: store.put("once", {"by": str(i)}, cas=0).result(WAIT))
    assert sum(not isinstance(o, Exception) for o in outcomes) == 1
    assert sum(isinstance(o, kv.CasMismatch) for o in outcomes) == THREADS - 1


def test_no_lost_update_with_read_modify_write(store: SecretStore) -> None:
    """Counters incremented by many threads with cas retries end at exactly the number of increments."""
    store.put("counter", {"n": "0"}, cas=0).result(WAIT)
    per_thread = 10
    conflicts = 0
    lock = threading.Lock()

    def increment(_: int) -> None:
        nonlocal conflicts
        done = 0
        while done < per_thread:
            version, values = store.get("counter", 0)
            try:
                store.put("counter", {"n": str(int(values["n"]) + 1)}, cas=version).result(WAIT)
            except kv.CasMismatch:
                with lock:
                    conflicts += 1
                continue
            done += 1

    race(8, increment)
    version, values = store.get("counter", 0)
    assert values == {"n": str(8 * per_thread)}
    assert version == 8 * per_thread + 1
    assert conflicts > 0  # the threads really did collide (else this proves nothing)


def test_writes_waiting_together_share_one_commit(store: SecretStore) -> None:
    """While the writer is busy, 50 puts queue up; they are committed as one batch, one fsync."""
    busy, release = threading.Event(), threading.Event()

    def hold(db: sqlite3.Connection) -> None:
        busy.set()
        release.wait(WAIT)

    batches, writes = store.batches, store.writes
    held = store.submit(hold)
    assert busy.wait(WAIT)
    futures = [store.put(f"batch/{i}", {"i": str(i)}, None) for i in range(50)]
    futures.append(store.put("batch/0", {"i": "again"}, cas=7))  # fails alone, in the same batch
    release.set()
    held.result(WAIT)
    results = [_outcome(f) for f in futures]
    assert results[:50] == [1] * 50
    assert isinstance(results[50], kv.CasMismatch)
    assert store.writes - writes == 1 + 51
    assert store.batches - batches == 1 + 1  # the 51 queued operations went in one transaction
    assert all(store.get(f"batch/{i}", 0) == (1, {"i": str(i)}) for i in range(50))


def test_concurrent_puts_are_group_committed(store: SecretStore) -> None:
    """Many threads putting at once: fewer commits than writes."""
    before = store.batches, store.writes
    race(THREADS, lambda i: [store.put(f"t{i}/{n}", {"n": str(n)}, None).result(WAIT) for n in range(20)])
    batches, writes = store.batches - before[0], store.writes - before[1]
    assert writes == THREADS * 20
    assert batches < writes
    assert store.count() == THREADS * 20


def test_a_write_is_answered_only_after_its_commit(store: SecretStore) -> None:
    """The future resolves after COMMIT has returned (SQLite has synced the WAL: synchronous=FULL)."""
    events: list[str] = []
    db = store._writer_db  # the writer thread's connection: watch what it runs
    db.set_trace_callback(lambda sql: events.append(sql.split()[0].upper()))
    try:
        future = store.put("durable", {"k": "v"}, None)
        future.add_done_callback(lambda _: events.append("ANSWERED"))
        assert future.result(WAIT) == 1
    finally:
        db.set_trace_callback(None)
    assert "COMMIT" in events
    assert events.index("ANSWERED") > events.index("COMMIT"), events


def test_connections_use_wal_and_full_sync(store: SecretStore) -> None:
    for db in (store._reader, store._writer_db):
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL: fsync on every commit


def test_a_refused_transaction_fails_its_writes_and_the_writer_goes_on(store: SecretStore) -> None:
    """Another process holds the write lock: each queued write fails, as "not now" (503), none half-done."""
    blocker = sqlite3.connect(store._path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    store._writer_db.execute("PRAGMA busy_timeout=0")  # the writer thread is idle: safe to touch
    try:
        futures = [store.put(f"fail/{i}", {"i": "x"}, None) for i in range(5)]
        outcomes = [_outcome(f) for f in futures]
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        store._writer_db.execute("PRAGMA busy_timeout=5000")
    assert all(type(o).__name__ == "DatabaseUnavailable" for o in outcomes), outcomes
    assert all(_missing(store, f"fail/{i}") for i in range(5))
    assert store.put("fail/0", {"k": "v"}, None).result(WAIT) == 1  # the writer thread is still alive


def _outcome(future: Future[Any]) -> Any:
    try:
        return future.result(WAIT)
    except Exception as exc:
        return exc


def _missing(store: SecretStore, path: str) -> bool:
    try:
        store.get(path, 0)
    except kv.NotFound:
        return True
    return False


def test_the_write_queue_hands_out_what_waits_in_batches_and_stops_after_them() -> None:
    """Both backends' writer threads take their batches here: at most MAX_BATCH, nothing queued is lost."""
    writes: WriteQueue[int] = WriteQueue()
    for i in range(MAX_BATCH + 3):
        writes.put(i)
    writes.stop()
    writes.put(-1)  # behind the stop: never handed out
    assert writes.next_batch() == list(range(MAX_BATCH))
    assert writes.next_batch() == [MAX_BATCH, MAX_BATCH + 1, MAX_BATCH + 2]
    assert writes.next_batch() is None
