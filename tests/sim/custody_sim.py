"""A deterministic simulation of one Nexus custody machine and its keepers.

Nothing here uses real time, threads or sockets.  A `World` holds one
`NexusCustody`, 1..9 real `Keeper` machines, a fake clock (a heap of timed
events) and a seeded `random.Random` that injects faults:

* keeper restarts (the keeper is replaced by a new, empty one),
* outages: requests refused at once, or never answered (timeouts),
* slow keepers that answer after the request's deadline,
* garbage answers (a broken proxy in front of the keeper),
* keepers holding a wrong shard (another key's, another keeper's, a stale epoch's,
  or one labelled with an epoch the deployment never had, newer or older: what
  the bootstrap identity can contribute),
* Nexus restarts (a new `NexusCustody` with the same key record: the key is lost),
* a late bootstrap (the Nexus starts without a record) and operator restores.

The world only *records facts* (`Fact` subclasses) as it goes: what was polled
and pushed when, what each keeper really holds, whether it is reachable, the
Nexus phase, every recovery and what was known when it happened.  Judging
those facts against the custody rules is the job of the tests.

Time inside the world is in seconds of simulated time; a run of 60 poll
intervals is a few thousand heap events.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import msgspec

from spike.protocol import (
    KEEPER_CONTRIBUTE_PATH,
    KEEPER_SHARD_PATH,
    ApiRequest,
    Effect,
    Keeper,
    KeeperChange,
    KeeperMisbehaved,
    KeyRecord,
    KeyRecovered,
    NewerKeySeen,
    NexusCustody,
    Phase,
    PhaseChanged,
    PollSchedule,
    RemoteProtocolError,
    RequestFailed,
    RequestKind,
    ResponseReceived,
    RestoreProgress,
    Role,
    RootKey,
    SendRequest,
    ShardContribution,
    Share,
    SpiffeId,
    TrustDomains,
    deal,
    seal_key,
)
from spike.protocol.events import Answer
from spike.protocol.material import MAX_EPOCH
from spike.protocol.wire import decode, encode

TRUST = TrustDomains.single("spike.sim")
NEXUS_PEER = TRUST.id_of(Role.NEXUS)
BOOTSTRAP_PEER = TRUST.id_of(Role.BOOTSTRAP)


class Mode(Enum):
    """How a keeper (or the network in front of it) treats requests."""

    UP = "up"  # answers within `SimConfig.max_latency`
    REFUSING = "refusing"  # connection refused at once
    SILENT = "silent"  # never answers: the request times out
    SLOW = "slow"  # handles the request but answers after the deadline
    GARBAGE = "garbage"  # something answers garbage instead of the keeper


class WrongShard(Enum):
    """What a keeper seeded with a wrong shard holds."""

    STALE = "stale"  # its own shard of the previous epoch, labelled as such
    STALE_GO = "stale-go"  # the same without extension fields (as SPIKE's Go keeper would hold it)
    FOREIGN = "foreign"  # its shard of another key
    FOREIGN_GO = "foreign-go"
    SWAPPED = "swapped"  # another keeper's current shard, labelled with that keeper's id
    SWAPPED_GO = "swapped-go"
    NEVER_HAD_NEWER = "never-had-newer"  # its own bytes labelled with an epoch above the record's
    NEVER_HAD_OLDER = "never-had-older"  # its own bytes labelled with an epoch below the record's history


class FaultKind(Enum):
    KEEPER_RESTART = "keeper-restart"
    KEEPER_MODE = "keeper-mode"
    KEEPER_CORRUPT = "keeper-corrupt"
    NEXUS_RESTART = "nexus-restart"
    BOOTSTRAP = "bootstrap"
    OPERATOR_RESTORE = "operator-restore"


@dataclass(frozen=True, slots=True)
class Fault:
    at: float
    kind: FaultKind
    keeper_id: int = 0
    mode: Mode = Mode.UP
    duration: float = 0.0
    wrong: WrongShard = WrongShard.STALE


@dataclass(frozen=True, slots=True)
class SimConfig:
    intervals: int = 60  # length of a run, in poll intervals
    interval: float = 5.0
    request_timeout: float = 2.0
    max_latency: float = 0.25  # an UP keeper's answer arrives within this

    @property
    def duration(self) -> float:
        return self.intervals * self.interval


@dataclass(frozen=True, slots=True)
class Scenario:
    """Everything a seed decides before the run starts."""

    seed: int
    keeper_ids: tuple[int, ...]
    threshold: int
    jitter: float
    epoch: int
    initially: tuple[tuple[int, WrongShard | None, bool], ...]  # (keeper, wrong shard or None, holds own)
    bootstrap_at: float | None  # None: the key record exists from the start
    faults: tuple[Fault, ...]
    go_keepers: frozenset[int] = frozenset()  # keepers that behave like SPIKE's Go keeper

    @classmethod
    def draw(cls, seed: int, config: SimConfig) -> Scenario:
        rng = random.Random(f"scenario-{seed}")
        interval, duration = config.interval, config.duration
        n = rng.randint(1, 9)
        ids = tuple(range(1, n + 1)) if rng.random() < 0.5 else tuple(sorted(rng.sample(range(1, 256), n)))
        threshold = rng.randint(1, n)
        jitter = rng.choice([0.0, 0.05, 0.1, 0.25])
        epoch = rng.randint(1, 10_000)
        bootstrap_at = rng.uniform(0.0, 10 * interval) if rng.random() < 0.2 else None
        holding = rng.choice([1.0, 0.9, 0.6, 0.3])
        initially: list[tuple[int, WrongShard | None, bool]] = []
        for keeper_id in ids:
            if bootstrap_at is None and rng.random() < holding:
                initially.append((keeper_id, None, True))
            elif rng.random() < 0.5:
                initially.append((keeper_id, None, False))  # empty
            else:
                initially.append((keeper_id, rng.choice(list(WrongShard)), False))
        faults: list[Fault] = []
        storm = rng.choice([0.0, 0.03, 0.1, 0.25, 0.5])  # faults per keeper per interval
        modes = [Mode.REFUSING, Mode.SILENT, Mode.SLOW, Mode.GARBAGE]
        for keeper_id in ids:
            at = 0.0
            while storm:
                at += rng.expovariate(storm / interval)
                if at >= duration:
                    break
                roll = rng.random()
                if roll < 0.3:
                    faults.append(Fault(at, FaultKind.KEEPER_RESTART, keeper_id, duration=rng.uniform(0.01, 1.0)))
                elif roll < 0.8:
                    mode = rng.choice(modes)
                    faults.append(Fault(at, FaultKind.KEEPER_MODE, keeper_id, mode, rng.uniform(0.2, 4.0) * interval))
                else:
                    faults.append(Fault(at, FaultKind.KEEPER_CORRUPT, keeper_id, wrong=rng.choice(list(WrongShard))))
        nexus_restarts = rng.choice([0.0, 0.0, 0.02, 0.08])  # per interval
        at = 0.0
        while nexus_restarts:
            at += rng.expovariate(nexus_restarts / interval)
            if at >= duration:
                break
            faults.append(Fault(at, FaultKind.NEXUS_RESTART))
        if bootstrap_at is not None:
            faults.append(Fault(bootstrap_at, FaultKind.BOOTSTRAP))
        if rng.random() < 0.15:
            faults.append(Fault(rng.uniform(0.0, duration), FaultKind.OPERATOR_RESTORE))
        faults.sort(key=lambda f: f.at)
        go_keepers = frozenset(k for k in ids if rng.random() < 0.3) if rng.random() < 0.3 else frozenset()
        return cls(seed, ids, threshold, jitter, epoch, tuple(initially), bootstrap_at, tuple(faults), go_keepers)


# ---------------------------------------------------------------------------- facts


@dataclass(frozen=True, slots=True)
class Fact:
    at: float


@dataclass(frozen=True, slots=True)
class NexusStarted(Fact):
    """A Nexus instance started, or the running one was initialised: its poll schedule restarts."""

    generation: int
    has_record: bool
    reason: str  # "start", "restart" or "initialise"


@dataclass(frozen=True, slots=True)
class PhaseIs(Fact):
    phase: Phase


@dataclass(frozen=True, slots=True)
class Polled(Fact):
    keeper_id: int


@dataclass(frozen=True, slots=True)
class Pushed(Fact):
    keeper_id: int
    own_shard: bool  # the body is exactly the keeper's current shard


@dataclass(frozen=True, slots=True)
class KeeperHolds(Fact):
    """What a keeper really holds changed (read from the keeper itself)."""

    keeper_id: int
    own_shard: bool


@dataclass(frozen=True, slots=True)
class KeeperMode(Fact):
    keeper_id: int
    mode: Mode


@dataclass(frozen=True, slots=True)
class ShardAnswered(Fact):
    """A 200 answer to a shard read reached the Nexus while its request was live."""

    keeper_id: int
    own_shard: bool
    reported: bool  # the Nexus reported the keeper as misbehaving for it
    record_known: bool


@dataclass(frozen=True, slots=True)
class NewerEpochShown(Fact):
    """The Nexus reported a keeper showing a shard of an epoch above its record (`NewerKeySeen`)."""

    keeper_id: int
    epoch: int


@dataclass(frozen=True, slots=True)
class LateAnswer(Fact):
    """An answer reached the Nexus after its request's deadline."""

    keeper_id: int
    had_effects: bool


@dataclass(frozen=True, slots=True)
class OperatorShard(Fact):
    keeper_id: int


@dataclass(frozen=True, slots=True)
class Recovered(Fact):
    source: str
    keeper_ids: tuple[int, ...]
    key_matches: bool  # the key in use is the real root key
    eligible: frozenset[int]  # keepers whose own shard the Nexus had been given, plus operator shards


@dataclass(frozen=True, slots=True)
class RunEnded(Fact):
    phase: Phase
    key_matches: bool | None  # None when the Nexus holds no key


@dataclass(slots=True)
class Run:
    scenario: Scenario
    config: SimConfig
    facts: list[Fact]
    trace: list[tuple[float, int, Effect]]  # every effect with its time and Nexus generation
    requests: int
    events: int
    cannot_happen: int = 0  # answers that hit a rules-table row marked impossible, over every Nexus instance

    def digest(self) -> str:
        """A fingerprint of the whole history: every effect (request bodies included) and when."""
        h = hashlib.sha256()
        for at, generation, effect in self.trace:
            h.update(f"{at!r}|{generation}|{effect!r}".encode())
            if isinstance(effect, SendRequest):
                h.update(effect.body)
        return h.hexdigest()


# ---------------------------------------------------------------------------- the world


class Custody(Protocol):
    """The part of `NexusCustody` the world drives (a test may wrap the real machine).

    The world is also the store of the key record, and the only writer of it: a
    `NewerKeySeen` is answered at once with `confirm_record`, as spike's Nexus
    does on SQLite.
    """

    @property
    def phase(self) -> Phase: ...
    @property
    def record(self) -> KeyRecord | None: ...
    @property
    def root_key(self) -> RootKey: ...
    def effects(self) -> list[Effect]: ...
    def next_deadline(self) -> float: ...
    def handle_timer(self, now: float) -> None: ...
    def receive(self, answer: Answer, now: float) -> None: ...
    def initialise(self, record: KeyRecord, now: float, *, replace: bool = False) -> bool: ...
    def submit_shard(self, share: Share, now: float) -> RestoreProgress: ...
    def confirm_record(self, checked_at: float, now: float) -> int: ...


CustodyFactory = Callable[..., Custody]

GO_EMPTY = b'{"err":"api_bad_request"}'
GARBAGE_ANSWERS: tuple[tuple[int, bytes], ...] = (
    (200, b""),
    (200, b"{"),
    (200, b"null"),
    (200, b"{}"),
    (200, b'{"shard":"AAAA"}'),
    (200, encode({"shard": [7] * 31})),
    (200, encode({"shard": [255] * 32})),
    (200, encode({"shard": [1.5] * 32})),
    (500, b'{"err":"api_internal_error"}'),
    (502, b"<html>bad gateway</html>"),
    (302, b""),
    (401, b'{"err":"access_unauthorized"}'),
)


@dataclass(slots=True)
class _KeeperSlot:
    keeper: Keeper
    mode: Mode = Mode.UP
    mode_token: int = 0
    holds_own: bool = False


class World:
    """One run: a Nexus, its keepers, the network between them and a fault schedule."""

    def __init__(
        self, scenario: Scenario, config: SimConfig | None = None, custody: CustodyFactory = NexusCustody
    ) -> None:
        self.scenario = s = scenario
        self.config = config or SimConfig()
        self._custody_factory = custody
        self._rng = random.Random(f"world-{s.seed}")
        self.key = RootKey.generate(self._rng.randbytes)
        self.record, self.shares = seal_key(self.key, epoch=s.epoch, threshold=s.threshold, keeper_ids=s.keeper_ids)
        # The deployment had the epoch before this one and none earlier (so NEVER_HAD_OLDER exists when epoch >= 2).
        self.record = msgspec.structs.replace(self.record, history=((s.epoch - 1, s.epoch - 1),)).validate()
        other_key = RootKey.generate(self._rng.randbytes)
        self._foreign = deal(other_key, epoch=s.epoch, threshold=s.threshold, ids=s.keeper_ids)
        self._stale = deal(self.key, epoch=s.epoch - 1, threshold=s.threshold, ids=s.keeper_ids)
        self._own_bodies = {k: encode(ShardContribution.of(share)) for k, share in self.shares.items()}
        self._schedule = PollSchedule(self.config.interval, s.jitter, self.config.request_timeout)
        self.now = 0.0
        self.facts: list[Fact] = []
        self._events: list[tuple[float, int, Callable[[], None]]] = []  # (when, order, what)
        self._seq = 0
        self._trace: list[tuple[float, int, Effect]] = []
        self._requests = 0
        self._handled = 0
        self._slots = {k: _KeeperSlot(Keeper(TRUST)) for k in s.keeper_ids}
        self._generation = 0
        self._cannot_happen = 0
        self._bootstrapped = s.bootstrap_at is None
        self._live: dict[int, SendRequest] = {}
        self._verified: set[int] = set()
        self._from_operator: set[int] = set()
        for keeper_id, wrong, holds in s.initially:
            if holds:
                self._contribute(keeper_id, self._own_bodies[keeper_id])
            elif wrong is not None:
                self._contribute(keeper_id, self._wrong_body(keeper_id, wrong))
            self.facts.append(KeeperHolds(0.0, keeper_id, self._slots[keeper_id].holds_own))
            self.facts.append(KeeperMode(0.0, keeper_id, Mode.UP))
        for fault in s.faults:
            self._at(fault.at, functools.partial(self._fault, fault))
        self.nexus = self._new_nexus("start")

    # ------------------------------------------------------------ running

    def run(self) -> Run:
        end = self.config.duration
        events = self._events
        nexus_deadline = self.nexus.next_deadline
        while True:
            timer = nexus_deadline()
            event_time = events[0][0] if events else math.inf
            if min(timer, event_time) > end:
                break
            self._handled += 1
            if event_time <= timer:  # answers and faults first, then timers due at the same instant
                self.now, _, action = heapq.heappop(events)
                action()
                nexus_deadline = self.nexus.next_deadline  # a Nexus restart replaces the machine
            else:
                self.now = timer
                self.nexus.handle_timer(timer)
                self._drain()
        self.now = end
        key_matches = self.nexus.root_key == self.key if self.nexus.phase is Phase.READY else None
        self.facts.append(RunEnded(end, self.nexus.phase, key_matches))
        cannot_happen = self._cannot_happen + getattr(self.nexus, "_cannot_happen", 0)
        return Run(self.scenario, self.config, self.facts, self._trace, self._requests, self._handled, cannot_happen)

    def _at(self, when: float, action: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._events, (when, self._seq, action))

    def _drain(self) -> list[Effect]:
        drained: list[Effect] = []
        trace = self._trace
        while effects := self.nexus.effects():
            drained += effects
            for effect in effects:
                trace.append((self.now, self._generation, effect))
                if isinstance(effect, SendRequest):
                    self._perform(effect)
                elif isinstance(effect, PhaseChanged):
                    self.facts.append(PhaseIs(self.now, effect.phase))
                elif isinstance(effect, KeyRecovered):
                    matches = self.nexus.root_key == self.key
                    eligible = frozenset(self._verified | self._from_operator)
                    self.facts.append(Recovered(self.now, effect.source, effect.keeper_ids, matches, eligible))
                elif isinstance(effect, NewerKeySeen):
                    # The world holds the one key record and nobody else writes it: the label is garbage.
                    self.facts.append(NewerEpochShown(self.now, effect.keeper_id, effect.epoch))
                    self.nexus.confirm_record(effect.at, self.now)
        return drained

    # ------------------------------------------------------------ the Nexus's requests

    def _perform(self, request: SendRequest) -> None:
        self._requests += 1
        keeper_id = request.keeper_id
        self._live[request.request_id] = request
        if request.kind is RequestKind.POLL:
            self.facts.append(Polled(self.now, keeper_id))
        elif request.kind is RequestKind.PUSH:
            self.facts.append(Pushed(self.now, keeper_id, request.body == self._own_bodies[keeper_id]))
        slot = self._slots[keeper_id]
        rng = self._rng
        answer: Answer
        if slot.mode is Mode.UP:
            status, body = self._keeper_handles(keeper_id, request)
            answer = ResponseReceived(request.request_id, status, body)
            when = self.now + rng.uniform(0.001, self.config.max_latency)
        elif slot.mode is Mode.REFUSING:
            answer = RequestFailed(request.request_id, "connection refused")
            when = self.now + rng.uniform(0.0005, 0.005)
        elif slot.mode is Mode.SILENT:
            if rng.random() < 0.5:
                return  # nobody tells the Nexus: its own timer fires
            answer = RequestFailed(request.request_id, "timed out")  # the driver gives up at the deadline
            when = request.deadline
        elif slot.mode is Mode.SLOW:
            status, body = self._keeper_handles(keeper_id, request)
            answer = ResponseReceived(request.request_id, status, body)
            when = request.deadline + rng.uniform(0.001, 1.0)
        else:
            status, body = GARBAGE_ANSWERS[rng.randrange(len(GARBAGE_ANSWERS))]
            if rng.random() < 0.25:
                body = rng.randbytes(rng.randrange(64))
            answer = ResponseReceived(request.request_id, status, body)
            when = self.now + rng.uniform(0.001, self.config.max_latency)
        self._at(when, functools.partial(self._deliver, self._generation, keeper_id, answer))

    def _keeper_handles(self, keeper_id: int, request: SendRequest) -> tuple[int, bytes]:
        return self._keeper_request(keeper_id, request.path, NEXUS_PEER, request.body)

    def _keeper_request(self, keeper_id: int, path: str, peer: SpiffeId, body: bytes) -> tuple[int, bytes]:
        """One request to a keeper; a Go-style keeper keeps only the shard and says 400 when empty."""
        go_style = keeper_id in self.scenario.go_keepers
        if go_style and path == KEEPER_CONTRIBUTE_PATH:
            with contextlib.suppress(RemoteProtocolError):
                body = encode(ShardContribution(decode(body, ShardContribution).shard))
        outcome = self._slots[keeper_id].keeper.handle(ApiRequest("POST", path, peer, body))
        if outcome.change is not KeeperChange.NONE:
            self._refresh_truth(keeper_id)
        if go_style and outcome.response.status == 404:
            return 400, GO_EMPTY
        return outcome.response.status, outcome.response.body

    def _deliver(self, generation: int, keeper_id: int, answer: Answer) -> None:
        if generation != self._generation:
            return  # the Nexus instance that asked is gone, and its connections with it
        request = self._live.pop(answer.request_id, None)
        if request is None:
            self.nexus.receive(answer, self.now)  # made obsolete by initialise: must be ignored
            self.facts.append(LateAnswer(self.now, keeper_id, bool(self._drain())))
            return
        if self.now > request.deadline:
            self.nexus.receive(answer, self.now)
            self.facts.append(LateAnswer(self.now, keeper_id, bool(self._drain())))
            return
        body = answer.body if isinstance(answer, ResponseReceived) and answer.status == 200 else None
        shard_read = body is not None and request.kind is not RequestKind.PUSH
        own = body is not None and shard_read and self._is_own(keeper_id, body)
        record_known = self.nexus.record is not None
        if own and record_known:
            self._verified.add(keeper_id)
        self.nexus.receive(answer, self.now)
        effects = self._drain()
        if shard_read:
            reported = any(isinstance(e, KeeperMisbehaved) and e.keeper_id == keeper_id for e in effects)
            self.facts.append(ShardAnswered(self.now, keeper_id, own, reported, record_known))

    # ------------------------------------------------------------ faults

    def _fault(self, fault: Fault) -> None:
        kind = fault.kind
        if kind is FaultKind.KEEPER_RESTART:
            slot = self._slots[fault.keeper_id]
            slot.keeper.forget()
            slot.keeper = Keeper(TRUST)
            self._refresh_truth(fault.keeper_id)
            self._set_mode(fault.keeper_id, Mode.REFUSING, fault.duration)  # down while it restarts
        elif kind is FaultKind.KEEPER_MODE:
            self._set_mode(fault.keeper_id, fault.mode, fault.duration)
        elif kind is FaultKind.KEEPER_CORRUPT:
            self._contribute(fault.keeper_id, self._wrong_body(fault.keeper_id, fault.wrong))
        elif kind is FaultKind.NEXUS_RESTART:
            self._generation += 1
            self._cannot_happen += getattr(self.nexus, "_cannot_happen", 0)
            self.nexus = self._new_nexus("restart")
        elif kind is FaultKind.BOOTSTRAP:
            self._bootstrap()
        else:
            self._operator_restore()

    def _set_mode(self, keeper_id: int, mode: Mode, duration: float) -> None:
        slot = self._slots[keeper_id]
        slot.mode_token += 1
        if slot.mode is not mode:
            slot.mode = mode
            self.facts.append(KeeperMode(self.now, keeper_id, mode))
        self._at(self.now + duration, functools.partial(self._mode_end, keeper_id, slot.mode_token))

    def _mode_end(self, keeper_id: int, token: int) -> None:
        slot = self._slots[keeper_id]
        if slot.mode_token == token and slot.mode is not Mode.UP:
            slot.mode = Mode.UP
            self.facts.append(KeeperMode(self.now, keeper_id, Mode.UP))

    def _new_nexus(self, reason: str) -> Custody:
        record: KeyRecord | None = self.record if self._bootstrapped else None
        nexus = self._custody_factory(
            self.scenario.keeper_ids,
            threshold=self.scenario.threshold,
            schedule=self._schedule,
            rng=random.Random(f"nexus-{self.scenario.seed}-{self._generation}"),
            now=self.now,
            record=record,
        )
        self._live.clear()
        self._verified.clear()
        self._from_operator.clear()
        self.facts.append(NexusStarted(self.now, self._generation, record is not None, reason))
        self.facts.append(PhaseIs(self.now, nexus.phase))
        return nexus

    def _bootstrap(self) -> None:
        """`spike bootstrap`: seed every reachable keeper, then hand the record to Nexus."""
        for keeper_id in self.scenario.keeper_ids:
            if self._slots[keeper_id].mode is Mode.UP:
                self._contribute(keeper_id, self._own_bodies[keeper_id])
        self._bootstrapped = True
        self.nexus.initialise(self.record, self.now)
        self._live.clear()  # answers to earlier requests no longer count
        self._verified.clear()
        self.facts.append(NexusStarted(self.now, self._generation, True, "initialise"))
        self._drain()

    def _operator_restore(self) -> None:
        """`spike operator restore`: recovery shards handed in one at a time until Nexus is ready."""
        if self.nexus.record is None or self.nexus.phase is not Phase.RECOVERING:
            return
        candidates = [k for k in self.scenario.keeper_ids if k not in self._from_operator]
        for keeper_id in self._rng.sample(candidates, min(len(candidates), self.scenario.threshold)):
            self._from_operator.add(keeper_id)
            self.facts.append(OperatorShard(self.now, keeper_id))
            progress = self.nexus.submit_shard(self.shares[keeper_id], self.now)
            self._drain()
            if progress.ready:
                break

    # ------------------------------------------------------------ keeper contents

    def _wrong_body(self, keeper_id: int, wrong: WrongShard) -> bytes:
        ids = self.scenario.keeper_ids
        epoch = self.scenario.epoch
        if wrong is WrongShard.NEVER_HAD_OLDER and epoch >= 2:
            return encode(ShardContribution(list(self.shares[keeper_id].secret_bytes()), keeper_id, epoch - 2))
        if wrong in (WrongShard.NEVER_HAD_NEWER, WrongShard.NEVER_HAD_OLDER):
            label = MAX_EPOCH if self._rng.random() < 0.5 else epoch + self._rng.randint(1, 1000)
            return encode(ShardContribution(list(self.shares[keeper_id].secret_bytes()), keeper_id, label))
        if wrong in (WrongShard.STALE, WrongShard.STALE_GO):
            share = self._stale[keeper_id]
        elif wrong in (WrongShard.FOREIGN, WrongShard.FOREIGN_GO):
            share = self._foreign[keeper_id]
        else:
            other = ids[(ids.index(keeper_id) + 1) % len(ids)]
            share = self.shares[other] if other != keeper_id else Share(keeper_id, self.scenario.epoch, b"\x01" * 32)
        contribution = ShardContribution.of(share)
        if wrong.value.endswith("-go"):
            contribution = ShardContribution(contribution.shard)
        return encode(contribution)

    def _contribute(self, keeper_id: int, body: bytes) -> None:
        """Seed a keeper the way bootstrap does (also used to plant wrong shards)."""
        status, _ = self._keeper_request(keeper_id, KEEPER_CONTRIBUTE_PATH, BOOTSTRAP_PEER, body)
        if status != 200:
            raise RuntimeError(f"keeper {keeper_id} refused a seed: HTTP {status}")
        self._refresh_truth(keeper_id)

    def _refresh_truth(self, keeper_id: int) -> None:
        """Read what the keeper really holds (as Nexus would) and record a change."""
        slot = self._slots[keeper_id]
        response = slot.keeper.handle(ApiRequest("POST", KEEPER_SHARD_PATH, NEXUS_PEER, b"{}")).response
        own = response.status == 200 and self._is_own(keeper_id, response.body)
        if own != slot.holds_own:
            slot.holds_own = own
            self.facts.append(KeeperHolds(self.now, keeper_id, own))

    def _is_own(self, keeper_id: int, body: bytes) -> bool:
        """Whether `body` carries `keeper_id`'s current shard, judged by value and labels."""
        try:
            answer = decode(body, ShardContribution)
        except RemoteProtocolError:
            return False
        return (
            answer.shard_bytes() == self.shares[keeper_id].secret_bytes()
            and answer.id in (None, keeper_id)
            and answer.epoch in (None, self.scenario.epoch)
        )


def simulate(seed: int, config: SimConfig | None = None, custody: CustodyFactory = NexusCustody) -> Run:
    config = config or SimConfig()
    return World(Scenario.draw(seed, config), config, custody).run()
