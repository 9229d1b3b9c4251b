"""Seeded simulation runs, shared by every check in tests/sim.

The runs are made once per batch of seeds and handed to every test that asks
for `sim_runs`; pytest groups the tests by batch, so only one batch is in
memory at a time.  ``SPIKE_SIM_SEEDS=20000 pytest tests/sim`` runs more.
"""

from __future__ import annotations

import os

import pytest
from custody_sim import Run, SimConfig, simulate

SEEDS = int(os.environ.get("SPIKE_SIM_SEEDS", "2000"))
BATCH = 100
CONFIG = SimConfig(intervals=int(os.environ.get("SPIKE_SIM_INTERVALS", "25")))


def _batches() -> list[range]:
    return [range(start, min(start + BATCH, SEEDS)) for start in range(0, SEEDS, BATCH)]


@pytest.fixture(scope="session", params=_batches(), ids=lambda seeds: f"seeds-{seeds.start}-{seeds.stop - 1}")
def sim_runs(request: pytest.FixtureRequest) -> list[Run]:
    seeds: range = request.param
    return [simulate(seed, CONFIG) for seed in seeds]


@pytest.fixture(scope="session")
def sim_config() -> SimConfig:
    return CONFIG
