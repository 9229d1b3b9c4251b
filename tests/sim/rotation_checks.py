"""The simulation's checks of key rotation and rekey (docs/key-lifecycle.md), shared by the tests that run them.

test_sim_rotation.py runs them on the batches; test_sim_checks_can_fail.py runs them against
mutant Nexus machines to show that each one can fail.
"""

from __future__ import annotations

from collections.abc import Callable

from spike.protocol import Phase, RotationStage
from spike.protocol.nexus import DEAL_ROUNDS
from tests.sim.custody_sim import (
    Contributed,
    FaultKind,
    Held,
    KeeperGone,
    KeeperMode,
    Members,
    Mode,
    NexusStarted,
    Persisting,
    PhaseIs,
    Polled,
    Recovered,
    RotationAsked,
    RotationStep,
    Run,
    RunEnded,
    Stored,
    Wiped,
)

EPSILON = 1e-6
UNDER_WAY = (RotationStage.PERSISTING, RotationStage.DEALING, RotationStage.COMMITTING, RotationStage.ABANDONING)


def need(held: Held) -> int:
    """Keepers of the record's set that must hold what they were given for one key to be rebuildable."""
    if held.pending_epoch is None:
        return held.threshold
    # Up to t'-1 single-slot keepers may have swapped their old shard for the new one before the new key is
    # rebuildable (docs/key-lifecycle.md section 7); keepers that keep two shards lose nothing.
    return held.threshold + min(held.single, held.pending_threshold - 1)


def usable(held: Held) -> bool:
    return len(held.holders) >= held.threshold or (
        held.pending_epoch is not None and len(held.pending_holders) >= held.pending_threshold
    )


def neither_key(run: Run) -> list[str]:
    """Moments when enough keepers kept their shards, yet the store and the keepers hold no rebuildable key."""
    problems = []
    previous: Held | None = None
    for fact in run.facts:
        if isinstance(fact, Held):
            where = f"seed {run.scenario.seed} at {fact.at:.3f} (epoch {fact.epoch}, pending {fact.pending_epoch})"
            if len(fact.intact) >= need(fact) and not usable(fact):
                problems.append(
                    f"{where}: {len(fact.intact)} keepers kept their shards, neither key rebuildable: {fact}"
                )
            gave_up = (
                previous is not None
                and previous.pending_epoch is not None
                and fact.pending_epoch is None
                and fact.epoch == previous.epoch
            )
            kept = previous is not None and len(previous.intact) >= need(previous)
            lost = previous is not None and not (previous.intact - fact.holders) <= wiped_at(run, fact.at)
            if gave_up and kept and lost and len(fact.holders) < fact.threshold:
                problems.append(f"{where}: giving the rotation up left the old key unrebuildable: {fact}")
            previous = fact
    return problems


def wiped_at(run: Run, at: float) -> set[int]:
    return {f.keeper_id for f in run.facts if isinstance(f, Wiped) and f.at == at}


def bad_commits(run: Run) -> list[str]:
    """Commits that counted fewer than t' keepers, or keepers that did not hold their new shard."""
    problems = []
    facts = run.facts
    for index, fact in enumerate(facts):
        if not (isinstance(fact, Stored) and fact.what == "commit"):
            continue
        after = next(f for f in facts[index:] if isinstance(f, Held))
        where = f"seed {run.scenario.seed}, commit of epoch {fact.to_epoch} at {fact.at:.3f}"
        if len(fact.counted) < after.threshold:
            problems.append(f"{where}: counted {fact.counted}, threshold {after.threshold}")
        # A keeper restarted (or planted) after its last read showed the new shard is news Nexus could not have had.
        stored = max(
            f.at for f in facts[:index] if isinstance(f, Stored) and f.what == "persist" and f.to_epoch == fact.to_epoch
        )
        wiped = {f.keeper_id for f in facts[:index] if isinstance(f, Wiped) and f.at >= stored}
        wrong = [k for k in fact.counted if k not in fact.holders and k not in wiped]
        if wrong:
            problems.append(f"{where}: counted keepers {wrong} that do not hold their new shard")
    return problems


def refused_writes(run: Run) -> list[str]:
    """Commits or abandonments the store refused: with one Nexus, they cannot happen."""
    return [
        f"seed {run.scenario.seed}: {f.what} at {f.at:.3f}"
        for f in run.facts
        if isinstance(f, Stored) and f.what.startswith("refused")
    ]


def early_deals(run: Run) -> list[str]:
    """Shards of an epoch the store did not hold yet, given to a keeper."""
    return [
        f"seed {run.scenario.seed}: keeper {f.keeper_id} given epoch {f.epoch} ({f.kind.value}) at {f.at:.3f}"
        for f in run.facts
        if isinstance(f, Contributed) and not f.stored
    ]


def reused_epochs(run: Run) -> list[str]:
    return [
        f"seed {run.scenario.seed}: a rotation to epoch {f.epoch} stored at {f.at:.3f}, the store had {f.highest}"
        for f in run.facts
        if isinstance(f, Persisting) and f.epoch <= f.highest
    ]


def calm_windows(run: Run, start: float, length: float) -> bool:
    """No Nexus restart, keeper fault, outage or rotation call in [start, start + length]; Nexus READY at start."""
    end = start + length
    if end > run.config.duration:
        return False
    phase, up = Phase.UNINITIALISED, dict.fromkeys((*run.scenario.keeper_ids, *run.scenario.pool), True)
    for fact in run.facts:
        if fact.at > start:
            break
        if isinstance(fact, PhaseIs):
            phase = fact.phase
        elif isinstance(fact, KeeperMode):
            up[fact.keeper_id] = fact.mode is Mode.UP
    if phase is not Phase.READY or not all(up.values()):
        return False
    for fact in run.facts:
        if start < fact.at <= end and isinstance(fact, NexusStarted | Wiped | KeeperMode | RotationAsked):
            return False
    return not [f for f in run.scenario.faults if start < f.at <= end and f.kind is FaultKind.ABORT]


def stuck_rotations(run: Run) -> tuple[list[str], int]:
    """Stored rotations that did not commit although nothing got in their way; and how many were checked."""
    window = (DEAL_ROUNDS + 1.5) * run.config.interval * (1 + 2 * run.scenario.jitter)
    problems, checked = [], 0
    commits = {f.to_epoch: f.at for f in run.facts if isinstance(f, Stored) and f.what == "commit"}
    for fact in run.facts:
        if isinstance(fact, Stored) and fact.what == "persist" and calm_windows(run, fact.at, window):
            checked += 1
            if fact.to_epoch not in commits or commits[fact.to_epoch] > fact.at + window:
                problems.append(
                    f"seed {run.scenario.seed}: rotation to epoch {fact.to_epoch} stored at {fact.at:.3f} not committed"
                )
    return problems, checked


def old_shards_left(run: Run) -> tuple[list[str], int]:
    """At the end of a calm stretch, keepers of the set still holding a shard of another epoch."""
    interval = run.config.interval
    end = next(f for f in run.facts if isinstance(f, RunEnded))
    held = [f for f in run.facts if isinstance(f, Held)]
    if not held or not calm_windows(run, run.config.duration - 4 * interval - EPSILON, 4 * interval):
        return [], 0
    last = held[-1]
    if last.pending_epoch is not None or any(
        isinstance(f, RotationStep | Stored) and f.at > run.config.duration - 4 * interval for f in run.facts
    ):
        return [], 0
    problems = []
    for keeper_id, epochs in end.epochs:
        if keeper_id in last.keepers and epochs not in ((last.epoch,), (None,)):
            problems.append(
                f"seed {run.scenario.seed}: keeper {keeper_id} ends holding {epochs}, epoch is {last.epoch}"
            )
    return problems, 1


def dropped_keepers(run: Run) -> list[str]:
    """Keepers that stopped being polled without being cleared, or were polled after they left."""
    interval, jitter = run.config.interval, run.scenario.jitter
    longest = interval * (2 + jitter) + EPSILON
    problems = []
    members: tuple[int, ...] = ()
    last_poll: dict[int, float] = {}
    since: dict[int, float] = {}
    gone: set[int] = set()

    def check(at: float) -> None:
        for keeper_id in members:
            latest = max(last_poll.get(keeper_id, -1.0), since[keeper_id])
            if at - latest > longest:
                problems.append(
                    f"seed {run.scenario.seed}: keeper {keeper_id} not polled since {latest:.3f} (at {at:.3f})"
                )
                last_poll[keeper_id] = at

    restarted = False
    for fact in run.facts:
        check(fact.at)
        if isinstance(fact, NexusStarted):
            # A new Nexus polls the keepers of the stored record and rotation (one a rekey removed and that was
            # not cleared yet is the operator's now: docs/key-lifecycle.md step 5).
            last_poll, since, restarted, gone = {}, {k: fact.at for k in members}, True, set()
        elif isinstance(fact, Members):
            left = set(members) - set(fact.keeper_ids)
            unexplained = set() if restarted else left - gone
            restarted = False
            if unexplained:
                problems.append(
                    f"seed {run.scenario.seed}: keepers {sorted(unexplained)} left the poll list at {fact.at:.3f}"
                )
            for keeper_id in set(fact.keeper_ids) - set(members):
                since[keeper_id] = fact.at
            members = fact.keeper_ids
            gone -= left
        elif isinstance(fact, KeeperGone):
            gone.add(fact.keeper_id)
        elif isinstance(fact, Polled):
            last_poll[fact.keeper_id] = fact.at
            if fact.keeper_id not in members:
                problems.append(
                    f"seed {run.scenario.seed}: keeper {fact.keeper_id} polled at {fact.at:.3f}, not a member"
                )
    check(run.config.duration)
    return problems


def thin_recoveries(run: Run) -> list[str]:
    """A key rebuilt from other than its own threshold of genuine shards."""
    return [
        f"seed {run.scenario.seed} at {f.at:.3f}: {f.keeper_ids} of {f.eligible}, threshold {f.threshold}"
        for f in run.facts
        if isinstance(f, Recovered)
        and (len(f.keeper_ids) != f.threshold or (f.source == "keepers" and not set(f.keeper_ids) <= f.eligible))
    ]


def problems(check: Callable[[Run], list[str] | tuple[list[str], int]], run: Run) -> list[str]:
    found = check(run)
    return found[0] if isinstance(found, tuple) else found


def every(runs: list[Run], *checks: Callable[[Run], list[str] | tuple[list[str], int]]) -> list[str]:
    return [p for run in runs for check in checks for p in problems(check, run)]


ALL = (
    neither_key, bad_commits, refused_writes, early_deals, reused_epochs, stuck_rotations, old_shards_left,
    dropped_keepers,
)  # fmt: skip
