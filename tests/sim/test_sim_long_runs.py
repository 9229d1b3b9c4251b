"""Long schedules (300 poll intervals each), off by default: ``pytest tests/sim --run-slow``."""

from __future__ import annotations

import pytest

from tests.sim import checks
from tests.sim import rotation_checks as rotation
from tests.sim.custody_sim import SimConfig, simulate

LONG = SimConfig(intervals=300)
LONG_REKEYS = SimConfig(intervals=300, rotations=1.0, rekeys=True, go_rotations=True)


@pytest.mark.slow
@pytest.mark.parametrize("first_seed", range(1_000_000, 1_000_200, 50))
def test_long_runs_keep_every_custody_rule(first_seed: int) -> None:
    runs = [simulate(seed, LONG) for seed in range(first_seed, first_seed + 50)]
    assert not [p for run in runs for p in checks.schedule_problems(run)]
    assert not [p for run in runs for p in checks.late_recoveries(run)]
    assert not [p for run in runs for p in checks.slow_reseeds(run)]
    checks.check_key_in_use_is_real(runs)
    checks.check_recovered_from_genuine_shards(runs)
    checks.check_pushes_are_own_and_ready(runs)
    checks.check_wrong_shards_reported(runs)
    checks.check_late_answers_change_nothing(runs)
    assert not rotation.every(runs, *rotation.ALL)


@pytest.mark.slow
@pytest.mark.parametrize("first_seed", range(2_000_000, 2_000_100, 50))
def test_long_runs_with_rekeys_keep_a_key(first_seed: int) -> None:
    runs = [simulate(seed, LONG_REKEYS) for seed in range(first_seed, first_seed + 50)]
    assert not rotation.every(runs, *rotation.ALL, rotation.thin_recoveries)
    checks.check_key_in_use_is_real(runs)
