"""Hypothesis drives key rotations through arbitrary interleavings of answers, store writes, kills and faults.

Real keeper machines (some behaving like SPIKE's single-slot keeper), a store
with the compare-and-set of docs/key-lifecycle.md section 4, and one
`NexusCustody` that hypothesis restarts at will: between a store write and
its acknowledgement, while dealing, while committing.  Requests are answered,
failed or left to time out in any order.  After every step:

* never neither: if the keepers of the stored record kept what they were
  given, the stored record's key or the stored rotation's is rebuildable
  from what the keepers really hold;
* nothing of a new epoch reached a keeper before the store held it;
* epochs only grow: every stored rotation is above everything stored before;
* a READY machine holds exactly the key of its record;
* no answer hits a rules-table row marked impossible, and nothing raises.
"""

from __future__ import annotations

import contextlib
import random

import msgspec
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from spike.protocol import (
    KEEPER_CONTRIBUTE_PATH,
    KEEPER_SHARD_PATH,
    AbandonRotation,
    ApiRequest,
    CommitRotation,
    Keeper,
    KeyRecord,
    LocalProtocolError,
    NexusCustody,
    PersistRotation,
    Phase,
    PollSchedule,
    RequestFailed,
    ResponseReceived,
    RootKey,
    SendRequest,
    ShardContribution,
    StoreEffect,
    deal,
    decode,
    encode,
    seal_key,
)
from spike.protocol.wire import KEEPER_FORGET_PATH
from tests.core.rotation_helpers import BOOTSTRAP, NEXUS, TRUST


class RotationMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.keepers: dict[int, Keeper] = {}
        self.go: set[int] = set()
        self.requests: dict[int, SendRequest] = {}
        self.writes: list[StoreEffect] = []
        self.keys: dict[int, RootKey] = {}
        self.records: dict[int, KeyRecord] = {}
        self.problems: list[str] = []
        self.cannot_happen = 0
        self.seed = 0

    # ------------------------------------------------------------ setup

    @initialize(
        ids=st.sets(st.integers(1, 9), min_size=1, max_size=5).map(sorted),
        data=st.data(),
        seed=st.integers(0, 2**16),
    )
    def setup(self, ids: list[int], data: st.DataObject, seed: int) -> None:
        self.ids = tuple(ids)
        self.threshold = data.draw(st.integers(1, len(ids)))
        self.go = set(data.draw(st.sets(st.sampled_from(ids))))
        self.seed = seed
        self.rng = random.Random(seed)
        key = RootKey.generate(self.rng.randbytes)
        record, shares = seal_key(key, epoch=3, threshold=self.threshold, keeper_ids=self.ids)
        self.keys[3], self.records[3] = key, record
        self.stored, self.pending, self.highest, self.seen_highest = record, None, 3, 3
        for keeper_id in ids:
            self.keepers[keeper_id] = Keeper(TRUST)
            self.contribute(keeper_id, encode(ShardContribution.of(shares[keeper_id])))
        self.start_nexus()
        self.the_network_answers_everything()  # READY with the key, to rotate from the first step

    def start_nexus(self) -> None:
        self.nexus = NexusCustody(
            self.ids,
            threshold=self.threshold,
            schedule=PollSchedule(interval=5.0, jitter=0.1, request_timeout=1.0),
            rng=random.Random(self.seed),
            now=self.now,
            record=self.stored,
            pending=self.pending,
            highest_epoch=self.highest,
            rekey=True,  # the configuration may have moved on (a rekey's threshold) from the stored record
            random_bytes=self.rng.randbytes,
        )
        self.requests.clear()
        self.writes.clear()
        self.nexus.handle_timer(self.now)  # the first round of polls is due at once
        self.drain()

    # ------------------------------------------------------------ the world

    def contribute(self, keeper_id: int, body: bytes) -> None:
        if keeper_id in self.go:
            body = encode(ShardContribution(decode(body, ShardContribution).shard))
        self.keepers[keeper_id].handle(ApiRequest("POST", KEEPER_CONTRIBUTE_PATH, BOOTSTRAP, body))

    def perform(self, request: SendRequest) -> ResponseReceived:
        keeper_id, body = request.keeper_id, request.body
        if request.kind.value in ("push", "deal"):
            epoch = decode(body, ShardContribution).epoch
            in_store = self.stored.epoch >= (epoch or 0) or (
                self.pending is not None and epoch == self.pending.record.epoch
            )
            if not in_store:
                self.problems.append(f"epoch {epoch} given to keeper {keeper_id} before the store held it")
        if keeper_id in self.go:
            if request.path == KEEPER_FORGET_PATH:
                return ResponseReceived(request.request_id, 400, b'{"err":"api_bad_request"}')
            if request.path == KEEPER_CONTRIBUTE_PATH:
                body = encode(ShardContribution(decode(body, ShardContribution).shard))
            if request.path == KEEPER_SHARD_PATH:
                body = b"{}"
        response = self.keepers[keeper_id].handle(ApiRequest("POST", request.path, NEXUS, body)).response
        status = 400 if keeper_id in self.go and response.status == 404 else response.status
        return ResponseReceived(request.request_id, status, response.body)

    def drain(self) -> None:
        while effects := self.nexus.effects():
            for effect in effects:
                if isinstance(effect, SendRequest):
                    self.requests[effect.request_id] = effect
                elif isinstance(effect, PersistRotation | CommitRotation | AbandonRotation):
                    self.writes.append(effect)
        self.cannot_happen = max(self.cannot_happen, self.nexus._cannot_happen)

    def land(self, effect: StoreEffect) -> bool:
        pending = effect.pending
        if isinstance(effect, PersistRotation):
            if self.pending is not None or self.stored.epoch != pending.from_epoch:
                return False
            if pending.record.epoch <= self.seen_highest:
                self.problems.append(f"rotation to epoch {pending.record.epoch}, {self.seen_highest} stored before")
            event("stored: PersistRotation")
            self.pending = pending
            self.keys[pending.record.epoch] = pending.open_new(self.keys[pending.from_epoch])
            self.records[pending.record.epoch] = pending.record
            self.highest = max(self.highest, pending.record.epoch)
            self.seen_highest = max(self.seen_highest, pending.record.epoch)
            return True
        if self.pending != pending:
            return False
        event(f"stored: {type(effect).__name__}")
        if isinstance(effect, CommitRotation):
            self.stored, self.pending = pending.record, None
        else:
            self.pending, self.highest = None, max(self.highest, pending.record.epoch)
        return True

    def holders(self, record: KeyRecord) -> set[int]:
        shares = deal(self.keys[record.epoch], epoch=record.epoch, threshold=record.threshold, ids=record.keeper_ids)
        found = set()
        for keeper_id, share in shares.items():
            request = ApiRequest("POST", KEEPER_SHARD_PATH, NEXUS, encode({"epoch": record.epoch}))
            response = self.keepers[keeper_id].handle(request).response
            if response.status != 200:
                continue
            answer = msgspec.json.decode(response.body)
            if bytes(answer["shard"]) == share.secret_bytes() and answer.get("epoch") in (None, record.epoch):
                found.add(keeper_id)
        return found

    # ------------------------------------------------------------ rules

    @rule(dt=st.floats(0.0, 6.0))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        self.nexus.handle_timer(self.now)
        self.drain()
        for request_id in [r for r, req in self.requests.items() if req.deadline < self.now]:
            del self.requests[request_id]

    @rule()
    def the_next_deadline_comes(self) -> None:
        self.time_passes(max(0.0, self.nexus.next_deadline() - self.now))

    @rule()
    def the_network_answers_everything(self) -> None:
        for _ in range(10):  # a read, its push, its read-back: a few rounds at most
            for request_id in sorted(self.requests):
                request = self.requests.pop(request_id)
                self.nexus.receive(self.perform(request), self.now)
                self.drain()

    @rule()
    def the_store_writes_everything(self) -> None:
        while self.writes:
            self.the_store_writes(True)

    @precondition(lambda self: bool(self.requests))
    @rule(data=st.data(), how=st.sampled_from(["answer", "answer", "answer", "fail"]))
    def a_request_ends(self, data: st.DataObject, how: str) -> None:
        request_id = data.draw(st.sampled_from(sorted(self.requests)))
        request = self.requests.pop(request_id)
        self.now += 0.001
        answer = self.perform(request) if how == "answer" else RequestFailed(request_id, "refused")
        self.nexus.receive(answer, self.now)
        self.drain()

    @rule(data=st.data())
    def a_rotation_is_asked_for(self, data: st.DataObject) -> None:
        rekey = data.draw(st.booleans())
        try:
            if rekey:
                threshold = data.draw(st.integers(1, len(self.ids)))
                self.nexus.start_rotation(self.now, threshold=threshold)
                self.threshold = threshold  # the new configuration, for a Nexus started later
            else:
                self.nexus.start_rotation(self.now)
        except LocalProtocolError:
            pass  # not READY, one under way, or refused for single-slot keepers: nothing changed
        self.drain()

    @rule(now=st.integers(0, 3))
    def the_operator_gives_up(self, now: int) -> None:
        if now:
            return  # one time in four: giving up is rarer than going on
        with contextlib.suppress(LocalProtocolError):  # nothing being dealt, or a single-slot keeper took its new shard
            self.nexus.abort_rotation(self.now)
        self.drain()

    @precondition(lambda self: bool(self.writes))
    @rule(acknowledged=st.booleans())
    def the_store_writes(self, acknowledged: bool) -> None:
        effect = self.writes.pop(0)
        landed = self.land(effect)
        if not acknowledged:
            return  # Nexus may be killed before it hears (see nexus_is_killed)
        if isinstance(effect, PersistRotation):
            if landed:
                self.nexus.rotation_persisted(self.now, effect.pending)
            else:
                self.nexus.rotation_not_persisted(self.now, "refused", effect.pending)
        elif landed and isinstance(effect, CommitRotation):
            self.nexus.rotation_committed(self.now, effect.pending)
        elif landed:
            self.nexus.rotation_abandoned(self.now, effect.pending)
        self.drain()

    @rule()
    def all_goes_well_for_a_while(self) -> None:
        for _ in range(4):
            self.the_next_deadline_comes()
            self.the_network_answers_everything()
            self.the_store_writes_everything()

    @rule(land=st.booleans(), now=st.integers(0, 1))
    def nexus_is_killed(self, land: bool, now: int) -> None:
        if now:
            return
        if land:
            for effect in self.writes:
                self.land(effect)  # the writes in flight landed before it died (or, without `land`, never will)
        self.nexus.forget(self.now)
        self.start_nexus()

    @rule(data=st.data())
    def a_keeper_restarts(self, data: st.DataObject) -> None:
        keeper_id = data.draw(st.sampled_from(self.ids))
        self.keepers[keeper_id].forget()
        self.keepers[keeper_id] = Keeper(TRUST)

    # ------------------------------------------------------------ invariants

    @invariant()
    def never_neither(self) -> None:
        record, pending = self.stored, self.pending
        holders = self.holders(record)
        new_holders = self.holders(pending.record) if pending is not None else set()
        intact = {k for k in record.keeper_ids if k in holders or k in new_holders}
        need = record.threshold
        if pending is not None:
            single = len(self.go & set(record.keeper_ids) & set(pending.record.keeper_ids))
            need += min(single, pending.record.threshold - 1)
        usable = len(holders) >= record.threshold or (
            pending is not None and len(new_holders) >= pending.record.threshold
        )
        assert usable or len(intact) < need, (record.epoch, holders, new_holders, need)

    @invariant()
    def nothing_out_of_turn(self) -> None:
        assert self.problems == []
        assert self.cannot_happen == 0

    @invariant()
    def a_ready_machine_holds_its_records_key(self) -> None:
        if self.nexus.phase is Phase.READY:
            record = self.nexus.record
            assert record is not None and self.nexus.root_key == self.keys[record.epoch]


RotationMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestRotation = RotationMachine.TestCase
