"""The Nexus custody state machine: polls, 404s, re-seeding and key recovery.

Sans-IO in the manner of aioquic: every call takes ``now`` (seconds on any
monotonic clock the driver likes), randomness comes from an injected
`RandomSource`, and the machine answers with effects (`effects()`) and one
deadline (`next_deadline()`, a pure query).  A driver loop is::

    custody = NexusCustody(ids, threshold=2, schedule=PollSchedule(), rng=rng, now=clock())
    while True:
        for effect in custody.effects():
            perform(effect)                 # SendRequest -> later custody.receive(answer, clock())
        wait_until(custody.next_deadline())  # or until an answer arrives
        custody.handle_timer(clock())

What happens after an answer is not written here: each answer is classified
once (`spike.protocol.answers`) and the rules table
(`spike.protocol.custody_rules`, rendered in ``docs/custody-rules.md``) says
what follows.  This module keeps the schedule and carries the rules out.
The rules it keeps (docs/design.md sections 2 and 8):

* Every configured keeper is polled on a fixed grid (its own phase, one
  interval apart, a little jitter) that no answer ever moves, and no keeper
  is ever dropped.  The first round is immediate, so a restarted Nexus
  recovers as fast as its keepers answer.
* A request never outlives the keeper's next scheduled poll: its deadline is
  capped there, so at most one request per keeper is in flight.
* Each shard is checked against its commitment in the key record before it
  is used; a rebuilt key is used only if it matches the key check value.
* Holding the key, a keeper that shows it lacks its shard (404, or 400 from
  SPIKE's Go keeper; a wrong or stale shard, one of an epoch the deployment
  never had, garbage instead of a shard) gets its own shard pushed at once
  and read back.  A push follows only a scheduled poll (or, once the key is
  rebuilt, a fresh read of a keeper last seen without its shard), so a keeper
  that keeps failing costs at most three requests per interval.
* A shard labelled with a newer epoch than the record is not this machine's
  to overwrite (another Nexus instance may hold a newer key): the keeper is
  NEWER_EPOCH and left alone, with a `NewerKeySeen` report, until the driver
  loads that newer record or confirms its own (`confirm_record`), which
  makes the label garbage.
* Garbage from a keeper becomes a state and a report; it never raises.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from .answers import TIMED_OUT, Classified, classify, never_had
from .custody_rules import AFTER_REBUILD, TABLE, Do, Rule, Seen
from .effects import (
    Effect,
    KeeperMisbehaved,
    KeeperReseeded,
    KeeperState,
    KeeperStateChanged,
    KeyRecovered,
    KeyRejected,
    KeySource,
    NewerKeySeen,
    Phase,
    PhaseChanged,
    RequestKind,
    SendRequest,
)
from .errors import LocalProtocolError
from .events import Answer
from .material import RootKey, Share
from .record import KeyRecord
from .shamir import check_parameters, combine, deal, share_for
from .timers import TimerKind, Timers
from .wire import KEEPER_CONTRIBUTE_PATH, KEEPER_SHARD_PATH, ShardContribution, encode

_EMPTY_BODY = b"{}"


class RandomSource(Protocol):
    """Anything with ``random() -> float`` in [0, 1), e.g. `random.Random(seed)`."""

    def random(self) -> float:
        """A float in [0, 1)."""
        ...


class AlreadyInitialised(LocalProtocolError):
    """A different key record is in place and replacing it was not asked for."""


class ShareRejected(LocalProtocolError):
    """An operator-supplied share is foreign, stale or for an unknown keeper id."""


class DuplicateShare(ShareRejected):
    """An operator gave the same keeper's share twice."""


@dataclass(frozen=True, slots=True)
class PollSchedule:
    """How often each keeper is polled (seconds), and how long a request may take.

    Raises `LocalProtocolError` for a non-positive interval, jitter outside
    0..0.25, or a request timeout outside (0, interval].
    """

    interval: float = 5.0
    jitter: float = 0.1  # fraction of the interval, either way
    request_timeout: float = 2.0

    def __post_init__(self) -> None:
        if not (self.interval > 0 and math.isfinite(self.interval)):
            raise LocalProtocolError("poll interval must be a positive number of seconds")
        if not 0 <= self.jitter <= 0.25:
            raise LocalProtocolError("poll jitter must be between 0 and 0.25 of the interval")
        if not 0 < self.request_timeout <= self.interval:
            raise LocalProtocolError("request timeout must be positive and at most the poll interval")


@dataclass(frozen=True, slots=True)
class KeeperView:
    """A snapshot of Nexus's knowledge of one keeper, for status and metrics."""

    keeper_id: int
    state: KeeperState
    since: float
    detail: str
    polls: int
    empty_answers: int
    failures: int
    reseeds: int
    last_poll_at: float | None
    last_answer_at: float | None
    latency: float | None
    next_poll_at: float
    outcomes: Mapping[str, int] = field(default_factory=dict)  # answers by outcome (KeeperState value)


@dataclass(frozen=True, slots=True)
class RestoreProgress:
    """What `NexusCustody.submit_shard` achieved: shards in hand, still needed, key rebuilt."""

    accepted: int  # shards in hand
    needed: int  # still missing before the key can be rebuilt
    ready: bool


@dataclass(frozen=True, slots=True)
class _Request:
    request_id: int
    keeper_id: int
    kind: RequestKind
    issued_at: float
    deadline: float


@dataclass(frozen=True, slots=True)
class _Sighting:
    """A keeper's last answer showed a shard of a newer epoch than the record."""

    epoch: int
    at: float
    kind: RequestKind  # of the request it answered: the rule that refutes it is that kind's


class _Keeper:
    __slots__ = (
        "id", "slot", "state", "since", "detail", "polls", "empty_answers", "failures",
        "reseeds", "last_poll_at", "last_answer_at", "latency", "cycle", "next_poll_at",
        "request", "needs_seed", "reseed_from", "unconfirmed_push", "sighting", "outcomes",
    )  # fmt: skip

    def __init__(self, keeper_id: int, slot: float, now: float) -> None:
        self.id = keeper_id
        self.slot = slot  # this keeper's phase within an interval, in seconds
        self.state = KeeperState.UNKNOWN
        self.since = now
        self.detail = ""
        self.polls = 0
        self.empty_answers = 0
        self.failures = 0
        self.reseeds = 0
        self.last_poll_at: float | None = None
        self.last_answer_at: float | None = None
        self.latency: float | None = None
        self.cycle = 0
        self.next_poll_at = now
        self.request: _Request | None = None  # at most one in flight
        self.needs_seed = False  # its last regular answer that showed anything showed it lacks its shard
        self.reseed_from = KeeperState.UNKNOWN  # its state when the last push was sent
        # It accepted a push whose read-back has not shown the shard yet (the confirmation may
        # miss its deadline on a slow day): the next read that shows it reports the re-seed.
        self.unconfirmed_push = False
        self.sighting: _Sighting | None = None  # set only while its last answer showed a newer epoch
        self.outcomes: dict[str, int] = {}  # answers by the state they showed

    def seen(self) -> Seen:
        if self.state is KeeperState.HOLDING:
            return Seen.HOLDING
        if self.state is KeeperState.NEWER_EPOCH:
            return Seen.NEWER
        return Seen.NEEDS_SHARD if self.needs_seed else Seen.UNSURE


class NexusCustody:
    """Custody of the root key across a fixed set of keepers.

    `keeper_ids` are the keepers' stable ids (1-255, also their Shamir x);
    `now` is the caller's monotonic clock, in seconds, in this and every later
    call; `rng` only jitters the poll grid.  With `record` (a stored key
    record) the machine starts RECOVERING, without it UNINITIALISED.  Raises
    `ShamirError` for bad ids or threshold, `LocalProtocolError` for a record
    that does not fit them, `RemoteProtocolError` for a malformed record.

    Not thread-safe: one thread (or one event loop) makes every call.
    """

    def __init__(
        self,
        keeper_ids: Iterable[int],
        *,
        threshold: int,
        schedule: PollSchedule,
        rng: RandomSource,
        now: float,
        record: KeyRecord | None = None,
    ) -> None:
        ids = sorted(keeper_ids)
        check_parameters(threshold, ids)
        self._ids = tuple(ids)
        self._threshold = threshold
        self._schedule = schedule
        self._rng = rng
        self._effects: list[Effect] = []
        self._timers = Timers()
        self._next_request_id = 1
        self._inflight: dict[int, _Request] = {}
        self._anchor = now
        n = len(ids)
        self._keepers = {
            keeper_id: _Keeper(keeper_id, schedule.interval * index / n, now) for index, keeper_id in enumerate(ids)
        }
        self._record: KeyRecord | None = None
        self._key: RootKey | None = None
        self._collected: dict[int, Share] = {}
        self._from_operator: set[int] = set()
        self._recovery_started = now
        self._phase = Phase.UNINITIALISED
        self._last_rule: Rule | None = None  # the rule applied last (tests follow the table with it)
        self._cannot_happen = 0  # answers that hit a rule the table says is never reached
        if record is not None:
            # A stored record is checked like one from bootstrap (`initialise`): a
            # malformed one would otherwise raise later, inside `receive`.
            record.validate()
            self._check_record(record)
            self._record = record
            self._phase = Phase.RECOVERING
        for keeper in self._keepers.values():
            self._timers.set((TimerKind.POLL, keeper.id), keeper.next_poll_at)

    # ------------------------------------------------------------------ queries

    @property
    def phase(self) -> Phase:
        """UNINITIALISED, RECOVERING or READY."""
        return self._phase

    @property
    def record(self) -> KeyRecord | None:
        """The key record in force (persist it when `initialise` changes it)."""
        return self._record

    @property
    def threshold(self) -> int:
        """Shards needed to rebuild the key."""
        return self._threshold

    @property
    def keeper_ids(self) -> tuple[int, ...]:
        """The configured keeper ids, sorted."""
        return self._ids

    @property
    def schedule(self) -> PollSchedule:
        """The poll schedule given at construction."""
        return self._schedule

    @property
    def root_key(self) -> RootKey:
        """The verified root key; raises `LocalProtocolError` unless READY.  Secret: never log it."""
        if self._key is None:
            raise LocalProtocolError(f"no root key while {self._phase.value}")
        return self._key

    @property
    def shards_needed(self) -> int:
        """Verified shards still missing before the key can be rebuilt (0 when ready)."""
        if self._phase is Phase.READY:
            return 0
        return max(0, self._threshold - len(self._collected))

    @property
    def redundancy(self) -> int:
        """Keepers holding their verified current shard, minus the threshold."""
        holding = sum(k.state is KeeperState.HOLDING for k in self._keepers.values())
        return holding - self._threshold

    def keepers(self) -> tuple[KeeperView, ...]:
        """A snapshot of every keeper, for status pages and metrics."""
        return tuple(
            KeeperView(
                keeper_id=k.id,
                state=k.state,
                since=k.since,
                detail=k.detail,
                polls=k.polls,
                empty_answers=k.empty_answers,
                failures=k.failures,
                reseeds=k.reseeds,
                last_poll_at=k.last_poll_at,
                last_answer_at=k.last_answer_at,
                latency=k.latency,
                next_poll_at=k.next_poll_at,
                outcomes=dict(k.outcomes),
            )
            for k in self._keepers.values()
        )

    def export_shards(self) -> dict[int, Share]:
        """Every keeper's current shard, for the operator's recovery files."""
        record = self._require_record()
        return deal(self.root_key, epoch=record.epoch, threshold=self._threshold, ids=self._ids)

    # ------------------------------------------------------------------ outputs

    def effects(self) -> list[Effect]:
        """Take the pending effects, oldest first."""
        out, self._effects = self._effects, []
        return out

    def next_deadline(self) -> float:
        """When `handle_timer` must next be called (``inf`` if never).  Changes nothing."""
        return self._timers.next_time()

    # ------------------------------------------------------------------ inputs

    def handle_timer(self, now: float) -> None:
        """Time out overdue requests and issue the polls that are due."""
        while (due := self._timers.pop_due(now)) is not None:
            (kind, keeper_id), when = due
            keeper = self._keepers[keeper_id]
            if kind is TimerKind.POLL:
                self._poll(keeper, now, scheduled=when)
            elif (request := self._end_request(keeper)) is not None:
                self._decide(keeper, request.kind, TIMED_OUT, now)

    def receive(self, answer: Answer, now: float) -> None:
        """Feed the outcome of a `SendRequest`.  Late or unknown answers are ignored."""
        request = self._inflight.get(answer.request_id)
        if request is None:
            return
        keeper = self._keepers[request.keeper_id]
        self._end_request(keeper)
        keeper.last_answer_at = now
        keeper.latency = now - request.issued_at
        self._decide(keeper, request.kind, classify(request.kind, answer, self._record, keeper.id), now)

    def initialise(self, record: KeyRecord, now: float, *, replace: bool = False) -> bool:
        """Adopt a new key record (from bootstrap).  Returns False if it is already in place.

        Raises `RemoteProtocolError` for a malformed record, `LocalProtocolError`
        for one that does not fit this Nexus's keepers and threshold, and
        `AlreadyInitialised` when another record is in place and not `replace`.
        """
        if not self.check_initialise(record, replace=replace):
            return False
        self._forget_key()
        self._record = record
        self._from_operator.clear()
        self._recovery_started = now
        self._set_phase(Phase.RECOVERING, now)
        # Answers to requests made for the old record must not count for the new one, and what
        # keepers showed against the old record says nothing against the new one.
        self._anchor = now
        for keeper in self._keepers.values():
            self._end_request(keeper)
            keeper.sighting = None
            keeper.cycle = 0
            keeper.next_poll_at = now
            self._timers.set((TimerKind.POLL, keeper.id), now)
        return True

    def check_initialise(self, record: KeyRecord, *, replace: bool = False) -> bool:
        """Raise what `initialise` would raise; True if it would change anything.

        Lets a caller persist a record only once it is known to be acceptable.
        """
        record.validate()
        self._check_record(record)
        if self._record == record:
            return False
        if self._record is not None and not replace:
            raise AlreadyInitialised(f"already initialised with key epoch {self._record.epoch}")
        return True

    def submit_shard(self, share: Share, now: float) -> RestoreProgress:
        """An operator hands in a recovery shard (break-glass restore)."""
        record = self._require_record()
        if self._phase is Phase.READY:
            raise LocalProtocolError("Nexus already holds the verified root key")
        if share.id not in self._keepers:
            raise ShareRejected(f"shard id {share.id} is not one of this deployment's keeper ids")
        if share.id in self._from_operator:
            raise DuplicateShare(f"shard {share.id} was already given")
        if not record.matches_share(share):
            raise ShareRejected(f"shard {share.id} does not belong to key epoch {record.epoch}")
        self._from_operator.add(share.id)
        self._collected[share.id] = share
        accepted = len(self._collected)
        ready = self._try_recover(now, KeySource.OPERATOR)
        return RestoreProgress(accepted=accepted, needed=self.shards_needed, ready=ready)

    def confirm_record(self, checked_at: float, now: float) -> int:
        """The driver read the deployment's stored key record and found this machine's own in force.

        `checked_at` is when that read began, on the machine's clock.  Epochs
        only grow and a newer shard is dealt only after its record is stored,
        so no epoch above this record's existed then: every keeper whose last
        answer, given at or before `checked_at`, showed a newer epoch holds
        garbage.  Each is handled as a shard of an epoch the deployment never
        had (reported, and re-seeded when READY, as the rules table says).
        A keeper with a request in flight is skipped: its answer is news.
        Returns how many keepers that was.  Raises `LocalProtocolError`
        without a record.
        """
        record = self._require_record()
        refuted = 0
        for keeper in self._keepers.values():
            sighting = keeper.sighting
            if sighting is None or sighting.at > checked_at or keeper.request is not None:
                continue
            self._decide(keeper, sighting.kind, never_had(sighting.epoch, record), now, count=False)
            refuted += 1
        return refuted

    def forget(self, now: float) -> None:
        """Overwrite and drop the key and any collected shards (shutdown).

        The machine stays usable: without its key it is recovering again, so a
        late answer is handled as in any other recovery.
        """
        self._forget_key()
        if self._phase is Phase.READY:
            self._recovery_started = now
            self._set_phase(Phase.RECOVERING, now)

    # ------------------------------------------------------------------ the rules, carried out

    def _decide(self, keeper: _Keeper, kind: RequestKind, seen: Classified, now: float, *, count: bool = True) -> None:
        """Apply the rule for this answer: the only place an answer changes a keeper."""
        rule = TABLE[(self._phase, kind, seen.outcome)]
        self._last_rule = rule
        if not rule.possible:
            self._cannot_happen += 1
            return
        keeper.sighting = None  # a later answer replaces what the last one showed
        if rule.state is not None:
            detail = self._holding_detail(keeper, kind) if rule.state is KeeperState.HOLDING else seen.detail
            self._set_state(keeper, rule.state, now, detail, count=count)
        if rule.needs_seed is not None:
            keeper.needs_seed = rule.needs_seed
        for do in rule.then:
            self._do(do, keeper, kind, seen, now)

    def _do(self, do: Do, keeper: _Keeper, kind: RequestKind, seen: Classified, now: float) -> None:
        if do is Do.COUNT_EMPTY:
            keeper.empty_answers += 1
        elif do is Do.COUNT_FAILURE:
            keeper.failures += 1
        elif do is Do.REPORT:
            self._effects.append(KeeperMisbehaved(keeper.id, now, seen.problem))
        elif do is Do.REPORT_NEWER:
            assert seen.epoch is not None
            keeper.sighting = _Sighting(seen.epoch, now, kind)
            self._effects.append(NewerKeySeen(keeper.id, seen.epoch, now))
        elif do is Do.RESEEDED:
            if keeper.unconfirmed_push:
                keeper.unconfirmed_push = False
                keeper.reseeds += 1
                self._effects.append(KeeperReseeded(keeper.id, now, keeper.reseed_from))
        elif do is Do.COLLECT:
            assert seen.share is not None
            self._collected[keeper.id] = seen.share
            self._try_recover(now, KeySource.KEEPERS)
        elif do is Do.PUSH:
            self._push(keeper, now)
        elif do is Do.CONFIRM:
            keeper.unconfirmed_push = True
            self._send(keeper, RequestKind.CONFIRM, KEEPER_SHARD_PATH, _EMPTY_BODY, now)
        else:
            self._send(keeper, RequestKind.CHECK, KEEPER_SHARD_PATH, _EMPTY_BODY, now)

    @staticmethod
    def _holding_detail(keeper: _Keeper, kind: RequestKind) -> str:
        if not keeper.unconfirmed_push:
            return ""
        return "re-seeded and confirmed" if kind is RequestKind.CONFIRM else "re-seeded, confirmed by a later read"

    def _try_recover(self, now: float, source: KeySource) -> bool:
        """Rebuild the key if enough verified shards are in; True once it is in use."""
        record = self._record
        if record is None or self._phase is not Phase.RECOVERING:
            return False
        if len(self._collected) < self._threshold:
            return False
        used = tuple(sorted(self._collected)[: self._threshold])
        key = combine((self._collected[i] for i in used), self._threshold)
        if not record.matches_key(key):
            # Every shard passed its commitment, so the record itself is inconsistent.
            key.wipe()
            self._collected.clear()
            self._effects.append(KeyRejected(record.epoch, now, used))
            return False
        self._key = key
        self._collected.clear()
        self._from_operator.clear()
        self._set_phase(Phase.READY, now)
        self._effects.append(KeyRecovered(record.epoch, now, used, source, self._recovery_started))
        for keeper in self._keepers.values():
            if keeper.request is not None:
                continue  # its answer is on the way and is handled when it comes
            do, _ = AFTER_REBUILD[(source, keeper.seen())]
            if do is Do.PUSH:
                self._push(keeper, now)
            elif do is Do.CHECK:
                self._send(keeper, RequestKind.CHECK, KEEPER_SHARD_PATH, _EMPTY_BODY, now)
        return True

    # ------------------------------------------------------------------ requests and the schedule

    def _grid_time(self, keeper: _Keeper, cycle: int) -> float:
        interval = self._schedule.interval
        offset = (2.0 * self._rng.random() - 1.0) * self._schedule.jitter * interval
        return self._anchor + keeper.slot + cycle * interval + offset

    def _poll(self, keeper: _Keeper, now: float, *, scheduled: float) -> None:
        self._end_request(keeper)  # none can be in flight while deadlines are capped; kept as a guard
        keeper.cycle += 1
        due = self._grid_time(keeper, keeper.cycle)
        if due <= now:
            # The driver fell behind by more than a cycle: skip missed slots
            # rather than firing a burst, and stay on the same grid.
            elapsed = now - self._anchor - keeper.slot
            keeper.cycle = max(keeper.cycle, int(elapsed // self._schedule.interval) + 1)
            due = max(self._grid_time(keeper, keeper.cycle), now + 1e-3)
        keeper.next_poll_at = due
        self._timers.set((TimerKind.POLL, keeper.id), due)
        keeper.polls += 1
        keeper.last_poll_at = now
        self._send(keeper, RequestKind.POLL, KEEPER_SHARD_PATH, _EMPTY_BODY, now, scheduled)

    def _send(
        self,
        keeper: _Keeper,
        kind: RequestKind,
        path: str,
        body: bytes,
        now: float,
        scheduled: float | None = None,
    ) -> None:
        request_id = self._next_request_id
        self._next_request_id += 1
        deadline = min(now + self._schedule.request_timeout, keeper.next_poll_at)
        request = _Request(request_id, keeper.id, kind, now, deadline)
        keeper.request = request
        self._inflight[request_id] = request
        self._timers.set((TimerKind.DEADLINE, keeper.id), deadline)
        self._effects.append(
            SendRequest(keeper.id, request_id, kind, path, deadline, body, now if scheduled is None else scheduled)
        )

    def _end_request(self, keeper: _Keeper) -> _Request | None:
        """Take the keeper's request out of flight (answered, timed out or dropped)."""
        request, keeper.request = keeper.request, None
        if request is not None:
            del self._inflight[request.request_id]
            self._timers.cancel((TimerKind.DEADLINE, keeper.id))
        return request

    def _push(self, keeper: _Keeper, now: float) -> None:
        if keeper.request is not None:
            return  # its answer is on the way; the rules decide again then
        record = self._require_record()
        share = share_for(self.root_key, epoch=record.epoch, threshold=self._threshold, id=keeper.id)
        keeper.reseed_from = keeper.state
        body = encode(ShardContribution.of(share))
        self._send(keeper, RequestKind.PUSH, KEEPER_CONTRIBUTE_PATH, body, now)

    # ------------------------------------------------------------------ bookkeeping

    def _check_record(self, record: KeyRecord) -> None:
        if tuple(sorted(record.keeper_ids)) != self._ids:
            raise LocalProtocolError(
                f"key record is for keepers {list(record.keeper_ids)}, configured are {list(self._ids)}"
            )
        if record.threshold != self._threshold:
            raise LocalProtocolError(f"key record has threshold {record.threshold}, configured is {self._threshold}")

    def _require_record(self) -> KeyRecord:
        if self._record is None:
            raise LocalProtocolError("Nexus has no key record yet: run bootstrap first")
        return self._record

    def _set_state(self, keeper: _Keeper, state: KeeperState, now: float, detail: str, *, count: bool) -> None:
        # Called once per answer (or failure), so it also counts answers by outcome.
        if count:
            keeper.outcomes[state.value] = keeper.outcomes.get(state.value, 0) + 1
        keeper.detail = detail
        if state is keeper.state:
            return
        previous = keeper.state
        keeper.state = state
        keeper.since = now
        self._effects.append(KeeperStateChanged(keeper.id, previous, state, now, detail))

    def _set_phase(self, phase: Phase, now: float) -> None:
        if phase is not self._phase:
            previous, self._phase = self._phase, phase
            self._effects.append(PhaseChanged(previous, phase, now))

    def _forget_key(self) -> None:
        if self._key is not None:
            self._key.wipe()
            self._key = None
        self._collected.clear()
