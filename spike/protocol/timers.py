"""The custody machine's timers: one per (kind, keeper), in a heap, with a pure `next_time()`.

Each keeper has at most two timers: its next scheduled poll and the deadline
of its one request in flight; a scheduled rotation has one more.  A timer is named by its key, so setting it
again replaces it and cancelling it needs no search: the heap keeps entries
of replaced or cancelled timers until they reach the top, and every change
clears such entries off the top at once.  So the top is always a live timer,
and asking when the next one is due changes nothing.  An entry is live when
its sequence number is the one its key holds now (no float comparison).
"""

from __future__ import annotations

import heapq
import math
from enum import IntEnum


class TimerKind(IntEnum):
    """What a timer does when it fires; at one instant, lower values fire first."""

    # A request's deadline fires before a poll due at the same instant: deadlines are capped at the
    # next poll, so the request it ends is over before that poll starts another.
    DEADLINE = 0
    POLL = 1
    ROTATE = 2  # a scheduled rotation (`NexusCustody.rotate_at`), filed under keeper id 0


TimerKey = tuple[TimerKind, int]  # (kind, keeper id)


class Timers:
    """At most one timer per key; the earliest fires first (ties: by kind, then in the order set)."""

    __slots__ = ("_heap", "_live", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, TimerKind, int, int]] = []  # (when, kind, seq, keeper id)
        self._live: dict[TimerKey, tuple[int, float]] = {}  # key -> (seq, when) of its live entry
        self._seq = 0

    def set(self, key: TimerKey, when: float) -> None:
        """Arm `key` to fire at `when`, replacing the time it had."""
        self._seq += 1
        self._live[key] = (self._seq, when)
        heapq.heappush(self._heap, (when, key[0], self._seq, key[1]))
        self._prune()

    def cancel(self, key: TimerKey) -> None:
        """Disarm `key` (nothing happens if it was not armed)."""
        if self._live.pop(key, None) is not None:
            self._prune()

    def when(self, key: TimerKey) -> float | None:
        """When `key` fires, or None if it is not armed."""
        live = self._live.get(key)
        return None if live is None else live[1]

    def next_time(self) -> float:
        """When the earliest timer fires (``inf`` if none).  A pure query."""
        return self._heap[0][0] if self._heap else math.inf

    def pop_due(self, now: float) -> tuple[TimerKey, float] | None:
        """Disarm and return the earliest timer due at `now` (with its time), or None."""
        heap = self._heap
        if not heap or heap[0][0] > now:
            return None
        when, kind, _, keeper_id = heapq.heappop(heap)
        key = (kind, keeper_id)
        del self._live[key]
        self._prune()
        return key, when

    def __len__(self) -> int:
        return len(self._live)

    def _prune(self) -> None:
        heap, live = self._heap, self._live
        while heap:
            _, kind, seq, keeper_id = heap[0]
            current = live.get((kind, keeper_id))
            if current is not None and current[0] == seq:
                return
            heapq.heappop(heap)
