"""Nexus's periodic summaries in-process: what stays wrong is said again now and then, never once per poll.

`Summaries` runs once a second in `spike nexus`; here it is called on a
hand-moved clock.  While Nexus waits for shards it says so after two poll
intervals and then every `waiting_every` seconds; while a keeper stays
without its shard (ready Nexus), every `keepers_every` seconds; and nothing
once everything is well.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from spike.app.config import KEEPER_SUMMARY_EVERY, WAITING_SUMMARY_EVERY
from spike.app.nexus.summaries import Summaries
from tests.ops.ops_helpers import SHARES, URLS, Node, shard_answer


def run_for(node: Node, summaries: Summaries, seconds: int, caplog: pytest.LogCaptureFixture) -> list[str]:
    """Call the summaries once per second for `seconds`; the lines they logged."""
    caplog.clear()
    for _ in range(seconds):
        node.driver.clock += 1
        summaries()
    return [r.getMessage() for r in caplog.records if r.name == "spike.nexus"]


def test_defaults_are_30_seconds_and_5_minutes() -> None:
    assert (WAITING_SUMMARY_EVERY, KEEPER_SUMMARY_EVERY) == (30.0, 300.0)


def test_waiting_is_said_after_two_intervals_then_every_period(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    node.driver.tick(0.0)
    node.driver.answer(1, 404)
    node.driver.answer(2, None)
    node.driver.answer(3, 200, shard_answer(SHARES[3]))
    summaries = Summaries(node.driver, URLS, waiting_every=4, keepers_every=1000)  # type: ignore[arg-type]
    assert node.custody.schedule.interval == 5  # the first line after 10 s of waiting

    lines = run_for(node, summaries, 10, caplog)  # it sees the wait at its first call, 1 s in
    assert lines == []
    lines = run_for(node, summaries, 13, caplog)
    assert len(lines) == 4, lines  # 10, 14, 18 and 22 s after it saw the wait
    assert lines[0] == (
        "waiting for shards: 1 more verified shard(s) needed of 2 "
        "(keepers: 1=empty, 2=unreachable, 3=holding); polling continues every 5s"
    )

    node.driver.submit_shard(SHARES[1])  # the operator restores: ready, and quiet
    assert run_for(node, summaries, 20, caplog) == []


def test_an_uninitialised_nexus_says_it_waits_for_bootstrap(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    empty = Node(tmp_path / "empty", initialised=False)
    try:
        summaries = Summaries(empty.driver, URLS, waiting_every=5)  # type: ignore[arg-type]
        lines = run_for(empty, summaries, 21, caplog)
        assert len(lines) == 3 and all("waiting for `spike bootstrap`" in line for line in lines), lines
    finally:
        empty.close()


def test_a_keeper_without_its_shard_is_said_again_every_period(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    node.driver.tick(0.0)
    node.driver.answer(1, 200, shard_answer(SHARES[1]))
    node.driver.answer(2, 200, shard_answer(SHARES[2]))  # the key is rebuilt: ready
    node.driver.answer(3, None)  # keeper 3 is down from now on
    summaries = Summaries(node.driver, URLS, waiting_every=1, keepers_every=6)  # type: ignore[arg-type]

    lines = run_for(node, summaries, 5, caplog)
    assert lines == []  # not yet down for a whole period
    lines = run_for(node, summaries, 13, caplog)
    assert len(lines) == 3, lines  # at 6, 12 and 18 s
    assert lines[0].startswith(f"keeper 3 ({URLS[3]}) still unreachable since ")
    assert "(1 polls, 0 empty, 1 failed); shard redundancy 0" in lines[0]
    assert not [line for line in lines if "keeper 1" in line or "keeper 2" in line]

    # It comes back empty: Nexus re-seeds it on its next poll, and the summaries stop.
    node.driver.tick()
    assert sorted(node.driver.pending) == [1, 2, 3]
    node.driver.answer(1, 200, shard_answer(SHARES[1]))
    node.driver.answer(2, 200, shard_answer(SHARES[2]))
    node.driver.answer(3, 404)
    node.driver.answer(3, 200)  # the push
    node.driver.answer(3, 200, shard_answer(SHARES[3]))  # read back
    assert node.custody.redundancy == 1
    assert run_for(node, summaries, 20, caplog) == []


def test_keepers_that_answer_empty_leave_only_restore_and_the_log_says_so(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """Keepers 1 and 2 restarted (empty), keeper 3 holds: one shard short, and no keeper can give it."""
    caplog.set_level(logging.INFO)
    node.driver.tick(0.0)
    node.driver.answer(1, 404)
    node.driver.answer(2, 404)
    node.driver.answer(3, 200, shard_answer(SHARES[3]))
    summaries = Summaries(node.driver, URLS, waiting_every=4, keepers_every=1000)  # type: ignore[arg-type]
    lines = run_for(node, summaries, 11, caplog)
    assert len(lines) == 2, lines
    assert lines[0].startswith("waiting for shards: 1 more verified shard(s) needed of 2")
    assert lines[1] == (
        "the root key cannot come back from the keepers: keeper(s) 1, 2 answered without their shard "
        "(a restarted keeper is empty); restore it with `spike operator restore` and the recovery shards "
        "of key epoch 1 that `spike operator recover` exported: 1 of keeper(s) 1, 2"
    )
    (stranded,) = [r for r in caplog.records if getattr(r, "event", "") == "key_stranded"]
    assert stranded.levelname == "WARNING" and stranded.keeper_ids == [1, 2]  # type: ignore[attr-defined]

    node.driver.tick(node.driver.clock)
    while 2 not in node.driver.pending:
        node.driver.tick()
    node.driver.answer(2, None)  # keeper 2 is unreachable now: it may still hold its shard, so no such line
    lines = run_for(node, summaries, 4, caplog)
    assert len(lines) == 1 and lines[0].startswith("waiting for shards"), lines
