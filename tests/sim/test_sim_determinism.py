"""The simulation is a pure function of its seed: the same seed gives the same history."""

from __future__ import annotations

from tests.sim.custody_sim import Run, simulate

REPLAYED_PER_BATCH = 5
DIGESTED_PER_BATCH = 20


def test_the_same_seed_gives_the_same_history(sim_runs: list[Run]) -> None:
    for run in sim_runs[:REPLAYED_PER_BATCH]:
        again = simulate(run.scenario.seed, run.config)
        assert again.digest() == run.digest(), f"seed {run.scenario.seed} is not reproducible"
        assert again.facts == run.facts
        assert again.scenario == run.scenario


def test_different_seeds_give_different_histories(sim_runs: list[Run]) -> None:
    runs = sim_runs[:DIGESTED_PER_BATCH]
    assert len({run.digest() for run in runs}) == len(runs)
