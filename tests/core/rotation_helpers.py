"""A small in-memory deployment for rotation tests: real keeper machines, a store, one driver loop.

`Deployment` plays spike's Nexus around a `NexusCustody`: it performs requests
on real `Keeper` machines (SPIKE-style single-slot ones on request), keeps
the key record, the pending rotation and the high-water mark in a dict as a
store would (with the compare-and-set of docs/key-lifecycle.md section 4),
and acknowledges store effects at once unless told to hold them.  A Nexus
"restart" builds a new machine from the store.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from spike.protocol import (
    KEEPER_CONTRIBUTE_PATH,
    KEEPER_SHARD_PATH,
    AbandonRotation,
    Answer,
    ApiRequest,
    CommitRotation,
    Effect,
    Keeper,
    KeyRecord,
    NexusCustody,
    PendingRotation,
    PersistRotation,
    Phase,
    PollSchedule,
    RequestFailed,
    ResponseReceived,
    Role,
    RootKey,
    SendRequest,
    ShardContribution,
    StoreEffect,
    TrustDomains,
    deal,
    decode,
    encode,
    seal_key,
)
from spike.protocol.wire import KEEPER_FORGET_PATH

TRUST = TrustDomains.single("spike.test")
NEXUS = TRUST.id_of(Role.NEXUS)
BOOTSTRAP = TRUST.id_of(Role.BOOTSTRAP)
GO_EMPTY = b'{"err":"api_bad_request"}'


def key_of(seed: int) -> RootKey:
    return RootKey.generate(random.Random(seed).randbytes)


@dataclass
class Store:
    """What the driver keeps durably: the key record, the pending rotation, the high-water mark."""

    record: bytes
    pending: bytes | None = None
    highest: int = 0

    def current(self) -> KeyRecord:
        return decode(self.record, KeyRecord).validate()

    def rotation(self) -> PendingRotation | None:
        return None if self.pending is None else decode(self.pending, PendingRotation).validate()

    def persist(self, pending: PendingRotation) -> bool:
        if self.pending is not None or self.current().epoch != pending.from_epoch:
            return False
        self.pending = encode(pending)
        return True

    def commit(self, pending: PendingRotation) -> bool:
        if self.pending != encode(pending) or self.current().epoch != pending.from_epoch:
            return False
        self.record, self.pending = encode(pending.record), None
        return True

    def abandon(self, pending: PendingRotation) -> bool:
        if self.pending != encode(pending):
            return False
        self.pending, self.highest = None, max(self.highest, pending.record.epoch)
        return True


@dataclass
class Deployment:
    """Keepers, a store, a Nexus; `run_until` plays the driver loop on a simulated clock."""

    ids: tuple[int, ...] = (1, 2, 3)
    threshold: int = 2
    go_keepers: frozenset[int] = frozenset()
    seed: int = 1
    interval: float = 5.0
    now: float = 0.0
    hold_store: bool = False  # leave store effects in `held` instead of performing them
    rekey: bool = False
    keepers: dict[int, Keeper] = field(default_factory=dict)
    down: set[int] = field(default_factory=set)
    reports: list[Effect] = field(default_factory=list)
    requests: list[SendRequest] = field(default_factory=list)
    held: list[StoreEffect] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.key = key_of(self.seed)
        record, shares = seal_key(self.key, epoch=1, threshold=self.threshold, keeper_ids=self.ids)
        self.store = Store(encode(record))
        for keeper_id in self.ids:
            self.keepers[keeper_id] = Keeper(TRUST)
            self.contribute(keeper_id, encode(ShardContribution.of(shares[keeper_id])))
        self.nexus = self.start(self.ids, self.threshold)
        self.run_for(1.0)
        assert self.nexus.phase is Phase.READY

    # -- the pieces

    def start(self, ids: Iterable[int] | None = None, threshold: int | None = None) -> NexusCustody:
        """A Nexus (re)started from the store, configured with `ids` and `threshold`."""
        self.nexus = NexusCustody(
            self.ids if ids is None else ids,
            threshold=self.threshold if threshold is None else threshold,
            schedule=PollSchedule(interval=self.interval, jitter=0.1, request_timeout=1.0),
            rng=random.Random(self.seed),
            now=self.now,
            record=self.store.current(),
            pending=self.store.rotation(),
            highest_epoch=self.store.highest,
            rekey=self.rekey,
            random_bytes=random.Random(self.seed + 1000).randbytes,
        )
        return self.nexus

    def restart(self, ids: Iterable[int] | None = None, threshold: int | None = None) -> NexusCustody:
        self.nexus.forget(self.now)
        self.held.clear()
        return self.start(ids, threshold)

    def contribute(self, keeper_id: int, body: bytes) -> None:
        keeper = self.keeper(keeper_id)
        assert keeper.handle(ApiRequest("POST", KEEPER_CONTRIBUTE_PATH, BOOTSTRAP, body)).response.status == 200

    def keeper(self, keeper_id: int) -> Keeper:
        if keeper_id not in self.keepers:
            self.keepers[keeper_id] = Keeper(TRUST)
        return self.keepers[keeper_id]

    def restart_keeper(self, keeper_id: int) -> None:
        self.keeper(keeper_id).forget()
        self.keepers[keeper_id] = Keeper(TRUST)

    def epochs(self) -> dict[int, tuple[int | None, ...]]:
        """What every keeper holds, by epoch label (latest first)."""
        return {k: keeper.epochs for k, keeper in sorted(self.keepers.items())}

    def holders(self, key: RootKey, record: KeyRecord) -> set[int]:
        """Keepers holding their genuine shard of `record` (in either slot)."""
        shares = deal(key, epoch=record.epoch, threshold=record.threshold, ids=record.keeper_ids)
        found = set()
        for keeper_id, share in shares.items():
            keeper = self.keepers.get(keeper_id)
            if keeper is None or not keeper.holds_shard:
                continue
            request = ApiRequest("POST", KEEPER_SHARD_PATH, NEXUS, encode({"epoch": record.epoch}))
            body = msgspec.json.decode(keeper.handle(request).response.body)
            if bytes(body["shard"]) == share.secret_bytes() and body.get("epoch") in (None, record.epoch):
                found.add(keeper_id)
        return found

    # -- the driver

    def network(self, effect: SendRequest) -> Answer:
        if effect.keeper_id in self.down or effect.keeper_id not in self.keepers:
            return RequestFailed(effect.request_id, "connection refused")
        body = effect.body
        go = effect.keeper_id in self.go_keepers
        if go and effect.path == KEEPER_FORGET_PATH:
            return ResponseReceived(effect.request_id, 400, GO_EMPTY)
        if go and effect.path == KEEPER_CONTRIBUTE_PATH:
            body = encode(ShardContribution(decode(body, ShardContribution).shard))
        if go and effect.path == KEEPER_SHARD_PATH:
            body = b"{}"
        response = self.keepers[effect.keeper_id].handle(ApiRequest("POST", effect.path, NEXUS, body)).response
        if go and response.status == 404:
            return ResponseReceived(effect.request_id, 400, GO_EMPTY)
        return ResponseReceived(effect.request_id, response.status, response.body)

    def perform(self, effect: StoreEffect) -> None:
        if isinstance(effect, PersistRotation):
            if self.store.persist(effect.pending):
                self.nexus.rotation_persisted(self.now)
            else:
                self.nexus.rotation_not_persisted(self.now, "the store refused it")
        elif isinstance(effect, CommitRotation):
            assert self.store.commit(effect.pending)
            self.nexus.rotation_committed(self.now)
        elif isinstance(effect, AbandonRotation):
            assert self.store.abandon(effect.pending)
            self.nexus.rotation_abandoned(self.now)

    def release(self) -> None:
        """Perform the store effects held so far (`hold_store`)."""
        held, self.held = self.held, []
        for effect in held:
            self.perform(effect)

    def run_until(self, end: float, *, stop: Callable[[], bool] | None = None) -> None:
        while True:
            while effects := self.nexus.effects():  # drain: an answer brings new requests at once
                self._dispatch(effects)
            if stop is not None and stop():
                return
            wake = self.nexus.next_deadline()
            if wake > end:
                self.now = end
                return
            self.now = max(self.now, wake)
            self.nexus.handle_timer(self.now)

    def _dispatch(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, SendRequest):
                self.requests.append(effect)
                self.nexus.receive(self.network(effect), self.now)
            elif isinstance(effect, PersistRotation | CommitRotation | AbandonRotation):
                if self.hold_store:
                    self.held.append(effect)
                else:
                    self.perform(effect)
            else:
                self.reports.append(effect)

    def run_for(self, seconds: float, *, stop: Callable[[], bool] | None = None) -> None:
        self.run_until(self.now + seconds, stop=stop)
