"""Key rotation and rekey in the simulation (docs/key-lifecycle.md): never neither key, whatever is killed when.

Two batches: `sim_runs` (half of the scenarios rotate, with keepers that keep
two shards; every check of test_sim_custody.py and test_sim_schedule.py runs
on them too) and `rotation_runs` (every scenario rotates, rekeys move custody
to other keeper sets and thresholds, live or through a Nexus restarted with a
new configuration, and SPIKE-style single-slot keepers rotate too).  In both,
rotations start and are given up at random moments, Nexus is killed between
every pair of steps (the store writes late, acknowledges later, and Nexus
dies in between), keepers restart, go silent, answer garbage, get garbage
planted.  The checks:

* never neither: whenever enough keepers kept what they were given, the store
  and the keepers hold a rebuildable key, the old one or the new one;
* a commit counts only keepers that showed their new shard, at least t' of them;
* nothing of a new epoch reaches a keeper before the store holds it;
* epochs only grow, and are never used twice;
* rotations finish when nothing gets in their way, and leave no old shard behind;
* no keeper is dropped: a keeper leaves the poll list only when a rekey removed
  it and it was cleared; every other one is polled until the end;
* the key in use is always the real one, rebuilt from its threshold of genuine shards;
* no answer ever hits a row the rules table calls impossible.
"""

from __future__ import annotations

from collections import Counter

from spike.protocol import RotationStage
from tests.sim.checks import check_key_in_use_is_real
from tests.sim.custody_sim import (
    FaultKind,
    Held,
    KeeperGone,
    Members,
    NexusStarted,
    RotationAsked,
    RotationStep,
    Run,
    SimConfig,
    Stored,
    simulate,
)
from tests.sim.rotation_checks import (
    ALL,
    UNDER_WAY,
    every,
    old_shards_left,
    stuck_rotations,
    thin_recoveries,
)

# ---------------------------------------------------------------------------- the checks, on both batches


def test_rotations_keep_a_key_and_finish_in_the_main_batch(sim_runs: list[Run]) -> None:
    problems = every(sim_runs, *ALL)
    assert not problems, "\n".join(problems[:20])


def test_rotations_and_rekeys_keep_a_key_and_finish(rotation_runs: list[Run]) -> None:
    problems = every(rotation_runs, *ALL, thin_recoveries)
    assert not problems, "\n".join(problems[:20])
    check_key_in_use_is_real(rotation_runs)
    assert [run.scenario.seed for run in rotation_runs if run.cannot_happen] == []


# ---------------------------------------------------------------------------- the batches exercise it all


def stage_at_kills(run: Run) -> Counter[str]:
    """Where each Nexus kill fell in a rotation's life (what the store held, what Nexus had been told)."""
    seen: Counter[str] = Counter()
    stage: RotationStage | None = None
    written = False
    for fact in run.facts:
        if isinstance(fact, RotationStep):
            stage, written = (fact.stage if fact.stage in UNDER_WAY else None), False
        elif isinstance(fact, Stored):
            written = True
        elif isinstance(fact, NexusStarted) and fact.reason == "restart":
            name = "idle" if stage is None else stage.value
            seen[f"killed-{name}{'-written' if written and stage is not None else ''}"] += 1
            stage, written = None, False
    return seen


def exercised(runs: list[Run]) -> Counter[str]:
    seen: Counter[str] = Counter()
    for run in runs:
        seen += stage_at_kills(run)
        seen["stuck-checked"] += stuck_rotations(run)[1]
        seen["retired-checked"] += old_shards_left(run)[1]
        for fact in run.facts:
            if isinstance(fact, Stored):
                seen[f"stored-{fact.what}"] += 1
            elif isinstance(fact, RotationAsked) and fact.refused:
                seen["refused"] += 1
            elif isinstance(fact, KeeperGone):
                seen["keeper-left"] += 1
            elif isinstance(fact, Held) and fact.pending_epoch is not None and fact.single:
                seen["single-slot-rotating"] += 1
            elif isinstance(fact, Members) and fact.at > 0:
                seen["members-changed"] += 1
        seen["rekey-restart"] += sum(f.kind is FaultKind.REKEY_RESTART for f in run.scenario.faults)
    return seen


def test_the_main_batch_rotates_and_kills_nexus_around_rotations(sim_runs: list[Run]) -> None:
    seen = exercised(sim_runs)
    expected = ["stored-persist", "stored-commit", "refused", "retired-checked", "killed-idle", "killed-dealing"]
    missing = [name for name in expected if not seen[name]]
    assert not missing, f"this batch never exercised {missing}: {dict(seen)}"


def test_the_rotation_batch_rekeys_with_every_kind_of_keeper(rotation_runs: list[Run]) -> None:
    seen = exercised(rotation_runs)
    expected = [
        "stored-persist", "stored-commit", "refused", "keeper-left", "single-slot-rotating", "members-changed",
        "rekey-restart", "killed-dealing",
    ]  # fmt: skip
    missing = [name for name in expected if not seen[name]]
    assert not missing, f"this batch never exercised {missing}: {dict(seen)}"


KILLING = SimConfig(intervals=25, rotations=1.0, kill_around_writes=0.7)
CALM = SimConfig(intervals=25, rotations=1.0, calm=True, kill_around_writes=0.0)


def test_nexus_killed_between_every_pair_of_steps_comes_back_with_one_key() -> None:
    """A kill before each store write (which may land or not), between each write and its acknowledgement, and
    while dealing, in every stage; the checks hold after each."""
    runs = [simulate(seed, KILLING) for seed in range(7_000_000, 7_000_200)]
    problems = every(runs, *ALL)
    assert not problems, "\n".join(problems[:20])
    seen = exercised(runs)
    stages = ["persisting", "dealing", "committing", "abandoning"]
    expected = [
        "killed-idle",
        *(f"killed-{s}" for s in stages),
        *(f"killed-{s}-written" for s in ("persisting", "committing", "abandoning")),
    ]
    missing = [name for name in expected if not seen[name]]
    assert not missing, f"never killed at {missing}: {dict(seen)}"


def test_rotations_finish_and_leave_no_old_shard_when_nothing_gets_in_their_way() -> None:
    runs = [simulate(seed, CALM) for seed in range(8_000_000, 8_000_100)]
    stuck = [p for run in runs for p in stuck_rotations(run)[0]]
    left = [p for run in runs for p in old_shards_left(run)[0]]
    assert not stuck and not left, "\n".join((stuck + left)[:20])
    assert sum(stuck_rotations(run)[1] for run in runs) >= 50
    assert sum(old_shards_left(run)[1] for run in runs) >= 50
