"""The read cache on its own (spike/app/store/read_cache.py): a hand-driven clock, no database.

The examples pin each rule; the state machine plays a database, its
notifications and the listener's barriers in any order hypothesis finds, and
checks the promise after every step: a hit is never older than a write
committed `STALENESS` seconds before it, and never newer than the database.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from spike.app.store.read_cache import MISS, ReadCache

STALENESS = 0.02


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def row(version: int, blob: bytes = b"sealed") -> tuple[int, bytes, None, int, int]:
    return (version, blob, None, 1, 1)


def cache_with(clock: Clock, max_bytes: int = 1 << 20) -> ReadCache:
    return ReadCache(staleness=STALENESS, max_bytes=max_bytes, clock=clock)


def fill(cache: ReadCache, path: str, found: tuple[int, bytes, None, int, int] | None, version: int = 0) -> None:
    cache.end_fill(cache.begin_fill(), (path, version, found))


def test_a_row_is_served_only_while_a_recent_barrier_vouches_for_it() -> None:
    clock = Clock()
    cache = cache_with(clock)
    fill(cache, "a", row(1))
    assert cache.lookup("a", 0) is MISS  # no barrier answered yet
    cache.barrier(clock.now)
    assert cache.lookup("a", 0) == row(1)
    clock.now += STALENESS
    assert cache.lookup("a", 0) == row(1)  # exactly the bound: still vouched for
    clock.now += 0.001
    assert cache.lookup("a", 0) is MISS
    cache.barrier(clock.now - 0.005)
    assert cache.lookup("a", 0) == row(1)
    cache.barrier(clock.now - 1.0)  # an older barrier answered late changes nothing
    assert cache.lookup("a", 0) == row(1)
    cache.unsure()  # the listener's connection broke
    assert cache.lookup("a", 0) is MISS
    assert not cache.fresh()


def test_a_kept_absence_is_served_and_versions_are_kept_apart() -> None:
    clock = Clock()
    cache = cache_with(clock)
    cache.barrier(clock.now)
    fill(cache, "a", None)
    fill(cache, "a", row(3), version=3)
    assert cache.lookup("a", 0) is None
    assert cache.lookup("a", 3) == row(3)
    assert cache.lookup("a", 2) is MISS
    assert cache.lookup("b", 0) is MISS


def test_a_change_drops_the_path_and_only_that_path() -> None:
    clock = Clock()
    cache = cache_with(clock)
    cache.barrier(clock.now)
    fill(cache, "a", row(1))
    fill(cache, "b", row(1))
    cache.drop(["a"])
    assert cache.lookup("a", 0) is MISS
    assert cache.lookup("b", 0) == row(1)
    cache.drop_all()
    assert cache.lookup("b", 0) is MISS
    assert len(cache) == 0
    assert cache.size == 0


def test_a_fill_begun_before_a_change_to_its_path_is_not_kept() -> None:
    clock = Clock()
    cache = cache_with(clock)
    cache.barrier(clock.now)
    ticket = cache.begin_fill()
    cache.drop(["a"])  # the change committed after the read's snapshot, and its notification came first
    cache.end_fill(ticket, ("a", 0, row(1)))
    assert cache.lookup("a", 0) is MISS

    ticket = cache.begin_fill()
    cache.drop(["other"])
    cache.end_fill(ticket, ("a", 0, row(2)))
    assert cache.lookup("a", 0) == row(2)  # a change elsewhere does not spoil it

    ticket = cache.begin_fill()
    cache.drop_all()
    cache.end_fill(ticket, ("b", 0, row(1)))
    assert cache.lookup("b", 0) is MISS

    ticket = cache.begin_fill()
    cache.end_fill(ticket)  # a failed read keeps nothing
    assert cache.lookup("c", 0) is MISS


def test_the_least_recently_read_go_first_when_the_bytes_run_out() -> None:
    clock = Clock()
    cache = cache_with(clock, max_bytes=4 * 1200)
    cache.barrier(clock.now)
    for name in "abc":
        fill(cache, name, row(1, b"x" * 900))
    assert cache.lookup("a", 0) is not MISS  # "a" read: "b" is now the oldest
    fill(cache, "d", row(1, b"x" * 900))
    fill(cache, "e", row(1, b"x" * 900))
    assert cache.lookup("b", 0) is MISS
    assert {n for n in "acde" if cache.lookup(n, 0) is not MISS} >= {"a", "e"}
    assert cache.size <= 4 * 1200
    fill(cache, "huge", row(1, b"x" * 2000))  # over a quarter of the budget: never kept
    assert cache.lookup("huge", 0) is MISS


class CacheAgainstDatabase(RuleBasedStateMachine):
    """A database (paths -> version), its notification queue, a listener's barriers and reads that fill."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.cache = cache_with(self.clock)
        self.db: dict[str, int] = {}
        self.commits: list[tuple[float, str, int]] = []
        self.queue: list[str] = []  # notifications sent, not yet received by the listener
        self.sent = 0  # notifications sent so far
        self.received = 0  # of which the listener received (or lost) this many
        self.barrier_sent: tuple[float, int] | None = None  # a barrier in flight: sent when, `sent` then
        self.fills: list[tuple[int, str, int | None]] = []  # ticket, path, what the read found (None: not yet)

    paths = st.sampled_from(["a", "b", "c"])

    @rule(path=paths)
    def commit(self, path: str) -> None:
        self.db[path] = self.db.get(path, 0) + 1
        self.commits.append((self.clock.now, path, self.db[path]))
        self.queue.append(path)
        self.sent += 1

    @rule(path=paths)
    def local_commit(self, path: str) -> None:
        """A write through this instance: dropped here before it is acknowledged (and announced as well)."""
        self.commit(path)
        self.cache.drop([path])

    @precondition(lambda self: self.queue)
    @rule(n=st.integers(1, 3))
    def receive(self, n: int) -> None:
        for path in self.queue[:n]:
            self.cache.drop([path])
            self.received += 1
        del self.queue[:n]

    @precondition(lambda self: self.barrier_sent is None)
    @rule()
    def send_barrier(self) -> None:
        self.barrier_sent = (self.clock.now, self.sent)

    @precondition(lambda self: self.barrier_sent is not None)
    @rule(more=st.integers(0, 2))
    def barrier_answered(self, more: int) -> None:
        assert self.barrier_sent is not None
        sent_at, ahead = self.barrier_sent
        # Every notification sent before the barrier arrives ahead of its answer (and maybe a few more).
        self.receive(max(0, ahead - self.received) + more)
        self.cache.barrier(sent_at)
        self.barrier_sent = None

    @precondition(lambda self: self.barrier_sent is None)
    @rule()
    def quick_barrier(self) -> None:
        """The common case: a barrier sent and answered before anything else happens."""
        self.send_barrier()
        self.barrier_answered(0)

    @rule(chance=st.integers(0, 9))
    def connection_lost_and_listening_again(self, chance: int) -> None:
        if chance:  # rare: one in ten draws
            return
        self.cache.unsure()
        self.received += len(self.queue)
        self.queue.clear()  # notifications to a dead connection are lost...
        self.barrier_sent = None
        self.cache.drop_all()  # ...which is why listening again drops everything

    @rule(path=paths, read_at_once=st.booleans())
    def begin_fill(self, path: str, read_at_once: bool) -> None:
        """A read that will keep its row: its snapshot now, or after other steps (`read_snapshot`)."""
        ticket = self.cache.begin_fill()
        self.fills.append((ticket, path, self.db.get(path, 0) if read_at_once else None))

    @precondition(lambda self: any(found is None for _, _, found in self.fills))
    @rule(data=st.data())
    def read_snapshot(self, data: st.DataObject) -> None:
        pending = [i for i, (_, _, found) in enumerate(self.fills) if found is None]
        i = data.draw(st.sampled_from(pending))
        ticket, path, _ = self.fills[i]
        self.fills[i] = (ticket, path, self.db.get(path, 0))

    @precondition(lambda self: any(found is not None for _, _, found in self.fills))
    @rule(data=st.data())
    def end_fill(self, data: st.DataObject) -> None:
        done = [i for i, (_, _, found) in enumerate(self.fills) if found is not None]
        ticket, path, found = self.fills.pop(data.draw(st.sampled_from(done)))
        assert found is not None
        self.cache.end_fill(ticket, (path, 0, row(found) if found else None))

    @rule(dt=st.sampled_from([0.001, 0.004, 0.008, 0.015, 0.025]))
    def tick(self, dt: float) -> None:
        self.clock.now += dt

    @rule(path=paths)
    def read(self, path: str) -> None:
        got = self.cache.lookup(path, 0)
        if got is MISS:
            return
        version = 0 if got is None else got[0]
        assert version <= self.db.get(path, 0)
        # Every write committed at least STALENESS ago is seen.
        horizon = self.clock.now - STALENESS
        for at, changed, committed in self.commits:
            if at < horizon and changed == path:
                assert version >= committed, (path, version, committed, at, self.clock.now)

    @invariant()
    def never_more_than_the_budget(self) -> None:
        assert self.cache.size <= 1 << 20


CacheAgainstDatabase.TestCase.settings = settings(max_examples=1000, stateful_step_count=40, deadline=None)
TestCacheAgainstDatabase = CacheAgainstDatabase.TestCase
