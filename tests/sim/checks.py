"""The simulation's checks of docs/design.md sections 2 and 8, shared by the tests that run them.

Each takes the runs of a batch (or one run) and returns the problems it found, or raises
AssertionError: the tests assert on real batches, and test_sim_checks_can_fail.py runs the
same checks against mutant Nexus machines to show that each one can fail.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

from spike.protocol import Phase
from spike.protocol.effects import RotationStage
from tests.sim.custody_sim import (
    KeeperHolds,
    KeeperMode,
    LateAnswer,
    Mode,
    NexusStarted,
    PhaseIs,
    Polled,
    Pushed,
    Recovered,
    RotationStep,
    Run,
    RunEnded,
    ShardAnswered,
)

EPSILON = 1e-6
STATE_FACTS = (KeeperHolds, KeeperMode, PhaseIs, NexusStarted, RunEnded)


def late_recoveries(run: Run) -> list[str]:
    """Moments where t keepers held their shard and were reachable long enough, yet no key."""
    scenario, config = run.scenario, run.config
    window = config.interval * (2 + scenario.jitter) + config.max_latency + EPSILON
    holds = dict.fromkeys(scenario.keeper_ids, False)
    up = dict.fromkeys(scenario.keeper_ids, True)
    phase = Phase.UNINITIALISED
    has_record = False
    since: float | None = None
    problems = []
    # Only these facts change the condition; checking at them (and at the end) finds every late recovery.
    for fact in (f for f in run.facts if isinstance(f, STATE_FACTS)):
        if since is not None and phase is not Phase.READY and fact.at > since + window:
            problems.append(f"seed {scenario.seed}: enough keepers since {since:.3f}, no key at {fact.at:.3f}")
            since = None
        restarted = False
        if isinstance(fact, KeeperHolds):
            holds[fact.keeper_id] = fact.own_shard
        elif isinstance(fact, KeeperMode):
            up[fact.keeper_id] = fact.mode is Mode.UP
        elif isinstance(fact, PhaseIs):
            phase = fact.phase
        elif isinstance(fact, NexusStarted):
            has_record = fact.has_record
            restarted = True
        enough = has_record and sum(holds[k] and up[k] for k in holds) >= scenario.threshold
        if not enough:
            since = None
        elif since is None or restarted:
            since = fact.at
    return problems


def slow_reseeds(run: Run) -> list[str]:
    """Reachable keepers lacking their shard while Nexus is READY, not re-seeded after their next poll.

    A commit changes the epoch in force: a keeper re-seeded at a poll between the commit's write and
    Nexus hearing of it gets the old epoch's shard (in force for Nexus then), and the new one at its next
    poll, so the clock of a keeper still lacking its shard starts again at the commit.
    """
    scenario, config = run.scenario, run.config
    after_poll = 2 * config.max_latency + EPSILON
    longest_gap = config.interval * (2 + scenario.jitter)
    holds = dict.fromkeys(scenario.keeper_ids, False)
    up = dict.fromkeys(scenario.keeper_ids, True)
    phase = Phase.UNINITIALISED
    since: dict[int, float] = {}  # keeper -> when it became reachable, unseeded and under a READY Nexus
    polled: dict[int, float] = {}  # keeper -> its first poll since then
    problems = []
    for fact in (f for f in run.facts if isinstance(f, (*STATE_FACTS, Polled, RotationStep))):
        if isinstance(fact, RotationStep):
            if fact.stage is RotationStage.COMMITTED:
                since = dict.fromkeys(since, fact.at)
                polled.clear()
            continue
        for keeper_id, start in list(since.items()):
            poll = polled.get(keeper_id)
            late = fact.at > poll + after_poll if poll is not None else fact.at > start + longest_gap + after_poll
            if late:
                problems.append(
                    f"seed {scenario.seed}: keeper {keeper_id} unseeded since {start:.3f} "
                    f"(polled at {poll}), still at {fact.at:.3f}"
                )
                del since[keeper_id]
                polled.pop(keeper_id, None)
        if isinstance(fact, KeeperHolds):
            holds[fact.keeper_id] = fact.own_shard
        elif isinstance(fact, KeeperMode):
            up[fact.keeper_id] = fact.mode is Mode.UP
        elif isinstance(fact, PhaseIs):
            phase = fact.phase
        elif isinstance(fact, Polled) and fact.keeper_id in since:
            polled.setdefault(fact.keeper_id, fact.at)
        for keeper_id in scenario.keeper_ids:
            wanted = phase is Phase.READY and up[keeper_id] and not holds[keeper_id]
            if not wanted:
                since.pop(keeper_id, None)
                polled.pop(keeper_id, None)
            elif keeper_id not in since:
                since[keeper_id] = fact.at
    return problems


def schedule_segments(run: Run) -> list[tuple[float, float, dict[int, list[float]]]]:
    """(start, end, poll times per keeper) for every schedule segment of a run."""
    starts = [f.at for f in run.facts if isinstance(f, NexusStarted)]
    end = next(f.at for f in run.facts if isinstance(f, RunEnded))
    bounds = [*starts, end]
    segments: list[tuple[float, float, dict[int, list[float]]]] = [
        (start, stop, defaultdict(list)) for start, stop in itertools.pairwise(bounds)
    ]
    index = -1
    for fact in run.facts:
        if isinstance(fact, NexusStarted):
            index += 1
        elif isinstance(fact, Polled):
            segments[index][2][fact.keeper_id].append(fact.at)
    return segments


def schedule_problems(run: Run) -> list[str]:
    interval = run.config.interval
    jitter = run.scenario.jitter
    first_gap = (interval * (1 - jitter) - EPSILON, interval * (2 + jitter) + EPSILON)
    steady_gap = (interval * (1 - 2 * jitter) - EPSILON, interval * (1 + 2 * jitter) + EPSILON)
    problems = []
    for start, stop, polls in schedule_segments(run):
        if stop == start:
            continue  # two starts at the same instant: nothing could be polled in between
        for keeper_id in run.scenario.keeper_ids:
            times = polls.get(keeper_id, [])
            where = f"seed {run.scenario.seed}, keeper {keeper_id}, segment [{start:.3f}, {stop:.3f})"
            if not times or times[0] != start:
                problems.append(f"{where}: first poll not immediate ({times[:1]})")
                continue
            gaps = [b - a for a, b in itertools.pairwise(times)]
            if gaps and not first_gap[0] <= gaps[0] <= first_gap[1]:
                problems.append(f"{where}: first gap {gaps[0]:.3f} outside {first_gap}")
            for gap in gaps[1:]:
                if not steady_gap[0] <= gap <= steady_gap[1]:
                    problems.append(f"{where}: gap {gap:.3f} outside {steady_gap}")
            allowed = first_gap[1] if len(times) == 1 else steady_gap[1]
            if stop - times[-1] > allowed:
                problems.append(f"{where}: not polled since {times[-1]:.3f}: dropped?")
    return problems


def check_key_in_use_is_real(sim_runs: list[Run]) -> None:
    for run in sim_runs:
        for fact in run.facts:
            if isinstance(fact, Recovered):
                assert fact.key_matches, f"seed {run.scenario.seed}: wrong key in use at {fact.at}"
            elif isinstance(fact, RunEnded):
                assert fact.key_matches in (True, None), f"seed {run.scenario.seed}: wrong key at the end"
                assert (fact.key_matches is None) == (fact.phase is not Phase.READY)


def check_pushes_are_own_and_ready(sim_runs: list[Run]) -> None:
    for run in sim_runs:
        phase = Phase.UNINITIALISED
        for fact in run.facts:
            if isinstance(fact, PhaseIs):
                phase = fact.phase
            elif isinstance(fact, Pushed):
                where = f"seed {run.scenario.seed}, keeper {fact.keeper_id} at {fact.at:.3f}"
                assert fact.own_shard, f"{where}: pushed a shard that is not its own"
                assert phase is Phase.READY, f"{where}: pushed while {phase.value}"


def check_wrong_shards_reported(sim_runs: list[Run]) -> None:
    for run in sim_runs:
        for fact in run.facts:
            if isinstance(fact, ShardAnswered) and fact.record_known:
                where = f"seed {run.scenario.seed}, keeper {fact.keeper_id} at {fact.at:.3f}"
                assert fact.reported != fact.own_shard, f"{where}: own={fact.own_shard} reported={fact.reported}"


def check_recovered_from_genuine_shards(sim_runs: list[Run]) -> None:
    for run in sim_runs:
        for fact in run.facts:
            if isinstance(fact, Recovered):
                where = f"seed {run.scenario.seed} at {fact.at:.3f}"
                assert len(fact.keeper_ids) == run.scenario.threshold, where
                assert set(fact.keeper_ids) <= fact.eligible, f"{where}: used {fact.keeper_ids}, had {fact.eligible}"
                if fact.source == "keepers":
                    assert not set(fact.keeper_ids) - fact.eligible, where


def check_late_answers_change_nothing(sim_runs: list[Run]) -> None:
    for run in sim_runs:
        late = [f for f in run.facts if isinstance(f, LateAnswer) and f.had_effects]
        assert not late, f"seed {run.scenario.seed}: late answers had effects: {late[:3]}"
