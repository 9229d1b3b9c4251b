"""ADR-0022 in the simulation: every keeper is polled on its fixed schedule whatever it answers.

A schedule segment starts when a Nexus instance starts or is initialised and
ends at the next such moment (or at the end of the run).  Within a segment,
every keeper's first poll is immediate, the first gap is its phase offset plus
one interval (within ``[I(1-j), I(2+j)]``), every later gap is one interval
give or take twice the jitter, and polling goes on until the segment ends.
"""

from __future__ import annotations

from tests.sim.checks import schedule_problems
from tests.sim.custody_sim import Polled, Run


def test_every_keeper_is_polled_on_its_schedule_whatever_it_answers(sim_runs: list[Run]) -> None:
    problems = [p for run in sim_runs for p in schedule_problems(run)]
    assert not problems, "\n".join(problems[:20])


def test_polls_go_on_for_the_whole_run(sim_runs: list[Run]) -> None:
    for run in sim_runs:
        last = {k: 0.0 for k in run.scenario.keeper_ids}
        for fact in run.facts:
            if isinstance(fact, Polled):
                last[fact.keeper_id] = fact.at
        end = run.config.duration
        limit = run.config.interval * (2 + run.scenario.jitter)
        stale = {k: at for k, at in last.items() if end - at > limit}
        assert not stale, f"seed {run.scenario.seed}: keepers last polled at {stale}"
