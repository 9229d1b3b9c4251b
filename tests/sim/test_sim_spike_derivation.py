"""The simulation with SPIKE's shard derivation (`--shard-derivation spike`): every custody and rotation check holds.

SPIKE's shards depend on the key alone (no epoch input): the runs below check
that nothing in custody leaned on the epoch being in the shard bytes.  A stale
shard is then one of the previous epoch's key (`World._stale_key`).  Fewer
seeds than the main batches: the machine is the same, only the bytes differ.
"""

from __future__ import annotations

import os

import pytest

from spike.protocol import RequestKind, SendRequest, ShardDerivation
from tests.sim.checks import (
    check_key_in_use_is_real,
    check_late_answers_change_nothing,
    check_pushes_are_own_and_ready,
    check_recovered_from_genuine_shards,
    check_wrong_shards_reported,
    late_recoveries,
    slow_reseeds,
)
from tests.sim.custody_sim import Run, SimConfig, simulate
from tests.sim.rotation_checks import ALL, every

SEEDS = int(os.environ.get("SPIKE_SIM_SPIKE_DERIVATION_SEEDS", "300"))
SPIKE = ShardDerivation.SPIKE
MAIN = SimConfig(intervals=25, derivation=SPIKE)
ROTATING = SimConfig(intervals=25, rotations=1.0, rekeys=True, go_rotations=True, derivation=SPIKE)


@pytest.fixture(scope="module")
def spike_runs() -> list[Run]:
    return [simulate(seed, MAIN) for seed in range(9_000_000, 9_000_000 + SEEDS)]


@pytest.fixture(scope="module")
def spike_rotation_runs() -> list[Run]:
    return [simulate(seed, ROTATING) for seed in range(9_500_000, 9_500_000 + SEEDS // 2)]


def test_custody_checks_hold_with_spike_derivation(spike_runs: list[Run]) -> None:
    pushes = sum(
        isinstance(e, SendRequest) and e.kind is RequestKind.PUSH for run in spike_runs for _, _, e in run.trace
    )
    assert pushes >= 100  # re-seeds happened, so the pushes check below checked SPIKE's bytes
    check_key_in_use_is_real(spike_runs)
    check_recovered_from_genuine_shards(spike_runs)
    check_pushes_are_own_and_ready(spike_runs)
    check_wrong_shards_reported(spike_runs)
    check_late_answers_change_nothing(spike_runs)
    problems = [p for run in spike_runs for p in (*late_recoveries(run), *slow_reseeds(run))]
    problems += every(spike_runs, *ALL)
    assert not problems, "\n".join(problems[:20])


def test_rotations_and_rekeys_hold_with_spike_derivation(spike_rotation_runs: list[Run]) -> None:
    problems = every(spike_rotation_runs, *ALL)
    assert not problems, "\n".join(problems[:20])
    check_key_in_use_is_real(spike_rotation_runs)
    assert [run.scenario.seed for run in spike_rotation_runs if run.cannot_happen] == []
