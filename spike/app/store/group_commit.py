"""The group commit both backends' writer threads run on: writes queued, handed out in batches, answered.

Each backend has one writer thread.  It blocks for one write, then takes every write that arrived
meanwhile, so that one transaction (one fsync, one WAL flush) answers all of them; each caller's
future is settled only once the batch is committed, or known not to be.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

W = TypeVar("W")
T = TypeVar("T")

# What one write of a batch came to: its caller's future, and what the write returned or raised.
WriteOutcome = tuple[Future[Any], Any, BaseException | None]
MAX_BATCH = 512  # writes committed together at most


class WriteQueue(Generic[W]):
    """The writes waiting for a backend's writer thread, handed out in batches."""

    def __init__(self) -> None:
        self._waiting: queue.SimpleQueue[W | None] = queue.SimpleQueue()  # None: stop
        self._stopped = False

    def put(self, write: W) -> None:
        self._waiting.put(write)

    def stop(self) -> None:
        """The writer's next batch is None, after the writes already queued."""
        self._waiting.put(None)

    def qsize(self) -> int:
        return self._waiting.qsize()

    def next_batch(self) -> list[W] | None:
        """Wait for a write and return it with the ones waiting behind it; None once stopped."""
        first = None if self._stopped else self._waiting.get()
        if first is None:
            return None
        return [first, *self.waiting(MAX_BATCH - 1)]

    def waiting(self, limit: int) -> list[W]:
        """Up to `limit` of the writes queued now, without waiting for more."""
        taken: list[W] = []
        while not self._stopped and len(taken) < limit:
            try:
                write = self._waiting.get_nowait()
            except queue.Empty:
                break
            if write is None:
                self._stopped = True  # what was taken is still committed; the next batch says stop
                break
            taken.append(write)
        return taken


def settle(outcomes: Iterable[WriteOutcome]) -> None:
    """Answer each write's caller, once its batch is committed (or known not to be)."""
    for future, result, failure in outcomes:
        if failure is None:
            future.set_result(result)
        else:
            future.set_exception(failure)


def resolved(call: Callable[[], T]) -> Future[T]:
    """A future already settled with what `call()` returned or raised (a read done on the caller's thread)."""
    future: Future[T] = Future()
    try:
        future.set_result(call())
    except Exception as exc:
        future.set_exception(exc)
    return future
