"""The simulation checks are not tautologies: each one catches a Nexus that breaks its rule.

Every mutant wraps the real `NexusCustody` and changes one thing through its
public surface only (the effects it emits, the answers it is fed, the key it
exposes), so these tests do not depend on the machine's internals.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from custody_sim import Custody, Run, SimConfig, simulate
from test_sim_custody import late_recoveries, slow_reseeds
from test_sim_schedule import schedule_problems

from spike.protocol import (
    Effect,
    KeeperMisbehaved,
    NexusCustody,
    Phase,
    RequestKind,
    ResponseReceived,
    RootKey,
    SendRequest,
)
from spike.protocol.events import Answer

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
    from test_sim_custody import test_pushes_carry_the_keepers_own_shard_and_happen_only_when_ready as check

    with pytest.raises(AssertionError, match="not its own"):
        check(run_all(PushesAnotherKeepersShard))


def test_the_report_check_catches_hidden_misbehaviour() -> None:
    from test_sim_custody import test_wrong_shards_are_reported_with_the_keepers_id as check

    with pytest.raises(AssertionError, match="reported=False"):
        check(run_all(HidesMisbehaviour))


def test_the_key_check_catches_a_wrong_key_in_use() -> None:
    from test_sim_custody import test_a_key_in_use_is_always_the_real_key as check

    with pytest.raises(AssertionError, match="wrong key"):
        check(run_all(UsesAnotherKey))
