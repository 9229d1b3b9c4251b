"""Seeded simulation runs, shared by every check in tests/sim.

The runs are made once per batch of seeds and handed to every test that asks
for `sim_runs` (half of them rotate keys) or `rotation_runs` (all rotate,
with rekeys and SPIKE-style keepers); pytest groups the tests by batch, so
only one batch is in memory at a time.  ``SPIKE_SIM_SEEDS=20000
SPIKE_SIM_ROTATION_SEEDS=10000 pytest tests/sim`` runs more.
"""

from __future__ import annotations

import os

import pytest

from tests.sim.custody_sim import Run, SimConfig, simulate

SEEDS = int(os.environ.get("SPIKE_SIM_SEEDS", "2000"))
BATCH = 100
CONFIG = SimConfig(intervals=int(os.environ.get("SPIKE_SIM_INTERVALS", "25")))
# Every scenario rotates; rekeys move custody between keeper sets and thresholds; SPIKE-style keepers rotate too.
ROTATION_SEEDS = int(os.environ.get("SPIKE_SIM_ROTATION_SEEDS", "1000"))
ROTATION_CONFIG = SimConfig(
    intervals=int(os.environ.get("SPIKE_SIM_INTERVALS", "25")), rotations=1.0, rekeys=True, go_rotations=True
)


def _batches() -> list[range]:
    return [range(start, min(start + BATCH, SEEDS)) for start in range(0, SEEDS, BATCH)]


@pytest.fixture(scope="session", params=_batches(), ids=lambda seeds: f"seeds-{seeds.start}-{seeds.stop - 1}")
def sim_runs(request: pytest.FixtureRequest) -> list[Run]:
    seeds: range = request.param
    return [simulate(seed, CONFIG) for seed in seeds]


@pytest.fixture(scope="session")
def sim_config() -> SimConfig:
    return CONFIG


def _rotation_batches() -> list[range]:
    first = 5_000_000  # other seeds than the main batch's
    return [
        range(start, min(start + BATCH, first + ROTATION_SEEDS))
        for start in range(first, first + ROTATION_SEEDS, BATCH)
    ]


@pytest.fixture(
    scope="session", params=_rotation_batches(), ids=lambda seeds: f"rotation-seeds-{seeds.start}-{seeds.stop - 1}"
)
def rotation_runs(request: pytest.FixtureRequest) -> list[Run]:
    seeds: range = request.param
    return [simulate(seed, ROTATION_CONFIG) for seed in seeds]
