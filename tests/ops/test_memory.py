"""spike.app.memory's decisions, in this process: the log line, and when a flood is over.

What the calls do to a real process is checked on real keepers and Nexus in
tests/e2e/test_process_hardening.py and tests/reliability/test_connection_floods.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest

from spike.app.memory import AfterFloods, Protection

MiB = 1024 * 1024


def test_the_line_says_what_was_done_and_what_was_not() -> None:
    full = Protection(not_dumpable=True, core_limit_zero=True, locked=True, not_locked_because="")
    assert (
        full.line("Nexus") == "Nexus memory: core dumps off (not dumpable, core size limit 0); memory locked (mlockall)"
    )
    partial = Protection(True, True, False, "RLIMIT_MEMLOCK is 64 KiB, ...")
    assert partial.line("keeper") == (
        "keeper memory: core dumps off (not dumpable, core size limit 0); "
        "memory NOT locked: RLIMIT_MEMLOCK is 64 KiB, ..."
    )
    nothing = Protection(False, False, False, "not supported on darwin")
    assert nothing.line("keeper") == (
        "keeper memory: nothing could be done; core dumps not fully off (still dumpable, core limit not 0); "
        "memory NOT locked: not supported on darwin"
    )


def test_a_partial_protection_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "spike.memory")
    Protection(True, True, True, "").say("Nexus")
    Protection(True, True, False, "no").say("Nexus")
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.WARNING]


@dataclass
class Held:
    buffered: int = 0
    buffered_peak: int = 0


def test_freed_memory_is_given_back_once_a_flood_has_been_over_for_a_while(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "spike.memory")
    server = Held()
    after = AfterFloods(server, high=16 * MiB, low=1 * MiB, settle=3)

    def tick(buffered: int, peak: int | None = None) -> int:
        server.buffered = buffered
        if peak is not None:
            server.buffered_peak = peak
        after()
        return sum("freed memory given back" in r.message for r in caplog.records)

    assert tick(8 * MiB, 8 * MiB) == 0  # never a flood: nothing to do
    assert [tick(0) for _ in range(5)] == [0] * 5
    assert tick(60 * MiB, 64 * MiB) == 0  # a flood under way
    assert [tick(0), tick(0)] == [0, 0]
    assert tick(5 * MiB) == 0  # not over yet: the quiet seconds start again
    assert [tick(0), tick(0), tick(0)] == [0, 0, 1]  # three quiet seconds: given back, once
    assert [tick(0) for _ in range(5)] == [1] * 5
    assert server.buffered_peak == 0
