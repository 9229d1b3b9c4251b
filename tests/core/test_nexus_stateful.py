"""Hypothesis drives NexusCustody through arbitrary interleavings of time, answers and operator actions.

The model keeps only what a driver can know (the requests in flight, what it
answered, the states the machine reported) and checks the custody rules
after every step: a READY Nexus holds exactly the real key and got it from
at least t verified shards; requests never outlive the keeper's next poll;
the next deadline is the earliest pending timer; reports form consistent
chains; pushes carry the keeper's own shard; nothing raises.
"""

from __future__ import annotations

import math
import random

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from spike.protocol import (
    Effect,
    FailureKind,
    KeeperState,
    KeeperStateChanged,
    KeyRecord,
    KeyRecovered,
    NexusCustody,
    Phase,
    PhaseChanged,
    PollSchedule,
    RequestFailed,
    RequestKind,
    ResponseReceived,
    RootKey,
    SendRequest,
    Share,
    ShareRejected,
    seal_key,
    share_for,
)
from spike.protocol.events import Answer
from tests.core.core_helpers import OTHER_KEY_INT, SAMPLE_KEY_INT, key_from_int, shard_body

ANSWERS = (
    "correct", "correct-go", "404", "400", "wrong", "stale", "swapped", "garbage", "failure", "500", "newer", "ancient",
)  # fmt: skip
GARBAGE = (
    b"",
    b"{",
    b"null",
    b"{}",
    b'{"shard":"x"}',
    msgspec.json.encode({"shard": [7] * 31}),
    msgspec.json.encode({"shard": [255] * 32}),
    msgspec.json.encode({"shard": [300] * 32}),
)


class NexusCustodyMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.epoch = 3
        self.inflight: dict[int, SendRequest] = {}  # live requests (answered or not yet), by id
        self.dropped: set[int] = set()  # live requests the driver will never answer
        self.dead: dict[int, SendRequest] = {}  # requests that timed out or were made obsolete
        self.last_request_id = 0
        self.verified_from: set[int] = set()  # keepers whose correct shard the machine accepted
        self.from_operator: set[int] = set()
        self.states: dict[int, KeeperState] = {}
        self.phase = Phase.UNINITIALISED

    # ------------------------------------------------------------ setup

    @initialize(
        ids=st.sets(st.integers(1, 255), min_size=1, max_size=6).map(sorted),
        data=st.data(),
        jitter=st.sampled_from([0.0, 0.1, 0.25]),
        timeout=st.sampled_from([1.0, 4.0, 10.0]),
        with_record=st.booleans(),
        seed=st.integers(0, 2**32),
    )
    def setup(
        self,
        ids: list[int],
        data: st.DataObject,
        jitter: float,
        timeout: float,
        with_record: bool,
        seed: int,
    ) -> None:
        self.ids = ids
        self.threshold = data.draw(st.integers(1, len(ids)), label="threshold")
        self.schedule = PollSchedule(interval=10.0, jitter=jitter, request_timeout=timeout)
        self.seed = seed
        self._seal(key_from_int(SAMPLE_KEY_INT))
        if data.draw(st.booleans(), label="known history"):  # epochs 0 and 1 never were
            self.record = msgspec.structs.replace(self.record, history=((self.epoch - 1, self.epoch - 1),))
        self.with_record = with_record
        self._start_custody(self.record if with_record else None)

    def _seal(self, key: RootKey, previous: KeyRecord | None = None) -> None:
        self.key = key
        self.record, self.shares = seal_key(key, epoch=self.epoch, threshold=self.threshold, keeper_ids=self.ids)
        if previous is not None:
            self.record = self.record.succeeding(previous)
        self.wrong_key = key_from_int(OTHER_KEY_INT if key.as_int() != OTHER_KEY_INT else SAMPLE_KEY_INT)

    def _start_custody(self, record: KeyRecord | None) -> None:
        self.custody = NexusCustody(
            self.ids,
            threshold=self.threshold,
            schedule=self.schedule,
            rng=random.Random(self.seed),
            now=self.now,
            record=record,
        )
        # Request ids start again at 1: forget every request of the old instance.
        self.inflight.clear()
        self.dropped.clear()
        self.dead.clear()
        self.last_request_id = 0
        self.verified_from.clear()
        self.from_operator.clear()
        self.states = dict.fromkeys(self.ids, KeeperState.UNKNOWN)
        self.phase = self.custody.phase
        self.take()

    # ------------------------------------------------------------ reading effects

    def take(self) -> list[Effect]:
        effects = self.custody.effects()
        for effect in effects:
            if isinstance(effect, SendRequest):
                assert effect.request_id > self.last_request_id
                self.last_request_id = effect.request_id
                live = [r for r in self.inflight.values() if r.keeper_id == effect.keeper_id]
                assert not live, f"two requests in flight for keeper {effect.keeper_id}"
                assert effect.deadline <= self.now + self.schedule.request_timeout
                if effect.kind is RequestKind.PUSH:
                    assert self.phase is Phase.READY, "pushed without a verified key"
                    assert effect.body == msgspec.json.encode(
                        {"shard": list(self.shares[effect.keeper_id].secret_bytes()), "id": effect.keeper_id,
                         "epoch": self.epoch}
                    )  # fmt: skip
                self.inflight[effect.request_id] = effect
            elif isinstance(effect, KeeperStateChanged):
                assert effect.previous is self.states[effect.keeper_id]
                assert effect.state is not effect.previous
                self.states[effect.keeper_id] = effect.state
            elif isinstance(effect, PhaseChanged):
                assert effect.previous is self.phase
                assert effect.phase is not effect.previous
                self.phase = effect.phase
            elif isinstance(effect, KeyRecovered):
                assert effect.epoch == self.epoch
                assert len(effect.keeper_ids) == self.threshold
                assert set(effect.keeper_ids) <= self.verified_from | self.from_operator
        return effects

    def _expire(self) -> None:
        for request_id, request in list(self.inflight.items()):
            if request.deadline <= self.now:
                self.dead[request_id] = self.inflight.pop(request_id)
                self.dropped.discard(request_id)

    # ------------------------------------------------------------ time

    @rule(dt=st.floats(0.0, 25.0))
    def advance(self, dt: float) -> None:
        self.now += dt
        self.custody.handle_timer(self.now)
        self._expire()
        self.take()

    @rule()
    def run_until_next_deadline(self) -> None:
        self.now = max(self.now, self.custody.next_deadline())
        self.custody.handle_timer(self.now)
        self._expire()
        self.take()

    # ------------------------------------------------------------ answers

    def _answerable(self) -> list[int]:
        return sorted(set(self.inflight) - self.dropped)

    def _body(self, kind: str, keeper_id: int, data: st.DataObject) -> tuple[int, bytes]:
        if kind == "correct":
            return 200, shard_body(self.shares[keeper_id])
        if kind == "correct-go":
            return 200, shard_body(self.shares[keeper_id], extension=False)
        if kind == "404":
            return 404, b'{"err":"api_not_found"}'
        if kind == "400":
            return 400, b'{"err":"api_bad_request"}'
        if kind == "wrong":
            return 200, shard_body(share_for(self.wrong_key, epoch=self.epoch, threshold=self.threshold, id=keeper_id))
        if kind == "stale":
            stale = share_for(self.key, epoch=self.epoch - 1, threshold=self.threshold, id=keeper_id)
            return 200, shard_body(stale, extension=data.draw(st.booleans(), label="labelled"))
        if kind == "swapped":
            other = self.ids[(self.ids.index(keeper_id) + 1) % len(self.ids)]
            if other == keeper_id:
                return 200, shard_body(Share(keeper_id, self.epoch, bytes(32)))
            return 200, shard_body(self.shares[other], extension=data.draw(st.booleans(), label="labelled"))
        if kind == "garbage":
            return 200, data.draw(st.sampled_from(GARBAGE) | st.binary(max_size=64), label="garbage")
        if kind == "newer":  # another instance's newer key, or a label no record ever had
            epoch = data.draw(st.sampled_from([self.epoch + 1, 2**63 - 1]), label="newer epoch")
            return 200, shard_body(share_for(self.wrong_key, epoch=epoch, threshold=self.threshold, id=keeper_id))
        if kind == "ancient":  # an earlier epoch, which the record's history may or may not have
            ancient = share_for(self.key, epoch=data.draw(st.integers(0, self.epoch - 1)), threshold=self.threshold,
                                id=keeper_id)  # fmt: skip
            return 200, shard_body(ancient)
        return 500, b'{"err":"api_internal_error"}'

    def _carries_own_shard(self, keeper_id: int, status: int, body: bytes) -> bool:
        """Whether an answer really is `keeper_id`'s current shard.

        Judged by value, not by how it was made: with t=1 every share is the
        key itself, so a "stale" or "swapped" unlabelled shard can be correct.
        """
        if status != 200:
            return False
        try:
            answer = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return False
        if not isinstance(answer, dict) or answer.get("shard") != list(self.shares[keeper_id].secret_bytes()):
            return False
        return bool(answer.get("id", keeper_id) == keeper_id and answer.get("epoch", self.epoch) == self.epoch)

    @precondition(lambda self: bool(self._answerable()))
    @rule(data=st.data(), kind=st.sampled_from(ANSWERS))
    def answer(self, data: st.DataObject, kind: str) -> None:
        request_id = data.draw(st.sampled_from(self._answerable()), label="request")
        request = self.inflight.pop(request_id)
        answer: Answer
        if kind == "failure":
            answer = RequestFailed(request_id, "connection reset", data.draw(st.sampled_from(FailureKind)))
        elif request.kind is RequestKind.PUSH:
            status = 200 if kind in ("correct", "correct-go") else data.draw(st.sampled_from([400, 401, 500]))
            answer = ResponseReceived(request_id, status, b"{}")
        else:
            status, body = self._body(kind, request.keeper_id, data)
            answer = ResponseReceived(request_id, status, body)
            if self.custody.record is not None and self._carries_own_shard(request.keeper_id, status, body):
                self.verified_from.add(request.keeper_id)
        self.custody.receive(answer, self.now)
        self.take()

    @precondition(lambda self: bool(self._answerable()))
    @rule(data=st.data())
    def drop_answer(self, data: st.DataObject) -> None:
        self.dropped.add(data.draw(st.sampled_from(self._answerable()), label="request"))

    @precondition(lambda self: bool(self.dead))
    @rule(data=st.data(), kind=st.sampled_from(ANSWERS))
    def answer_too_late(self, data: st.DataObject, kind: str) -> None:
        request = self.dead[data.draw(st.sampled_from(sorted(self.dead)), label="request")]
        status, body = self._body("correct" if kind == "failure" else kind, request.keeper_id, data)
        before = (self.custody.keepers(), self.custody.phase, self.custody.shards_needed)
        self.custody.receive(ResponseReceived(request.request_id, status, body), self.now)
        assert self.custody.effects() == []
        assert (self.custody.keepers(), self.custody.phase, self.custody.shards_needed) == before

    @rule(offset=st.integers(1, 1000))
    def answer_unknown_request(self, offset: int) -> None:
        before = self.custody.keepers()
        self.custody.receive(RequestFailed(self.last_request_id + offset, "who?"), self.now)
        assert self.custody.effects() == []
        assert self.custody.keepers() == before

    # ------------------------------------------------------------ bootstrap, operator, restarts

    def _obsolete_inflight(self) -> None:
        self.dead.update(self.inflight)
        self.inflight.clear()
        self.dropped.clear()

    @precondition(lambda self: self.custody.record is None)
    @rule()
    def initialise(self) -> None:
        assert self.custody.initialise(self.record, self.now) is True
        self._obsolete_inflight()
        self.take()
        assert self.custody.initialise(self.record, self.now) is False

    @precondition(lambda self: self.custody.record is not None)
    @rule(new_key=st.booleans())
    def initialise_again_with_a_new_epoch(self, new_key: bool) -> None:
        self.epoch += 1
        self._seal(self.wrong_key if new_key else self.key, self.record)
        assert self.custody.initialise(self.record, self.now, replace=True) is True
        self._obsolete_inflight()
        self.verified_from.clear()
        self.from_operator.clear()
        self.take()

    @precondition(lambda self: self.custody.phase is Phase.RECOVERING)
    @rule(data=st.data(), genuine=st.booleans())
    def operator_submits_a_shard(self, data: st.DataObject, genuine: bool) -> None:
        keeper_id = data.draw(st.sampled_from(self.ids), label="keeper")
        if genuine:
            share = self.shares[keeper_id]
        else:
            share = share_for(self.wrong_key, epoch=self.epoch, threshold=self.threshold, id=keeper_id)
        if not genuine or keeper_id in self.from_operator:
            try:
                self.custody.submit_shard(share, self.now)
            except ShareRejected:
                pass
            else:
                raise AssertionError("a foreign or repeated shard was accepted")
            assert self.custody.effects() == []
            return
        self.from_operator.add(keeper_id)
        progress = self.custody.submit_shard(share, self.now)
        self.take()
        assert progress.ready is (self.custody.phase is Phase.READY)

    @precondition(lambda self: self.custody.record is not None)
    @rule()
    def restart_nexus(self) -> None:
        self._start_custody(self.record)

    @precondition(lambda self: self.custody.record is not None)
    @rule(back=st.floats(0.0, 10.0))
    def driver_confirms_its_record(self, back: float) -> None:
        """The driver read the store (begun `back` seconds ago) and found the machine's own record."""
        self.custody.confirm_record(self.now - back, self.now)
        self.take()

    # ------------------------------------------------------------ invariants

    @invariant()
    def ready_means_the_real_key(self) -> None:
        if self.custody.phase is Phase.READY:
            assert self.custody.root_key == self.key
            assert self.custody.record is not None and self.custody.record.matches_key(self.custody.root_key)
            assert self.custody.shards_needed == 0

    @invariant()
    def ready_needs_threshold_verified_shards(self) -> None:
        if self.custody.phase is Phase.READY:
            assert len(self.verified_from | self.from_operator) >= self.threshold

    @invariant()
    def no_key_without_a_record(self) -> None:
        if self.custody.record is None:
            assert self.custody.phase is Phase.UNINITIALISED

    @invariant()
    def requests_never_outlive_the_next_poll(self) -> None:
        next_poll = {v.keeper_id: v.next_poll_at for v in self.custody.keepers()}
        for request in self.inflight.values():
            assert request.deadline <= next_poll[request.keeper_id]

    @invariant()
    def next_deadline_is_the_earliest_pending_timer(self) -> None:
        deadline = self.custody.next_deadline()
        pending = [v.next_poll_at for v in self.custody.keepers()]
        pending += [r.deadline for r in self.inflight.values()]
        assert math.isfinite(deadline)
        assert deadline == min(pending)
        assert deadline >= self.now  # the driver has run every timer that was due

    @invariant()
    def only_reachable_rules_are_used(self) -> None:
        assert self.custody._cannot_happen == 0

    @invariant()
    def reported_states_match_the_views(self) -> None:
        assert {v.keeper_id: v.state for v in self.custody.keepers()} == self.states
        assert self.custody.phase is self.phase
        assert self.custody.keeper_ids == tuple(self.ids)  # no keeper is ever dropped


NexusCustodyMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestNexusCustodyMachine = NexusCustodyMachine.TestCase
