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
* a late bootstrap (the Nexus starts without a record) and operator restores,
* key rotations started at random moments (docs/key-lifecycle.md), given up
  at random moments, scheduled ones, and (with `SimConfig.rekeys`) rekeys to
  other keeper sets and thresholds, live or by restarting Nexus with a new
  configuration.  The world is also the store: it writes each pending
  rotation, commit and abandonment a little later than asked, acknowledges
  it a little later still, and kills Nexus between the write and the
  acknowledgement (or before the write, which then may or may not land) at
  random, so that a restart happens between every pair of steps.

The world only *records facts* (`Fact` subclasses) as it goes: what was polled
and pushed when, what each keeper really holds, whether it is reachable, the
Nexus phase, every recovery and what was known when it happened, what the
store and the keepers together hold after every change (`Held`), every store
write.  Judging those facts against the custody rules is the job of the tests.

Time inside the world is in seconds of simulated time; a run of 60 poll
intervals is a few thousand heap events.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import msgspec

from spike.protocol import (
    KEEPER_CONTRIBUTE_PATH,
    KEEPER_FORGET_PATH,
    KEEPER_SHARD_PATH,
    AbandonRotation,
    ApiRequest,
    CommitRotation,
    Effect,
    Keeper,
    KeeperChange,
    KeeperLeft,
    KeeperMisbehaved,
    KeyRecord,
    KeyRecovered,
    LocalProtocolError,
    NewerKeySeen,
    NexusCustody,
    PendingRotation,
    PersistRotation,
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
    RotationProgress,
    RotationStage,
    RotationView,
    SendRequest,
    ShardAnswer,
    ShardContribution,
    ShardDerivation,
    Share,
    SpiffeId,
    TrustDomains,
    deal,
    seal_key,
    share_for,
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
    ROTATE = "rotate"  # `start_rotation` (to `keeper_ids` and `threshold` when given: a live rekey)
    ABORT = "abort"  # `abort_rotation`
    SCHEDULE = "schedule"  # `rotate_at` a little later
    REKEY_RESTART = "rekey-restart"  # Nexus restarted with another configuration (`rekey=True`)


@dataclass(frozen=True, slots=True)
class Fault:
    at: float
    kind: FaultKind
    keeper_id: int = 0
    mode: Mode = Mode.UP
    duration: float = 0.0
    wrong: WrongShard = WrongShard.STALE
    keeper_ids: tuple[int, ...] = ()  # a rekey's keeper set
    threshold: int = 0  # a rekey's threshold


@dataclass(frozen=True, slots=True)
class SimConfig:
    intervals: int = 60  # length of a run, in poll intervals
    interval: float = 5.0
    request_timeout: float = 2.0
    max_latency: float = 0.25  # an UP keeper's answer arrives within this
    rotations: float = (
        0.5  # share of scenarios with key rotations (those with SPIKE-style keepers only if `go_rotations`)
    )
    go_rotations: bool = False
    rekeys: bool = False  # rotations may move custody to another keeper set or threshold
    kill_around_writes: float = 0.4  # chance that Nexus is killed around each store write
    calm: bool = False  # no storms, no Nexus restarts, no planted garbage: nothing gets in a rotation's way
    derivation: ShardDerivation = ShardDerivation.HMAC  # how every key of the run is split (SPIKE's: no epoch input)

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
    pool: tuple[int, ...] = ()  # more keepers, empty at first, that a rekey may bring in

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
        holding = 1.0 if config.calm else rng.choice([1.0, 0.9, 0.6, 0.3])
        initially: list[tuple[int, WrongShard | None, bool]] = []
        for keeper_id in ids:
            if bootstrap_at is None and rng.random() < holding:
                initially.append((keeper_id, None, True))
            elif rng.random() < 0.5:
                initially.append((keeper_id, None, False))  # empty
            else:
                initially.append((keeper_id, rng.choice(list(WrongShard)), False))
        faults: list[Fault] = []
        storm = 0.0 if config.calm else rng.choice([0.0, 0.03, 0.1, 0.25, 0.5])  # faults per keeper per interval
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
        nexus_restarts = 0.0 if config.calm else rng.choice([0.0, 0.0, 0.02, 0.08])  # per interval
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
        pool: tuple[int, ...] = ()
        if rng.random() < config.rotations and (config.go_rotations or not go_keepers):
            if config.rekeys:
                pool = tuple(sorted(rng.sample([k for k in range(1, 256) if k not in ids], rng.randint(0, 4))))
            faults += _rotations(rng, config, ids + pool)
            faults.sort(key=lambda f: f.at)
        return cls(seed, ids, threshold, jitter, epoch, tuple(initially), bootstrap_at, tuple(faults), go_keepers, pool)


def _rotations(rng: random.Random, config: SimConfig, every: tuple[int, ...]) -> list[Fault]:
    """Rotations (and rekeys, aborts, schedules) at random moments of a run."""
    interval, duration = config.interval, config.duration
    faults: list[Fault] = []
    for _ in range(rng.randint(1, 4)):
        at = rng.uniform(0.0, duration)
        if config.rekeys and rng.random() < 0.7:
            chosen = tuple(sorted(rng.sample(every, rng.randint(1, min(9, len(every))))))
            kind = FaultKind.REKEY_RESTART if rng.random() < 0.3 else FaultKind.ROTATE
            faults.append(Fault(at, kind, keeper_ids=chosen, threshold=rng.randint(1, len(chosen))))
        else:
            faults.append(Fault(at, FaultKind.ROTATE))
        if rng.random() < 0.25:
            faults.append(Fault(at + rng.uniform(0.2, 3.0) * interval, FaultKind.ABORT))
    if rng.random() < 0.3:
        faults.append(Fault(rng.uniform(0.0, duration), FaultKind.SCHEDULE, duration=rng.uniform(0.0, 3.0) * interval))
    return faults


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
    threshold: int = 0  # of the key rebuilt


@dataclass(frozen=True, slots=True)
class Held(Fact):
    """What the store and the keepers hold together, after a change of either.

    `holders` are the keepers holding their genuine shard of the stored
    record's epoch (either slot), `pending_holders` of the stored pending
    rotation's; `intact` the members of the stored record's set that hold a
    genuine shard of an epoch in play; `single` how many keepers of both sets
    keep one shard only.
    """

    epoch: int
    threshold: int
    keepers: frozenset[int]
    holders: frozenset[int]
    pending_epoch: int | None
    pending_threshold: int
    pending_holders: frozenset[int]
    intact: frozenset[int]
    single: int


@dataclass(frozen=True, slots=True)
class Stored(Fact):
    """A store write landed: a pending rotation stored (`what` "persist"), committed, or abandoned."""

    what: str
    from_epoch: int
    to_epoch: int
    counted: tuple[int, ...]  # the keepers Nexus counted as dealt when it asked to commit
    holders: frozenset[int]  # keepers holding their genuine new shard when the commit landed
    wiped: frozenset[int]  # keepers restarted or planted since Nexus asked


@dataclass(frozen=True, slots=True)
class Contributed(Fact):
    """Nexus gave a keeper a shard (push or deal), labelled `epoch`; `stored`: no newer than the store then held."""

    keeper_id: int
    epoch: int | None
    kind: RequestKind
    stored: bool


@dataclass(frozen=True, slots=True)
class RotationAsked(Fact):
    """A rotation was asked for (`start_rotation`, a rekey, a due schedule); `refused` why not."""

    refused: str
    highest_before: int  # the highest epoch the run had seen anywhere before


@dataclass(frozen=True, slots=True)
class Persisting(Fact):
    """A pending rotation to `epoch` landed in the store; `highest` is the highest epoch the store held before."""

    epoch: int
    highest: int


@dataclass(frozen=True, slots=True)
class Wiped(Fact):
    """A keeper lost what it held (restart) or had it replaced by garbage (a planted shard)."""

    keeper_id: int


@dataclass(frozen=True, slots=True)
class KeeperGone(Fact):
    """Nexus took a keeper off its poll list (`KeeperLeft`)."""

    keeper_id: int


@dataclass(frozen=True, slots=True)
class Members(Fact):
    """The keepers Nexus polls, whenever that set changes (a rekey adds and removes some)."""

    keeper_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class RotationStep(Fact):
    """Nexus reported a rotation's step (`RotationProgress`)."""

    stage: RotationStage
    to_epoch: int


@dataclass(frozen=True, slots=True)
class RunEnded(Fact):
    phase: Phase
    key_matches: bool | None  # None when the Nexus holds no key
    epochs: tuple[tuple[int, tuple[int | None, ...]], ...] = ()  # what each keeper holds at the end, by label


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
    @property
    def rotation(self) -> RotationView | None: ...
    @property
    def keeper_ids(self) -> tuple[int, ...]: ...
    def start_rotation(
        self, now: float, *, key: RootKey | None = None, keeper_ids: Any = None, threshold: int | None = None
    ) -> PendingRotation: ...
    def rotation_persisted(self, now: float, pending: PendingRotation | None = None) -> None: ...
    def rotation_not_persisted(self, now: float, reason: str, pending: PendingRotation | None = None) -> None: ...
    def rotation_committed(self, now: float, pending: PendingRotation | None = None) -> None: ...
    def abort_rotation(self, now: float) -> None: ...
    def rotation_abandoned(self, now: float, pending: PendingRotation | None = None) -> None: ...
    def rotate_at(self, when: float | None) -> None: ...


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


StoreEffect = PersistRotation | CommitRotation | AbandonRotation
READS = (RequestKind.POLL, RequestKind.CHECK, RequestKind.CONFIRM)


@dataclass(slots=True)
class _KeeperSlot:
    keeper: Keeper
    mode: Mode = Mode.UP
    mode_token: int = 0
    holds_own: bool = False


@dataclass(slots=True)
class _Write:
    """A store write asked for by the Nexus of `generation`, not landed yet."""

    effect: StoreEffect
    generation: int
    landed: bool = False
    ok: bool = False


class World:
    """One run: a Nexus, its keepers, the network between them, the store and a fault schedule."""

    def __init__(
        self, scenario: Scenario, config: SimConfig | None = None, custody: CustodyFactory = NexusCustody
    ) -> None:
        self.scenario = s = scenario
        self.config = config or SimConfig()
        self._custody_factory = custody
        self._rng = random.Random(f"world-{s.seed}")
        key = RootKey.generate(self._rng.randbytes)
        derivation = self.config.derivation
        record, _ = seal_key(key, epoch=s.epoch, threshold=s.threshold, keeper_ids=s.keeper_ids, derivation=derivation)
        # The deployment had the epoch before this one and none earlier (so NEVER_HAD_OLDER exists when epoch >= 2).
        record = msgspec.structs.replace(record, history=((s.epoch - 1, s.epoch - 1),)).validate()
        self._initial = record
        self._other_key = RootKey.generate(self._rng.randbytes)
        self._keys_rng = random.Random(f"keys-{s.seed}")  # where each Nexus draws its new keys from
        self.keys: dict[int, RootKey] = {s.epoch: key}
        self.records: dict[int, KeyRecord] = {s.epoch: record}
        # The store: the record in force, a pending rotation, the high-water mark of epochs.
        self.stored: KeyRecord | None = record if s.bootstrap_at is None else None
        self.pending: PendingRotation | None = None
        self.highest = s.epoch
        self._seen_highest = s.epoch
        self._writes: list[_Write] = []
        self._config: tuple[tuple[int, ...], int] = (s.keeper_ids, s.threshold)
        self._rekey = False
        self._share_cache: dict[tuple[int, str], dict[int, Share]] = {}
        self._schedule = PollSchedule(self.config.interval, s.jitter, self.config.request_timeout)
        self.now = 0.0
        self.facts: list[Fact] = []
        self._events: list[tuple[float, int, Callable[[], None]]] = []  # (when, order, what)
        self._seq = 0
        self._trace: list[tuple[float, int, Effect]] = []
        self._requests = 0
        self._handled = 0
        self._slots = {k: _KeeperSlot(Keeper(TRUST)) for k in (*s.keeper_ids, *s.pool)}
        self._generation = 0
        self._cannot_happen = 0
        self._bootstrapped = s.bootstrap_at is None
        self._live: dict[int, SendRequest] = {}
        self._verified: set[int] = set()
        self._from_operator: set[int] = set()
        self._counted: tuple[int, ...] = ()  # the dealt keepers when Nexus last asked to commit
        self._commit_asked = False
        self._commit_asked_at = 0.0
        self._wiped_at: dict[int, float] = {}
        self._members: tuple[int, ...] = ()
        self._held: Held | None = None
        for keeper_id, wrong, holds in s.initially:
            if holds:
                self._contribute(keeper_id, self._own_body(keeper_id, s.epoch))
            elif wrong is not None:
                self._contribute(keeper_id, self._wrong_body(keeper_id, wrong))
            self.facts.append(KeeperHolds(0.0, keeper_id, self._slots[keeper_id].holds_own))
            self.facts.append(KeeperMode(0.0, keeper_id, Mode.UP))
        for keeper_id in s.pool:
            self.facts.append(KeeperHolds(0.0, keeper_id, False))
            self.facts.append(KeeperMode(0.0, keeper_id, Mode.UP))
        for fault in s.faults:
            self._at(fault.at, functools.partial(self._fault, fault))
        self.nexus = self._new_nexus("start")
        self._note_members()
        self._note_held()

    # ------------------------------------------------------------ the deployment's key, as stored

    @property
    def record(self) -> KeyRecord:
        """The key record in force in the store (before bootstrap: the one bootstrap will install)."""
        return self.stored if self.stored is not None else self._initial

    @property
    def key(self) -> RootKey:
        return self.keys[self.record.epoch]

    @property
    def shares(self) -> dict[int, Share]:
        return self._shares(self.record.epoch)

    def _shares(self, epoch: int, kind: str = "own") -> dict[int, Share]:
        """Every keeper's shard of `epoch` (kind "own"), or the stale or foreign look-alikes planted as garbage."""
        cached = self._share_cache.get((epoch, kind))
        if cached is None:
            record = self.records.get(epoch, self.record)
            key = {"own": self.keys.get(epoch), "stale": self.keys.get(epoch + 1), "foreign": self._other_key}[kind]
            assert key is not None
            cached = deal(
                key, epoch=epoch, threshold=record.threshold, ids=record.keeper_ids, derivation=record.derivation
            )
            self._share_cache[(epoch, kind)] = cached
        return cached

    def _stale_key(self, epoch: int) -> RootKey:
        """The key whose shard, labelled epoch - 1, is a stale one: with spike's derivation the key of `epoch` itself
        (the epoch changes the polynomial); with SPIKE's, whose shards depend on the key alone, the previous epoch's
        key (drawn apart, so that the runs of spike's derivation keep their random streams)."""
        if self.config.derivation is ShardDerivation.HMAC:
            return self.keys[epoch]
        drawn = random.Random(f"stale-{self.scenario.seed}-{epoch}")
        return self.keys.get(epoch - 1) or RootKey.generate(drawn.randbytes)

    def _share_of(self, keeper_id: int) -> Share:
        """Keeper `keeper_id`'s shard in force, or its first one if it is no longer in the set."""
        return self.shares.get(keeper_id) or self._shares(self._initial.epoch)[keeper_id]

    def _own_body(self, keeper_id: int, epoch: int) -> bytes:
        return encode(ShardContribution.of(self._shares(epoch)[keeper_id]))

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
        nexus = self.nexus
        key_matches = None
        if nexus.phase is Phase.READY and nexus.record is not None:
            key_matches = nexus.root_key == self.keys[nexus.record.epoch]
        epochs = tuple((k, slot.keeper.epochs) for k, slot in sorted(self._slots.items()))
        self.facts.append(RunEnded(end, nexus.phase, key_matches, epochs))
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
                    record = self.nexus.record
                    assert record is not None
                    matches = self.nexus.root_key == self.keys[record.epoch]
                    eligible = frozenset(self._verified | self._from_operator)
                    threshold = self.records[effect.epoch].threshold
                    self.facts.append(
                        Recovered(self.now, effect.source, effect.keeper_ids, matches, eligible, threshold)
                    )
                elif isinstance(effect, NewerKeySeen):
                    # The world holds the one key record and nobody else writes it: the label is garbage.
                    self.facts.append(NewerEpochShown(self.now, effect.keeper_id, effect.epoch))
                    self.nexus.confirm_record(effect.at, self.now)
                elif isinstance(effect, PersistRotation | CommitRotation | AbandonRotation):
                    self._store_effect(effect)
                elif isinstance(effect, RotationProgress):
                    self.facts.append(RotationStep(self.now, effect.stage, effect.to_epoch))
                    if effect.stage is RotationStage.COMMITTING and self._commit_asked:
                        # Who Nexus counted when it asked to commit (later reports of the stage may differ).
                        self._counted, self._commit_asked_at, self._commit_asked = effect.dealt, self.now, False
                elif isinstance(effect, KeeperLeft):
                    self.facts.append(KeeperGone(self.now, effect.keeper_id))
        self._note_members()
        return drained

    def _note_members(self) -> None:
        members = tuple(self.nexus.keeper_ids)
        if members != self._members:
            self._members = members
            self.facts.append(Members(self.now, members))

    # ------------------------------------------------------------ the store

    def _store_effect(self, effect: StoreEffect) -> None:
        """Write it a little later, acknowledge it later still; now and then Nexus dies in between."""
        self._commit_asked = isinstance(effect, CommitRotation)
        rng = self._rng
        write = _Write(effect, self._generation)
        self._writes.append(write)
        write_at = self.now + rng.uniform(0.001, 0.3)
        ack_at = write_at + (0.0 if rng.random() < 0.5 else rng.uniform(0.001, 0.5))
        self._at(write_at, functools.partial(self._land, write))
        self._at(ack_at, functools.partial(self._acknowledge, write))
        roll = rng.random()
        if roll < self.config.kill_around_writes / 2:  # killed between the write and its acknowledgement
            self._at((write_at + ack_at) / 2 if ack_at > write_at else write_at, self._kill_nexus)
        elif roll < self.config.kill_around_writes:  # killed before the write: it may land, or not
            self._at(self.now + rng.uniform(0.0, write_at - self.now), self._kill_nexus)

    def _kill_nexus(self) -> None:
        self._fault(Fault(self.now, FaultKind.NEXUS_RESTART))

    def _land(self, write: _Write) -> None:
        if write.landed or write not in self._writes:
            return
        write.landed = True
        self._writes.remove(write)
        effect = write.effect
        pending = effect.pending
        if isinstance(effect, PersistRotation):
            write.ok = self.stored is not None and self.pending is None and self.stored.epoch == pending.from_epoch
            if write.ok:
                self.facts.append(Persisting(self.now, pending.record.epoch, self._seen_highest))
                self._seen_highest = max(self._seen_highest, pending.record.epoch)
                self.pending = pending
                self.keys[pending.record.epoch] = pending.open_new(self.keys[pending.from_epoch])
                self.records[pending.record.epoch] = pending.record
                self.highest = max(self.highest, pending.record.epoch)
                self.facts.append(
                    Stored(self.now, "persist", pending.from_epoch, pending.record.epoch, (), frozenset(), frozenset())
                )
        elif isinstance(effect, CommitRotation):
            write.ok = self.pending == pending and self.stored is not None and self.stored.epoch == pending.from_epoch
            if write.ok:
                holders = frozenset(k for k in pending.record.keeper_ids if self._holds(k, pending.record.epoch))
                wiped = frozenset(k for k, at in self._wiped_at.items() if at >= self._commit_asked_at)
                self.stored, self.pending = pending.record, None
                self.facts.append(
                    Stored(self.now, "commit", pending.from_epoch, pending.record.epoch, self._counted, holders, wiped)
                )
                for keeper_id in self._slots:
                    self._refresh_truth(keeper_id)
        else:
            write.ok = self.pending == pending
            if write.ok:
                self.pending = None
                self.highest = max(self.highest, pending.record.epoch)
                self.facts.append(
                    Stored(self.now, "abandon", pending.from_epoch, pending.record.epoch, (), frozenset(), frozenset())
                )
        self._note_held()

    def _acknowledge(self, write: _Write) -> None:
        if write.generation != self._generation:
            return  # the Nexus that asked is gone: a restarted one reads the store
        self._land(write)
        effect, nexus, now = write.effect, self.nexus, self.now
        if isinstance(effect, PersistRotation):
            if write.ok:
                nexus.rotation_persisted(now, effect.pending)
            else:
                nexus.rotation_not_persisted(now, "the store refused it", effect.pending)
        elif not write.ok:  # the only Nexus's commit or abandonment cannot be refused: a check reports it
            self.facts.append(
                Stored(
                    now,
                    f"refused-{type(effect).__name__}",
                    effect.pending.from_epoch,
                    effect.pending.record.epoch,
                    (),
                    frozenset(),
                    frozenset(),
                )
            )
        elif isinstance(effect, CommitRotation):
            nexus.rotation_committed(now, effect.pending)
        else:
            nexus.rotation_abandoned(now, effect.pending)
        self._prune_live()
        self._drain()

    def _prune_live(self) -> None:
        """Requests the machine dropped (a commit drops every request in flight) will be answered late."""
        inflight = getattr(self.nexus, "_inflight", None)
        if inflight is None:
            inflight = getattr(getattr(self.nexus, "real", None), "_inflight", {})
        for request_id in [r for r in self._live if r not in inflight]:
            del self._live[request_id]

    # ------------------------------------------------------------ the Nexus's requests

    def _perform(self, request: SendRequest) -> None:
        self._requests += 1
        keeper_id = request.keeper_id
        self._live[request.request_id] = request
        if request.kind is RequestKind.POLL:
            self.facts.append(Polled(self.now, keeper_id))
        elif request.kind in (RequestKind.PUSH, RequestKind.DEAL):
            self._note_contribution(request)
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

    def _note_contribution(self, request: SendRequest) -> None:
        keeper_id = request.keeper_id
        given = decode(request.body, ShardContribution)
        epoch = given.epoch
        stored = self.record.epoch if self.stored is not None else None
        # Nothing of an epoch the store does not hold yet: at most the record's, or the stored rotation's.
        in_store = epoch is not None and (
            (stored is not None and epoch <= stored)
            or (self.pending is not None and epoch == self.pending.record.epoch)
        )
        self.facts.append(Contributed(self.now, keeper_id, epoch, request.kind, in_store))
        if request.kind is RequestKind.PUSH:
            own = epoch in self._nexus_epochs() and self._genuine(keeper_id, request.body, epoch)
            self.facts.append(Pushed(self.now, keeper_id, own))

    def _nexus_epochs(self) -> set[int | None]:
        """The epochs the Nexus has in play: its record's, and a stored rotation's."""
        record, rotation = self.nexus.record, self.nexus.rotation
        epochs: set[int | None] = set() if record is None else {record.epoch}
        if rotation is not None and rotation.stage is not RotationStage.PERSISTING:
            epochs.add(rotation.to_epoch)
        return epochs

    def _nexus_member(self, keeper_id: int) -> bool:
        record, rotation = self.nexus.record, self.nexus.rotation
        if record is None or keeper_id in record.keeper_ids:
            return True
        return (
            rotation is not None and rotation.stage is not RotationStage.PERSISTING and keeper_id in rotation.keeper_ids
        )

    def _keeper_handles(self, keeper_id: int, request: SendRequest) -> tuple[int, bytes]:
        return self._keeper_request(keeper_id, request.path, NEXUS_PEER, request.body)

    def _keeper_request(self, keeper_id: int, path: str, peer: SpiffeId, body: bytes) -> tuple[int, bytes]:
        """One request to a keeper; a Go-style keeper keeps one unlabelled shard, says 400 when empty, cannot forget."""
        go_style = keeper_id in self.scenario.go_keepers
        if go_style and path == KEEPER_FORGET_PATH:
            return 400, GO_EMPTY
        if go_style and path == KEEPER_CONTRIBUTE_PATH:
            with contextlib.suppress(RemoteProtocolError):
                body = encode(ShardContribution(decode(body, ShardContribution).shard))
        if go_style and path == KEEPER_SHARD_PATH:
            body = b"{}"
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
            self.nexus.receive(answer, self.now)  # made obsolete by initialise or a commit: must be ignored
            self.facts.append(LateAnswer(self.now, keeper_id, bool(self._drain())))
            return
        if self.now > request.deadline:
            self.nexus.receive(answer, self.now)
            self.facts.append(LateAnswer(self.now, keeper_id, bool(self._drain())))
            return
        body = answer.body if isinstance(answer, ResponseReceived) and answer.status == 200 else None
        shard_read = body is not None and request.kind in READS and self._nexus_member(keeper_id)
        own = False
        if body is not None and shard_read:
            if request.kind is RequestKind.CONFIRM:  # a read-back: the shard just given, nothing else
                asked = decode(request.body, dict).get("epoch") if request.body != b"{}" else self.record.epoch
                own = self._genuine(keeper_id, body, asked)
            else:
                own = any(self._genuine(keeper_id, body, e) for e in self._nexus_epochs())
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
            self._wiped(fault.keeper_id)
            self._refresh_truth(fault.keeper_id)
            self._set_mode(fault.keeper_id, Mode.REFUSING, fault.duration)  # down while it restarts
        elif kind is FaultKind.KEEPER_MODE:
            self._set_mode(fault.keeper_id, fault.mode, fault.duration)
        elif kind is FaultKind.KEEPER_CORRUPT:
            self._wiped(fault.keeper_id)
            self._contribute(fault.keeper_id, self._wrong_body(fault.keeper_id, fault.wrong))
        elif kind in (FaultKind.NEXUS_RESTART, FaultKind.REKEY_RESTART):
            if kind is FaultKind.REKEY_RESTART:
                self._config, self._rekey = (fault.keeper_ids, fault.threshold), True
            # A dying Nexus's store writes in flight either landed before it died, or never will.
            for write in [w for w in self._writes if w.generation == self._generation]:
                if self._rng.random() < 0.5:
                    self._land(write)
                elif write in self._writes:
                    self._writes.remove(write)
            self._generation += 1
            self._cannot_happen += getattr(self.nexus, "_cannot_happen", 0)
            self.nexus = self._new_nexus("restart")
            self._drain()
        elif kind is FaultKind.BOOTSTRAP:
            self._bootstrap()
        elif kind is FaultKind.OPERATOR_RESTORE:
            self._operator_restore()
        else:
            self._rotation_call(fault)

    def _rotation_call(self, fault: Fault) -> None:
        """An operator (or the schedule) asks for a rotation, a rekey, or to give one up."""
        before = self._seen_highest
        try:
            if fault.kind is FaultKind.ROTATE:
                if fault.keeper_ids:
                    # The configuration changed (a reload): a Nexus restarted later starts from it, rekeying.
                    self._config, self._rekey = (fault.keeper_ids, fault.threshold), True
                    self.nexus.start_rotation(self.now, keeper_ids=fault.keeper_ids, threshold=fault.threshold)
                else:
                    self.nexus.start_rotation(self.now)
            elif fault.kind is FaultKind.ABORT:
                self.nexus.abort_rotation(self.now)
            else:
                self.nexus.rotate_at(self.now + fault.duration)
        except LocalProtocolError as exc:
            if fault.kind is FaultKind.ROTATE:
                self.facts.append(RotationAsked(self.now, str(exc), before))
        else:
            if fault.kind is FaultKind.ROTATE:
                self.facts.append(RotationAsked(self.now, "", before))
        self._drain()

    def _wiped(self, keeper_id: int) -> None:
        self._wiped_at[keeper_id] = self.now
        self.facts.append(Wiped(self.now, keeper_id))

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
        record = self.stored if self._bootstrapped else None
        ids, threshold = (
            self._config
            if record is not None or not self._rekey
            else (self.scenario.keeper_ids, self.scenario.threshold)
        )
        nexus = self._custody_factory(
            ids,
            threshold=threshold,
            schedule=self._schedule,
            rng=random.Random(f"nexus-{self.scenario.seed}-{self._generation}"),
            now=self.now,
            record=record,
            pending=self.pending if record is not None else None,
            highest_epoch=self.highest,
            rekey=self._rekey,
            random_bytes=self._keys_rng.randbytes,
            derivation=self.config.derivation,
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
                self._contribute(keeper_id, self._own_body(keeper_id, self._initial.epoch))
        self._bootstrapped = True
        self.stored = self._initial
        self.nexus.initialise(self._initial, self.now)
        self._live.clear()  # answers to earlier requests no longer count
        self._verified.clear()
        self.facts.append(NexusStarted(self.now, self._generation, True, "initialise"))
        for keeper_id in self._slots:
            self._refresh_truth(keeper_id)
        self._note_held()
        self._drain()

    def _operator_restore(self) -> None:
        """`spike operator restore`: recovery shards handed in one at a time until Nexus is ready."""
        record = self.nexus.record
        if record is None or self.nexus.phase is not Phase.RECOVERING:
            return
        shares = self._shares(record.epoch)
        candidates = [k for k in record.keeper_ids if k not in self._from_operator]
        for keeper_id in self._rng.sample(candidates, min(len(candidates), record.threshold)):
            self._from_operator.add(keeper_id)
            self.facts.append(OperatorShard(self.now, keeper_id))
            progress = self.nexus.submit_shard(shares[keeper_id], self.now)
            self._drain()
            if progress.ready:
                break

    # ------------------------------------------------------------ keeper contents

    def _wrong_body(self, keeper_id: int, wrong: WrongShard) -> bytes:
        record = self.record
        epoch = record.epoch
        own = self._share_of(keeper_id)
        if wrong is WrongShard.NEVER_HAD_OLDER and epoch >= 2:
            return encode(ShardContribution(list(own.secret_bytes()), keeper_id, epoch - 2))
        if wrong in (WrongShard.NEVER_HAD_NEWER, WrongShard.NEVER_HAD_OLDER):
            label = MAX_EPOCH if self._rng.random() < 0.5 else epoch + self._rng.randint(1, 1000)
            return encode(ShardContribution(list(own.secret_bytes()), keeper_id, label))
        ids = record.keeper_ids
        if wrong in (WrongShard.STALE, WrongShard.STALE_GO):
            share = share_for(
                self._stale_key(epoch), epoch=epoch - 1, threshold=record.threshold, id=keeper_id,
                derivation=record.derivation,
            )  # fmt: skip
        elif wrong in (WrongShard.FOREIGN, WrongShard.FOREIGN_GO):
            share = share_for(
                self._other_key, epoch=epoch, threshold=record.threshold, id=keeper_id, derivation=record.derivation
            )
        elif keeper_id in ids:
            other = ids[(ids.index(keeper_id) + 1) % len(ids)]
            share = self.shares[other] if other != keeper_id else Share(keeper_id, epoch, b"\x01" * 32)
        else:
            share = Share(keeper_id, epoch, b"\x01" * 32)
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
        record = self.record
        own = keeper_id in record.keeper_ids and self._holds(keeper_id, record.epoch)
        if own != slot.holds_own:
            slot.holds_own = own
            self.facts.append(KeeperHolds(self.now, keeper_id, own))
        self._note_held()

    def _holds(self, keeper_id: int, epoch: int) -> bool:
        """Whether the keeper holds its genuine shard of `epoch`, in either slot."""
        if epoch not in self.keys or keeper_id not in self.records.get(epoch, self.record).keeper_ids:
            return False
        request = ApiRequest("POST", KEEPER_SHARD_PATH, NEXUS_PEER, encode({"epoch": epoch}))
        response = self._slots[keeper_id].keeper.handle(request).response
        return response.status == 200 and self._genuine(keeper_id, response.body, epoch)

    def _genuine(self, keeper_id: int, body: bytes, epoch: int | None) -> bool:
        """Whether `body` carries keeper `keeper_id`'s shard of `epoch`, judged by value and labels."""
        if epoch is None or epoch not in self.keys:
            return False
        share = self._shares(epoch).get(keeper_id)
        if share is None:
            return False
        try:
            answer = decode(body, ShardAnswer)
        except RemoteProtocolError:
            return False
        return (
            answer.shard_bytes() == share.secret_bytes()
            and answer.id in (None, keeper_id)
            and answer.epoch in (None, epoch)
        )

    def _note_held(self) -> None:
        """Record what the store and the keepers hold together, when it changed."""
        record = self.stored
        if record is None:
            return
        pending = self.pending
        holders = frozenset(k for k in record.keeper_ids if self._holds(k, record.epoch))
        pending_holders: frozenset[int] = frozenset()
        single = 0
        if pending is not None:
            new = pending.record
            pending_holders = frozenset(k for k in new.keeper_ids if self._holds(k, new.epoch))
            single = sum(k in self.scenario.go_keepers for k in set(record.keeper_ids) & set(new.keeper_ids))
        intact = frozenset(k for k in record.keeper_ids if k in holders or k in pending_holders)
        held = Held(
            self.now,
            record.epoch,
            record.threshold,
            frozenset(record.keeper_ids),
            holders,
            None if pending is None else pending.record.epoch,
            0 if pending is None else pending.record.threshold,
            pending_holders,
            intact,
            single,
        )
        last = self._held
        if last is None or dataclasses.replace(last, at=self.now) != held:
            self._held = held
            self.facts.append(held)


def simulate(seed: int, config: SimConfig | None = None, custody: CustodyFactory = NexusCustody) -> Run:
    config = config or SimConfig()
    return World(Scenario.draw(seed, config), config, custody).run()
