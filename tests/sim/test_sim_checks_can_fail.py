"""The simulation checks are not tautologies: each one catches a Nexus that breaks its rule.

Every mutant wraps the real `NexusCustody` and changes one thing through its
public surface only (the effects it emits, the answers it is fed, the key it
exposes), so these tests do not depend on the machine's internals.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from spike.protocol import (
    KEEPER_CONTRIBUTE_PATH,
    CommitRotation,
    Effect,
    KeeperMisbehaved,
    NexusCustody,
    PendingRotation,
    PersistRotation,
    Phase,
    RequestKind,
    ResponseReceived,
    RootKey,
    RotationProgress,
    RotationStage,
    SendRequest,
    ShardContribution,
    decode,
    encode,
    share_for,
)
from spike.protocol.events import Answer
from spike.protocol.wire import KEEPER_FORGET_PATH
from tests.sim import rotation_checks as rotation
from tests.sim.checks import (
    check_key_in_use_is_real,
    check_pushes_are_own_and_ready,
    check_wrong_shards_reported,
    late_recoveries,
    schedule_problems,
    slow_reseeds,
)
from tests.sim.custody_sim import Custody, Run, SimConfig, simulate

CONFIG = SimConfig(intervals=30)
SEEDS = range(12)


class Mutant:
    """Delegates to a real NexusCustody; subclasses bend one rule."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.real = NexusCustody(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def effects(self) -> list[Effect]:
        return [e for e in self.real.effects() if self.keep(e)]

    def keep(self, effect: Effect) -> bool:
        return True


class DropsKeepersThatAnswered404(Mutant):
    """Stops polling a keeper once it has answered 404 (what ADR-0022 rejects)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dropped: set[int] = set()
        self.kinds: dict[int, tuple[int, RequestKind]] = {}

    def keep(self, effect: Effect) -> bool:
        if isinstance(effect, SendRequest):
            self.kinds[effect.request_id] = (effect.keeper_id, effect.kind)
            return effect.keeper_id not in self.dropped
        return True

    def receive(self, answer: Answer, now: float) -> None:
        keeper_id, _ = self.kinds.get(answer.request_id, (0, RequestKind.POLL))
        if isinstance(answer, ResponseReceived) and answer.status == 404:
            self.dropped.add(keeper_id)
        self.real.receive(answer, now)


class NeverPushes(Mutant):
    def keep(self, effect: Effect) -> bool:
        return not (isinstance(effect, SendRequest) and effect.kind is RequestKind.PUSH)


class HidesMisbehaviour(Mutant):
    def keep(self, effect: Effect) -> bool:
        return not isinstance(effect, KeeperMisbehaved)


class PushesAnotherKeepersShard(Mutant):
    """Sends each push to the wrong keeper's address (so keepers get foreign shards)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ids = sorted(self.real.keeper_ids)

    def effects(self) -> list[Effect]:
        out: list[Effect] = []
        for effect in self.real.effects():
            if isinstance(effect, SendRequest) and effect.kind is RequestKind.PUSH and len(self.ids) > 1:
                other = self.ids[(self.ids.index(effect.keeper_id) + 1) % len(self.ids)]
                out.append(
                    SendRequest(other, effect.request_id, effect.kind, effect.path, effect.deadline, effect.body)
                )
            else:
                out.append(effect)
        return out


class SkipsPollsOfUnreachableKeepers(Mutant):
    """Backs off: drops every other poll of a keeper whose last request failed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failing: set[int] = set()
        self.keeper_of: dict[int, int] = {}
        self.skip = False

    def keep(self, effect: Effect) -> bool:
        if isinstance(effect, SendRequest):
            self.keeper_of[effect.request_id] = effect.keeper_id
            if effect.kind is RequestKind.POLL and effect.keeper_id in self.failing:
                self.skip = not self.skip
                return not self.skip
        return True

    def receive(self, answer: Answer, now: float) -> None:
        keeper_id = self.keeper_of.get(answer.request_id, 0)
        if isinstance(answer, ResponseReceived):
            self.failing.discard(keeper_id)
        else:
            self.failing.add(keeper_id)
        self.real.receive(answer, now)


class IgnoresKeeperShards(Mutant):
    """Never gets its key from keepers (as if every shard answer were lost)."""

    def receive(self, answer: Answer, now: float) -> None:
        if isinstance(answer, ResponseReceived) and answer.status == 200 and self.real.phase is Phase.RECOVERING:
            return
        self.real.receive(answer, now)


class TrustsEveryNewerEpoch(Mutant):
    """Never takes the driver's word that a newer epoch is garbage (what issue 14 L2 found)."""

    def confirm_record(self, checked_at: float, now: float) -> int:
        return 0


class UsesAnotherKey(Mutant):
    @property
    def root_key(self) -> RootKey:
        real = self.real.root_key
        return RootKey.generate(random.Random(real.as_int()).randbytes)


def run_all(mutant: Callable[..., Custody]) -> list[Run]:
    return [simulate(seed, CONFIG, mutant) for seed in SEEDS]


def test_the_real_machine_passes_on_these_seeds() -> None:
    runs = run_all(NexusCustody)
    assert not [p for r in runs for p in schedule_problems(r)]
    assert not [p for r in runs for p in late_recoveries(r)]
    assert not [p for r in runs for p in slow_reseeds(r)]


@pytest.mark.parametrize("mutant", [DropsKeepersThatAnswered404, SkipsPollsOfUnreachableKeepers])
def test_the_schedule_check_catches_a_nexus_that_drops_or_skips_polls(mutant: Callable[..., Custody]) -> None:
    assert any(schedule_problems(run) for run in run_all(mutant))


@pytest.mark.parametrize("mutant", [NeverPushes, PushesAnotherKeepersShard, TrustsEveryNewerEpoch])
def test_the_reseed_check_catches_a_nexus_that_does_not_reseed(mutant: Callable[..., Custody]) -> None:
    assert any(slow_reseeds(run) for run in run_all(mutant))


def test_the_recovery_check_catches_a_nexus_that_never_recovers() -> None:
    assert any(late_recoveries(run) for run in run_all(IgnoresKeeperShards))


def test_the_push_check_catches_foreign_shards() -> None:
    check = check_pushes_are_own_and_ready
    with pytest.raises(AssertionError, match="not its own"):
        check(run_all(PushesAnotherKeepersShard))


def test_the_report_check_catches_hidden_misbehaviour() -> None:
    check = check_wrong_shards_reported
    with pytest.raises(AssertionError, match="reported=False"):
        check(run_all(HidesMisbehaviour))


def test_the_key_check_catches_a_wrong_key_in_use() -> None:
    check = check_key_in_use_is_real
    with pytest.raises(AssertionError, match="wrong key"):
        check(run_all(UsesAnotherKey))


# ---------------------------------------------------------------------------- key rotation (test_sim_rotation.py)

ROTATING = SimConfig(intervals=25, rotations=1.0, kill_around_writes=0.5)
REKEYING = SimConfig(intervals=25, rotations=1.0, rekeys=True, go_rotations=True)
ROTATION_SEEDS = range(9_000_000, 9_000_060)


def _fabricated(real: NexusCustody, keeper_id: int, path: str, body: bytes, kind: RequestKind) -> SendRequest:
    """A request the real machine never made (an id it does not know: its answer is ignored)."""
    return SendRequest(keeper_id, -random.randrange(1, 2**40), kind, path, real.next_deadline(), body)


class DealsWithoutKeep(Mutant):
    """Deals the new shard without asking the keeper to keep its old one (a single-slot protocol)."""

    def effects(self) -> list[Effect]:
        out: list[Effect] = []
        for effect in self.real.effects():
            if isinstance(effect, SendRequest) and effect.kind is RequestKind.DEAL:
                given = decode(effect.body, ShardContribution)
                out.append(dataclasses.replace(effect, body=encode(msgspec.structs.replace(given, keep=None))))
            else:
                out.append(effect)
        return out


class RetiresBeforeCommit(Mutant):
    """Tells each keeper to forget its old shard as soon as it was dealt the new one, before the commit."""

    def effects(self) -> list[Effect]:
        out: list[Effect] = []
        for effect in self.real.effects():
            out.append(effect)
            if isinstance(effect, SendRequest) and effect.kind is RequestKind.DEAL:
                old = decode(effect.body, ShardContribution).keep
                body = encode({"epoch": old})
                out.append(_fabricated(self.real, effect.keeper_id, KEEPER_FORGET_PATH, body, RequestKind.FORGET))
        return out


class DealsBeforeStored(Mutant):
    """Pushes the new shards as soon as the pending rotation is handed over, before it is stored."""

    def effects(self) -> list[Effect]:
        out: list[Effect] = []
        for effect in self.real.effects():
            out.append(effect)
            if isinstance(effect, PersistRotation):
                new = effect.pending.record
                key = effect.pending.open_new(self.real.root_key)
                for keeper_id in new.keeper_ids:
                    share = share_for(key, epoch=new.epoch, threshold=new.threshold, id=keeper_id)
                    body = encode(ShardContribution.of(share))
                    out.append(_fabricated(self.real, keeper_id, KEEPER_CONTRIBUTE_PATH, body, RequestKind.PUSH))
        return out


class CommitsAtTheFirstDeal(Mutant):
    """Asks to commit as soon as one keeper shows its new shard (and ignores the acknowledgement)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending: PendingRotation | None = None

    def effects(self) -> list[Effect]:
        out: list[Effect] = []
        for effect in self.real.effects():
            out.append(effect)
            if isinstance(effect, PersistRotation):
                self.pending = effect.pending
            if not isinstance(effect, RotationProgress) or effect.stage is not RotationStage.DEALING:
                continue
            if self.pending is not None and 0 < len(effect.dealt) < self.pending.record.threshold:
                out.append(CommitRotation(self.pending, effect.at))
                out.append(dataclasses.replace(effect, stage=RotationStage.COMMITTING))
                self.pending = None
        return out

    def rotation_committed(self, now: float, pending: PendingRotation | None = None) -> None:
        rotation = self.real.rotation
        if rotation is not None and rotation.stage is RotationStage.COMMITTING:
            self.real.rotation_committed(now, pending)


class ForgetsTheHighWaterMark(Mutant):
    """Starts without the stored high-water mark: after an abandon and a restart, the abandoned epoch comes back."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["highest_epoch"] = 0
        super().__init__(*args, **kwargs)


class StopsPollingRemovedKeepers(Mutant):
    """Stops polling a keeper as soon as a rekey removes it, without clearing it."""

    def keep(self, effect: Effect) -> bool:
        if isinstance(effect, SendRequest) and effect.kind is RequestKind.POLL:
            record = self.real.record
            rotation = self.real.rotation
            members = set(record.keeper_ids if record is not None else ()) | set(
                rotation.keeper_ids if rotation else ()
            )
            return effect.keeper_id in members
        return True


def rotating_runs(mutant: Callable[..., Custody], config: SimConfig = ROTATING) -> list[Run]:
    return [simulate(seed, config, mutant) for seed in ROTATION_SEEDS]


def test_the_real_machine_passes_the_rotation_checks_on_these_seeds() -> None:
    for config in (ROTATING, REKEYING):
        runs = rotating_runs(NexusCustody, config)
        assert not [p for r in runs for check in rotation.ALL for p in rotation.problems(check, r)]


@pytest.mark.parametrize("mutant", [DealsWithoutKeep, RetiresBeforeCommit])
def test_the_never_neither_check_catches_a_nexus_that_lets_go_of_the_old_key_early(
    mutant: Callable[..., Custody],
) -> None:
    assert any(rotation.neither_key(run) for run in rotating_runs(mutant))


def test_the_early_deal_check_catches_a_nexus_that_deals_before_the_store_holds_the_rotation() -> None:
    assert any(rotation.early_deals(run) for run in rotating_runs(DealsBeforeStored))


def test_the_commit_check_catches_a_nexus_that_commits_too_early() -> None:
    assert any(rotation.bad_commits(run) for run in rotating_runs(CommitsAtTheFirstDeal))


def test_the_epoch_check_catches_a_nexus_that_uses_an_epoch_twice() -> None:
    assert any(rotation.reused_epochs(run) for run in rotating_runs(ForgetsTheHighWaterMark))


def test_the_keeper_check_catches_a_nexus_that_drops_a_removed_keeper_before_it_is_cleared() -> None:
    assert any(rotation.dropped_keepers(run) for run in rotating_runs(StopsPollingRemovedKeepers, REKEYING))
