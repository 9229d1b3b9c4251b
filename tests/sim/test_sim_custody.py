"""docs/design.md section 2 in the simulation: key recovery, re-seeding and reporting under faults.

Bounds used below, with I the poll interval, j the jitter and L the largest
latency of a reachable keeper:

* recovery: once t keepers hold their current shard and stay reachable, the
  Nexus is READY within ``I(2+j) + L`` (one poll of each, the longest gap being
  the first one of a schedule) -- whatever else is failing around them;
* re-seeding: a reachable keeper that lacks its shard while Nexus is READY
  holds it again within ``2L`` of its next poll, and that poll comes within one
  interval plus jitter (test_sim_schedule.py checks the gaps).
"""

from __future__ import annotations

from collections import Counter

from custody_sim import (
    FaultKind,
    KeeperHolds,
    KeeperMode,
    LateAnswer,
    Mode,
    NewerEpochShown,
    NexusStarted,
    OperatorShard,
    PhaseIs,
    Polled,
    Pushed,
    Recovered,
    Run,
    RunEnded,
    ShardAnswered,
    WrongShard,
)

from spike.protocol import Phase

EPSILON = 1e-6
STATE_FACTS = (KeeperHolds, KeeperMode, PhaseIs, NexusStarted, RunEnded)


def test_a_key_in_use_is_always_the_real_key(sim_runs: list[Run]) -> None:
    for run in sim_runs:
        for fact in run.facts:
            if isinstance(fact, Recovered):
                assert fact.key_matches, f"seed {run.scenario.seed}: wrong key in use at {fact.at}"
            elif isinstance(fact, RunEnded):
                assert fact.key_matches in (True, None), f"seed {run.scenario.seed}: wrong key at the end"
                assert (fact.key_matches is None) == (fact.phase is not Phase.READY)


def test_a_key_is_recovered_only_from_threshold_genuine_shards(sim_runs: list[Run]) -> None:
    for run in sim_runs:
        for fact in run.facts:
            if isinstance(fact, Recovered):
                where = f"seed {run.scenario.seed} at {fact.at:.3f}"
                assert len(fact.keeper_ids) == run.scenario.threshold, where
                assert set(fact.keeper_ids) <= fact.eligible, f"{where}: used {fact.keeper_ids}, had {fact.eligible}"
                if fact.source == "keepers":
                    assert not set(fact.keeper_ids) - fact.eligible, where


def late_recoveries(run: Run) -> list[str]:
    """Moments where t keepers held their shard and were reachable long enough, yet no key."""
    scenario, config = run.scenario, run.config
    window = config.interval * (2 + scenario.jitter) + config.max_latency + EPSILON
    holds = dict.fromkeys(scenario.keeper_ids, False)
    up = dict.fromkeys(scenario.keeper_ids, True)
    phase = Phase.UNINITIALISED
    has_record = False
    since: float | None = None
    problems = []
    # Only these facts change the condition; checking at them (and at the end) finds every late recovery.
    for fact in (f for f in run.facts if isinstance(f, STATE_FACTS)):
        if since is not None and phase is not Phase.READY and fact.at > since + window:
            problems.append(f"seed {scenario.seed}: enough keepers since {since:.3f}, no key at {fact.at:.3f}")
            since = None
        restarted = False
        if isinstance(fact, KeeperHolds):
            holds[fact.keeper_id] = fact.own_shard
        elif isinstance(fact, KeeperMode):
            up[fact.keeper_id] = fact.mode is Mode.UP
        elif isinstance(fact, PhaseIs):
            phase = fact.phase
        elif isinstance(fact, NexusStarted):
            has_record = fact.has_record
            restarted = True
        enough = has_record and sum(holds[k] and up[k] for k in holds) >= scenario.threshold
        if not enough:
            since = None
        elif since is None or restarted:
            since = fact.at
    return problems


def test_the_key_is_recovered_once_threshold_keepers_hold_their_shard(sim_runs: list[Run]) -> None:
    problems = [p for run in sim_runs for p in late_recoveries(run)]
    assert not problems, "\n".join(problems[:20])


def slow_reseeds(run: Run) -> list[str]:
    """Reachable keepers lacking their shard while Nexus is READY, not re-seeded after their next poll."""
    scenario, config = run.scenario, run.config
    after_poll = 2 * config.max_latency + EPSILON
    longest_gap = config.interval * (2 + scenario.jitter)
    holds = dict.fromkeys(scenario.keeper_ids, False)
    up = dict.fromkeys(scenario.keeper_ids, True)
    phase = Phase.UNINITIALISED
    since: dict[int, float] = {}  # keeper -> when it became reachable, unseeded and under a READY Nexus
    polled: dict[int, float] = {}  # keeper -> its first poll since then
    problems = []
    for fact in (f for f in run.facts if isinstance(f, (*STATE_FACTS, Polled))):
        for keeper_id, start in list(since.items()):
            poll = polled.get(keeper_id)
            late = fact.at > poll + after_poll if poll is not None else fact.at > start + longest_gap + after_poll
            if late:
                problems.append(
                    f"seed {scenario.seed}: keeper {keeper_id} unseeded since {start:.3f} "
                    f"(polled at {poll}), still at {fact.at:.3f}"
                )
                del since[keeper_id]
        if isinstance(fact, KeeperHolds):
            holds[fact.keeper_id] = fact.own_shard
        elif isinstance(fact, KeeperMode):
            up[fact.keeper_id] = fact.mode is Mode.UP
        elif isinstance(fact, PhaseIs):
            phase = fact.phase
        elif isinstance(fact, Polled) and fact.keeper_id in since:
            polled.setdefault(fact.keeper_id, fact.at)
        for keeper_id in scenario.keeper_ids:
            wanted = phase is Phase.READY and up[keeper_id] and not holds[keeper_id]
            if not wanted:
                since.pop(keeper_id, None)
                polled.pop(keeper_id, None)
            elif keeper_id not in since:
                since[keeper_id] = fact.at
    return problems


def test_reachable_keepers_are_reseeded_after_their_next_poll(sim_runs: list[Run]) -> None:
    problems = [p for run in sim_runs for p in slow_reseeds(run)]
    assert not problems, "\n".join(problems[:20])


def test_pushes_carry_the_keepers_own_shard_and_happen_only_when_ready(sim_runs: list[Run]) -> None:
    for run in sim_runs:
        phase = Phase.UNINITIALISED
        for fact in run.facts:
            if isinstance(fact, PhaseIs):
                phase = fact.phase
            elif isinstance(fact, Pushed):
                where = f"seed {run.scenario.seed}, keeper {fact.keeper_id} at {fact.at:.3f}"
                assert fact.own_shard, f"{where}: pushed a shard that is not its own"
                assert phase is Phase.READY, f"{where}: pushed while {phase.value}"


def test_wrong_shards_are_reported_with_the_keepers_id(sim_runs: list[Run]) -> None:
    for run in sim_runs:
        for fact in run.facts:
            if isinstance(fact, ShardAnswered) and fact.record_known:
                where = f"seed {run.scenario.seed}, keeper {fact.keeper_id} at {fact.at:.3f}"
                assert fact.reported != fact.own_shard, f"{where}: own={fact.own_shard} reported={fact.reported}"


def test_late_answers_change_nothing(sim_runs: list[Run]) -> None:
    for run in sim_runs:
        late = [f for f in run.facts if isinstance(f, LateAnswer) and f.had_effects]
        assert not late, f"seed {run.scenario.seed}: late answers had effects: {late[:3]}"


def test_the_batch_exercises_every_fault_and_outcome(sim_runs: list[Run]) -> None:
    """Guard against a vacuous simulation: each batch must hit the cases the checks are about."""
    seen: Counter[str] = Counter()
    for run in sim_runs:
        seen.update(f.kind.value for f in run.scenario.faults)
        seen["go-keepers"] += bool(run.scenario.go_keepers)
        seen.update(f"mode-{f.mode.value}" for f in run.scenario.faults if f.kind is FaultKind.KEEPER_MODE)
        for fact in run.facts:
            if isinstance(fact, Recovered):
                seen[f"recovered-{fact.source}"] += 1
            elif isinstance(fact, ShardAnswered) and fact.record_known and not fact.own_shard:
                seen["wrong-shard-answered"] += 1
            elif isinstance(fact, Pushed):
                seen["push"] += 1
            elif isinstance(fact, LateAnswer):
                seen["late-answer"] += 1
            elif isinstance(fact, OperatorShard):
                seen["operator-shard"] += 1
        final = run.facts[-1]
        assert isinstance(final, RunEnded)
        seen[f"ended-{final.phase.value}"] += 1
    expected = [
        "keeper-restart",
        "go-keepers",
        "keeper-corrupt",
        "nexus-restart",
        "bootstrap",
        "mode-refusing",
        "mode-silent",
        "mode-slow",
        "mode-garbage",
        "recovered-keepers",
        "wrong-shard-answered",
        "push",
        "late-answer",
        "ended-ready",
        "ended-recovering",
    ]
    missing = [name for name in expected if not seen[name]]
    assert not missing, f"this batch never exercised {missing}: {dict(seen)}"


def test_the_batch_exercises_epochs_the_deployment_never_had(sim_runs: list[Run]) -> None:
    """Issue 14 L2 in the simulation: shards labelled with epochs never had, newer and older, are planted.

    The checks above then cover them like any wrong shard: reported when answered
    (the world answers `NewerKeySeen` with `confirm_record`, as Nexus on SQLite does),
    and re-seeded after the keeper's next poll once Nexus is READY.
    """
    seen: Counter[str] = Counter()
    for run in sim_runs:
        planted = [f.wrong for f in run.scenario.faults if f.kind is FaultKind.KEEPER_CORRUPT]
        planted += [wrong for _, wrong, _ in run.scenario.initially if wrong is not None]
        seen.update(w.value for w in planted if w in (WrongShard.NEVER_HAD_NEWER, WrongShard.NEVER_HAD_OLDER))
        seen["newer-epoch-shown"] += sum(isinstance(f, NewerEpochShown) for f in run.facts)
        for fact in run.facts:
            if isinstance(fact, NewerEpochShown):
                assert fact.epoch > run.scenario.epoch, f"seed {run.scenario.seed}: {fact}"
    missing = [name for name in ("never-had-newer", "never-had-older", "newer-epoch-shown") if not seen[name]]
    assert not missing, f"this batch never exercised {missing}: {dict(seen)}"


def test_no_answer_ever_hits_a_row_the_rules_table_calls_impossible(sim_runs: list[Run]) -> None:
    """spike/protocol/custody_rules.py marks some (phase, request, outcome) combinations unreachable: they are."""
    assert [run.scenario.seed for run in sim_runs if run.cannot_happen] == []
