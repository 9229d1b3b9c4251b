"""ADR-0022 in the simulation: every keeper is polled on its fixed schedule whatever it answers.

A schedule segment starts when a Nexus instance starts or is initialised and
ends at the next such moment (or at the end of the run).  Within a segment,
every keeper's first poll is immediate, the first gap is its phase offset plus
one interval (within ``[I(1-j), I(2+j)]``), every later gap is one interval
give or take twice the jitter, and polling goes on until the segment ends.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

from custody_sim import NexusStarted, Polled, Run, RunEnded

EPSILON = 1e-6


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
