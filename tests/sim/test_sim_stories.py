"""Hand-written scenarios: single stories from docs/design.md section 2, with their exact outcomes.

The seeded runs check the rules over thousands of random schedules; these
pin down what must happen, and when, in the stories an operator cares about.
"""

from __future__ import annotations

from typing import TypeVar

from spike.protocol import Phase
from tests.sim.checks import late_recoveries, schedule_problems, slow_reseeds
from tests.sim.custody_sim import (
    Fact,
    Fault,
    FaultKind,
    KeeperHolds,
    Mode,
    NexusStarted,
    OperatorShard,
    PhaseIs,
    Recovered,
    Run,
    RunEnded,
    Scenario,
    ShardAnswered,
    SimConfig,
    World,
    WrongShard,
)

F = TypeVar("F", bound=Fact)

CONFIG = SimConfig(intervals=20)
I = CONFIG.interval  # noqa: E741 - the interval, as in the bounds of the design
L = CONFIG.max_latency


def story(
    ids: tuple[int, ...],
    threshold: int,
    *,
    holding: tuple[int, ...] = (),
    wrong: dict[int, WrongShard] | None = None,
    faults: tuple[Fault, ...] = (),
    bootstrap_at: float | None = None,
    go_keepers: frozenset[int] = frozenset(),
    jitter: float = 0.1,
) -> Run:
    wrong = wrong or {}
    initially = tuple((k, wrong.get(k), k in holding) for k in ids)
    if bootstrap_at is not None:
        faults = (*faults, Fault(bootstrap_at, FaultKind.BOOTSTRAP))
    scenario = Scenario(
        seed=1,
        keeper_ids=ids,
        threshold=threshold,
        jitter=jitter,
        epoch=5,
        initially=initially,
        bootstrap_at=bootstrap_at,
        faults=tuple(sorted(faults, key=lambda f: f.at)),
        go_keepers=go_keepers,
    )
    run = World(scenario, CONFIG).run()
    assert not schedule_problems(run)
    assert not late_recoveries(run)
    assert not slow_reseeds(run)
    return run


def facts_of(run: Run, kind: type[F]) -> list[F]:
    return [f for f in run.facts if isinstance(f, kind)]


def held_own_at(run: Run, keeper_id: int, when: float) -> bool:
    holds = False
    for fact in facts_of(run, KeeperHolds):
        if fact.keeper_id == keeper_id and fact.at <= when:
            holds = fact.own_shard
    return holds


def final(run: Run) -> RunEnded:
    end = run.facts[-1]
    assert isinstance(end, RunEnded)
    return end


def test_a_restarted_nexus_recovers_in_its_first_round() -> None:
    run = story((1, 2, 3), 2, holding=(1, 2, 3), faults=(Fault(7.3 * I, FaultKind.NEXUS_RESTART),))
    first, second = facts_of(run, Recovered)
    assert first.at <= L
    assert 7.3 * I < second.at <= 7.3 * I + L
    assert second.key_matches and final(run).key_matches


def test_below_threshold_nexus_waits_then_an_operator_restore_reseeds_everyone() -> None:
    restore = 10.25 * I
    run = story((1, 2, 3), 2, holding=(1,), faults=(Fault(restore, FaultKind.OPERATOR_RESTORE),))
    [recovered] = facts_of(run, Recovered)
    assert recovered.source == "operator"
    assert recovered.at == restore
    # Keeper 1's shard already counts, so one operator shard is enough unless it is keeper 1's again.
    handed_in = facts_of(run, OperatorShard)
    assert {f.at for f in handed_in} == {restore}
    assert len(handed_in) == (2 if handed_in[0].keeper_id == 1 else 1)
    assert all(f.phase is not Phase.READY for f in facts_of(run, PhaseIs) if f.at < restore)
    # every keeper holds its own shard again within one poll interval of the restore
    deadline = restore + I * 1.2 + 2 * L
    assert all(held_own_at(run, k, deadline) for k in (1, 2, 3))


def test_all_keepers_restarting_at_once_are_all_reseeded_within_an_interval() -> None:
    ids = (2, 4, 6, 8, 10)
    restart = 5.5 * I
    faults = tuple(Fault(restart, FaultKind.KEEPER_RESTART, k, duration=0.05) for k in ids)
    run = story(ids, 3, holding=ids, faults=faults)
    assert not any(held_own_at(run, k, restart) for k in ids)
    deadline = restart + 0.05 + I * 1.2 + 2 * L
    assert all(held_own_at(run, k, deadline) for k in ids)
    assert len(facts_of(run, Recovered)) == 1  # the key was never lost
    assert final(run).phase is Phase.READY


def test_a_keeper_with_another_keys_shard_is_left_out_reported_and_reseeded() -> None:
    run = story((1, 2, 3), 2, holding=(1, 3), wrong={2: WrongShard.FOREIGN})
    [recovered] = facts_of(run, Recovered)
    assert recovered.keeper_ids == (1, 3)
    assert recovered.key_matches
    answers = [f for f in facts_of(run, ShardAnswered) if f.keeper_id == 2]
    assert answers[0].reported and not answers[0].own_shard
    assert held_own_at(run, 2, recovered.at + I * 1.2 + 2 * L)


def test_wrong_and_stale_shards_never_make_up_the_threshold() -> None:
    wrong = {3: WrongShard.FOREIGN, 4: WrongShard.STALE_GO, 5: WrongShard.SWAPPED}
    run = story((1, 2, 3, 4, 5), 3, holding=(1, 2), wrong=wrong)
    assert facts_of(run, Recovered) == []
    assert final(run).phase is Phase.RECOVERING
    reported = {f.keeper_id for f in facts_of(run, ShardAnswered) if f.reported}
    assert reported == {3, 4, 5}


def test_a_late_bootstrap_seeds_the_keepers_and_nexus_uses_the_key_at_once() -> None:
    bootstrap = 3.3 * I
    run = story((1, 2, 3, 4), 3, bootstrap_at=bootstrap)
    starts = facts_of(run, NexusStarted)
    assert [(s.reason, s.has_record) for s in starts] == [("start", False), ("initialise", True)]
    [recovered] = facts_of(run, Recovered)
    assert bootstrap < recovered.at <= bootstrap + L
    assert final(run).key_matches


def test_go_keepers_answering_400_when_empty_are_reseeded_like_ours() -> None:
    run = story((1, 2, 3), 2, holding=(1, 2), go_keepers=frozenset({2, 3}))
    [recovered] = facts_of(run, Recovered)
    assert held_own_at(run, 3, recovered.at + I * 1.2 + 2 * L)


def test_an_outage_below_threshold_is_waited_out() -> None:
    down = 4.1 * I
    outage = tuple(
        Fault(down, FaultKind.KEEPER_MODE, k, mode, 6 * I)
        for k, mode in ((1, Mode.REFUSING), (2, Mode.SILENT), (3, Mode.SLOW))
    )
    run = story((1, 2, 3), 2, holding=(1, 2, 3), faults=(*outage, Fault(down + 0.1, FaultKind.NEXUS_RESTART)))
    first, second = facts_of(run, Recovered)
    assert first.at <= L
    assert down + 6 * I < second.at <= down + 6 * I + I * 2.1 + L
