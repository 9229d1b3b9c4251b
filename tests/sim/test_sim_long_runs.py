"""Long schedules (300 poll intervals each), off by default: ``pytest tests/sim --run-slow``."""

from __future__ import annotations

import pytest
import test_sim_custody as custody
import test_sim_rotation as rotation
from custody_sim import SimConfig, simulate
from test_sim_schedule import schedule_problems

LONG = SimConfig(intervals=300)
LONG_REKEYS = SimConfig(intervals=300, rotations=1.0, rekeys=True, go_rotations=True)


@pytest.mark.slow
@pytest.mark.parametrize("first_seed", range(1_000_000, 1_000_200, 50))
def test_long_runs_keep_every_custody_rule(first_seed: int) -> None:
    runs = [simulate(seed, LONG) for seed in range(first_seed, first_seed + 50)]
    assert not [p for run in runs for p in schedule_problems(run)]
    assert not [p for run in runs for p in custody.late_recoveries(run)]
    assert not [p for run in runs for p in custody.slow_reseeds(run)]
    custody.test_a_key_in_use_is_always_the_real_key(runs)
    custody.test_a_key_is_recovered_only_from_threshold_genuine_shards(runs)
    custody.test_pushes_carry_the_keepers_own_shard_and_happen_only_when_ready(runs)
    custody.test_wrong_shards_are_reported_with_the_keepers_id(runs)
    custody.test_late_answers_change_nothing(runs)
    assert not rotation.every(runs, *rotation.ALL)


@pytest.mark.slow
@pytest.mark.parametrize("first_seed", range(2_000_000, 2_000_100, 50))
def test_long_runs_with_rekeys_keep_a_key(first_seed: int) -> None:
    runs = [simulate(seed, LONG_REKEYS) for seed in range(first_seed, first_seed + 50)]
    assert not rotation.every(runs, *rotation.ALL, rotation.thin_recoveries)
    custody.test_a_key_in_use_is_always_the_real_key(runs)
