"""Recent secret reads of a Nexus on PostgreSQL, kept so that a GET can be answered without the database.

What is kept is the row the value statement returned (the sealed blob with its
version, deletion time, key epoch and data-key term) or that there was none:
never a plaintext.  A hit is opened with the keyring like any read.

The promise (docs/postgresql.md): a write acknowledged by any instance
`staleness` seconds or more before a read is seen by that read; a write
acknowledged by this instance is seen at once.  It rests on three rules:

* **Changes drop rows.**  Every change to a path, committed by any instance
  (or by hand), is announced by the database (a trigger's NOTIFY); the
  listener (postgres_changes.py) drops that path's rows when it arrives, and
  this instance drops them itself before it acknowledges its own writes.
* **Hits need a recent barrier.**  The listener sends a query on its own
  connection every so often; the database delivers every notification of a
  transaction committed before that query was sent ahead of its answer.  So
  once the answer is in, every write acknowledged before the query was sent
  has dropped its rows here.  A row is served only while the newest such
  barrier was sent at most `staleness` seconds ago; otherwise the read goes
  to the database.
* **A fill may not undo a drop.**  A read that misses goes to the database
  and then keeps its row; if a change to that path arrived after the read
  was begun, the row it got may predate the change and is not kept.

The clock is passed in (monotonic seconds): the tests drive it by hand.
"""

from __future__ import annotations

import enum
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

# The value statement's row (version, sealed, deleted_at, key_epoch, key_term), or None: no such version.
Row = tuple[Any, ...] | None


class _Miss(enum.Enum):
    MISS = "MISS"


MISS = _Miss.MISS  # `lookup` found nothing it may serve (distinct from a kept None: "no such version")


class ReadCache:
    """Rows by path and version, least recently used dropped first; safe from any thread."""

    def __init__(self, *, staleness: float, max_bytes: int, clock: Callable[[], float]) -> None:
        if staleness <= 0:
            raise ValueError("staleness must be positive")
        self.staleness = staleness
        self._max_bytes = max_bytes
        self._bytes = 0  # sealed bytes kept (plus a little per row), kept under `max_bytes`
        self._clock = clock
        self._lock = threading.Lock()
        self._rows: OrderedDict[str, dict[int, Row]] = OrderedDict()  # least recently used first
        self._changes = 0  # drops so far: a fill remembers the count it began at
        self._dropped_at: dict[str, int] = {}  # path -> `_changes` at its newest drop, kept while fills run
        self._cleared_at = 0  # `_changes` at the newest drop of everything
        self._fills: Counter[int] = Counter()  # fills under way, by the count they began at
        self._barrier_sent: float | None = None  # when the newest answered barrier was sent
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------------ reads

    def lookup(self, path: str, version: int) -> Row | _Miss:
        """The row kept for (path, version) if it may be served now, else `MISS`."""
        now = self._clock()
        with self._lock:
            sent = self._barrier_sent
            versions = self._rows.get(path) if sent is not None and now - sent <= self.staleness else None
            if versions is None or version not in versions:
                self.misses += 1
                return MISS
            self._rows.move_to_end(path)
            self.hits += 1
            return versions[version]

    def begin_fill(self) -> int:
        """Before a read of the database whose row is to be kept: a ticket for `end_fill`."""
        with self._lock:
            ticket = self._changes
            self._fills[ticket] += 1
            return ticket

    def end_fill(self, ticket: int, found: tuple[str, int, Row] | None = None) -> None:
        """The read begun at `ticket` is over: keep what it `found` (path, version, row), unless a change to
        that path (or to everything) was dropped since, when the row may predate that change; None: it
        failed, nothing to keep."""
        with self._lock:
            self._fills[ticket] -= 1
            if not self._fills[ticket]:
                del self._fills[ticket]
            dropped_at = self._dropped_at
            changed = found is not None and (dropped_at.get(found[0], 0) > ticket or self._cleared_at > ticket)
            if not self._fills:
                dropped_at.clear()  # no fill left that could be older than a drop
            if found is None or changed:
                return
            path, version, row = found
            size = _size(path, row)
            if size > self._max_bytes // 4:
                return  # one row may not push a quarter of the others out
            versions = self._rows.get(path)
            if versions is None:
                versions = self._rows[path] = {}
            else:
                self._rows.move_to_end(path)
                self._bytes -= _size(path, versions.get(version, MISS))
            versions[version] = row
            self._bytes += size
            while self._bytes > self._max_bytes:
                self._forget(next(iter(self._rows)))

    # ------------------------------------------------------------------ changes

    def drop(self, paths: list[str]) -> None:
        """These paths changed: forget their rows (and refuse fills begun before now)."""
        with self._lock:
            self._changes += 1
            for path in paths:
                self._forget(path)
                if self._fills:
                    self._dropped_at[path] = self._changes

    def drop_all(self) -> None:
        """Anything may have changed (notifications were missed, or a change named no path)."""
        with self._lock:
            self._changes += 1
            self._cleared_at = self._changes
            self._rows.clear()
            self._bytes = 0
            self._dropped_at.clear()

    def _forget(self, path: str) -> None:
        versions = self._rows.pop(path, None)
        if versions is not None:
            self._bytes -= sum(_size(path, row) for row in versions.values())

    def barrier(self, sent: float) -> None:
        """A barrier sent at `sent` was answered: every change committed before then has been dropped."""
        with self._lock:
            if self._barrier_sent is None or sent > self._barrier_sent:
                self._barrier_sent = sent

    def unsure(self) -> None:
        """The listener lost its connection: nothing may be served until a new barrier is answered."""
        with self._lock:
            self._barrier_sent = None

    def fresh(self) -> bool:
        """Whether a hit could be served now (the listener keeps this true while reads come)."""
        sent = self._barrier_sent
        return sent is not None and self._clock() - sent <= self.staleness

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def size(self) -> int:
        """Bytes kept, as counted against `max_bytes`."""
        return self._bytes


_ROW_OVERHEAD = 200  # bytes a kept row costs besides its blob and path (tuple, dict slot, float, ints)


def _size(path: str, row: Row | _Miss) -> int:
    if row is MISS:
        return 0
    sealed = row[1] if row is not None else None
    return _ROW_OVERHEAD + len(path) + (len(sealed) if isinstance(sealed, bytes) else 0)
