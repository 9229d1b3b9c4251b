"""docs/design.md section 2 in the simulation: key recovery, re-seeding and reporting under faults.

Bounds used below, with I the poll interval, j the jitter and L the largest
latency of a reachable keeper:

* recovery: once t keepers hold their current shard and stay reachable, the
  Nexus is READY within ``I(2+j) + L`` (one poll of each, the longest gap being
  the first one of a schedule) -- whatever else is failing around them;
* re-seeding: a reachable keeper that lacks its shard while Nexus is READY
  holds it again within ``2L`` of its next poll, and that poll comes within one
  interval plus jitter (test_sim_schedule.py checks the gaps).
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.sim.checks import (
    check_key_in_use_is_real,
    check_late_answers_change_nothing,
    check_pushes_are_own_and_ready,
    check_recovered_from_genuine_shards,
    check_wrong_shards_reported,
    late_recoveries,
    slow_reseeds,
)
from tests.sim.custody_sim import (
    FaultKind,
    LateAnswer,
    NewerEpochShown,
    OperatorShard,
    Pushed,
    Recovered,
    Run,
    RunEnded,
    ShardAnswered,
    SimConfig,
    WrongShard,
    simulate,
)


def test_a_key_in_use_is_always_the_real_key(sim_runs: list[Run]) -> None:
    check_key_in_use_is_real(sim_runs)


def test_a_key_is_recovered_only_from_threshold_genuine_shards(sim_runs: list[Run]) -> None:
    check_recovered_from_genuine_shards(sim_runs)


def test_the_key_is_recovered_once_threshold_keepers_hold_their_shard(sim_runs: list[Run]) -> None:
    problems = [p for run in sim_runs for p in late_recoveries(run)]
    assert not problems, "\n".join(problems[:20])


def test_reachable_keepers_are_reseeded_after_their_next_poll(sim_runs: list[Run]) -> None:
    problems = [p for run in sim_runs for p in slow_reseeds(run)]
    assert not problems, "\n".join(problems[:20])


def test_pushes_carry_the_keepers_own_shard_and_happen_only_when_ready(sim_runs: list[Run]) -> None:
    check_pushes_are_own_and_ready(sim_runs)


def test_wrong_shards_are_reported_with_the_keepers_id(sim_runs: list[Run]) -> None:
    check_wrong_shards_reported(sim_runs)


def test_late_answers_change_nothing(sim_runs: list[Run]) -> None:
    check_late_answers_change_nothing(sim_runs)


def test_the_batch_exercises_every_fault_and_outcome(sim_runs: list[Run]) -> None:
    """Guard against a vacuous simulation: each batch must hit the cases the checks are about."""
    seen: Counter[str] = Counter()
    for run in sim_runs:
        seen.update(f.kind.value for f in run.scenario.faults)
        seen["go-keepers"] += bool(run.scenario.go_keepers)
        seen.update(f"mode-{f.mode.value}" for f in run.scenario.faults if f.kind is FaultKind.KEEPER_MODE)
        for fact in run.facts:
            if isinstance(fact, Recovered):
                seen[f"recovered-{fact.source}"] += 1
            elif isinstance(fact, ShardAnswered) and fact.record_known and not fact.own_shard:
                seen["wrong-shard-answered"] += 1
            elif isinstance(fact, Pushed):
                seen["push"] += 1
            elif isinstance(fact, LateAnswer):
                seen["late-answer"] += 1
            elif isinstance(fact, OperatorShard):
                seen["operator-shard"] += 1
        final = run.facts[-1]
        assert isinstance(final, RunEnded)
        seen[f"ended-{final.phase.value}"] += 1
    expected = [
        "keeper-restart",
        "go-keepers",
        "keeper-corrupt",
        "nexus-restart",
        "bootstrap",
        "mode-refusing",
        "mode-silent",
        "mode-slow",
        "mode-garbage",
        "recovered-keepers",
        "wrong-shard-answered",
        "push",
        "late-answer",
        "ended-ready",
        "ended-recovering",
    ]
    missing = [name for name in expected if not seen[name]]
    assert not missing, f"this batch never exercised {missing}: {dict(seen)}"


def test_the_batch_exercises_epochs_the_deployment_never_had(sim_runs: list[Run]) -> None:
    """Issue 14 L2 in the simulation: shards labelled with epochs never had, newer and older, are planted.

    The checks above then cover them like any wrong shard: reported when answered
    (the world answers `NewerKeySeen` with `confirm_record`, as Nexus on SQLite does),
    and re-seeded after the keeper's next poll once Nexus is READY.
    """
    seen: Counter[str] = Counter()
    for run in sim_runs:
        planted = [f.wrong for f in run.scenario.faults if f.kind is FaultKind.KEEPER_CORRUPT]
        planted += [wrong for _, wrong, _ in run.scenario.initially if wrong is not None]
        seen.update(w.value for w in planted if w in (WrongShard.NEVER_HAD_NEWER, WrongShard.NEVER_HAD_OLDER))
        seen["newer-epoch-shown"] += sum(isinstance(f, NewerEpochShown) for f in run.facts)
        for fact in run.facts:
            if isinstance(fact, NewerEpochShown):
                assert fact.epoch > run.scenario.epoch, f"seed {run.scenario.seed}: {fact}"
    missing = [name for name in ("never-had-newer", "never-had-older", "newer-epoch-shown") if not seen[name]]
    assert not missing, f"this batch never exercised {missing}: {dict(seen)}"


def test_no_answer_ever_hits_a_row_the_rules_table_calls_impossible(sim_runs: list[Run]) -> None:
    """spike/protocol/custody_rules.py marks some (phase, request, outcome) combinations unreachable: they are."""
    assert [run.scenario.seed for run in sim_runs if run.cannot_happen] == []


@pytest.mark.parametrize("seed", [2569, 2699, 2863])
def test_seeds_found_outside_the_default_batch_reseed_in_time(seed: int, sim_config: SimConfig) -> None:
    """2569 and 2863: a re-seed between a commit's write and Nexus hearing of it (the check's clock restarts
    at the commit); 2699: a keeper corrupted between a read and a deal (the deal's keep_commitment)."""
    assert slow_reseeds(simulate(seed, sim_config)) == []
