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
* The root key can be rotated, and custody moved to another keeper set or
  threshold, without downtime (docs/key-lifecycle.md): the new key is dealt
  at the keepers' regular polls once the driver has stored the pending
  rotation, committed once t' keepers showed their new shard, and the old
  epoch retired after the commit is durable.  How a rotation moves from
  step to step is the table `spike.protocol.rotation_steps.STEPS`; the
  rotation calls and steps live in `spike.protocol.nexus_rotation`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .answers import TIMED_OUT, Classified, classify, never_had
from .custody_rules import AFTER_REBUILD, TABLE, Do, Rule
from .custody_state import KeeperRecord, Request, Rotation, Sighting
from .custody_view import (
    AlreadyInitialised,
    DuplicateShare,
    KeeperView,
    PollSchedule,
    RandomSource,
    RestoreProgress,
    RotationRefused,
    RotationView,
    ShareRejected,
    UnrecordedKeyRefused,
)
from .effects import (
    Effect,
    KeeperLeft,
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
    RotationStage,
    SendRequest,
    ShardRetired,
)
from .errors import LocalProtocolError, RemoteProtocolError, ShamirError
from .events import Answer
from .material import RootKey, Share
from .nexus_rotation import DEAL_ROUNDS, RotatingCustody
from .pending import PendingRotation
from .record import KeyRecord
from .rotation_steps import Event
from .shamir import ShardDerivation, check_parameters, combine, deal, on_one_polynomial, share_for
from .timers import TimerKind, Timers
from .wire import (
    KEEPER_CONTRIBUTE_PATH,
    KEEPER_FORGET_PATH,
    KEEPER_SHARD_PATH,
    ForgetRequest,
    ShardContribution,
    ShardRequest,
    encode,
)

_EMPTY_BODY = b"{}"
_GOLDEN = 0.6180339887498949  # spreads the grid phases of keepers added after construction

__all__ = [  # what this module offers (spike.protocol re-exports the public ones)
    "DEAL_ROUNDS",
    "AlreadyInitialised",
    "DuplicateShare",
    "KeeperView",
    "NexusCustody",
    "PollSchedule",
    "RandomSource",
    "RestoreProgress",
    "RotationRefused",
    "RotationView",
    "ShareRejected",
    "UnrecordedKeyRefused",
]


class NexusCustody(RotatingCustody):
    """Custody of the root key across a set of keepers.

    `keeper_ids` are the configured keepers' stable ids (1-255, also their
    Shamir x) and `threshold` the configured threshold; `now` is the caller's
    monotonic clock, in seconds, in this and every later call; `rng` only
    jitters the poll grid.  With `record` (a stored key record) the machine
    starts RECOVERING, without it UNINITIALISED.  Raises `ShamirError` for bad
    ids or threshold, `LocalProtocolError` for a record that does not fit
    them, `RemoteProtocolError` for a malformed record or pending rotation.

    Key rotation (docs/key-lifecycle.md): `pending` is a stored
    `PendingRotation` (the machine resumes it), `highest_epoch` the stored
    high-water mark of epochs ever used, `random_bytes` (e.g. `os.urandom`)
    lets the machine draw new keys itself (`rotate_at`, `start_rotation`
    without a key).  With `rekey`, the record may be for other keepers or
    another threshold than the configured ones: the machine recovers with
    the record's, then rotates to the configured ones.

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
        pending: PendingRotation | None = None,
        highest_epoch: int = 0,
        rekey: bool = False,
        random_bytes: Callable[[int], bytes] | None = None,
        derivation: ShardDerivation = ShardDerivation.HMAC,
    ) -> None:
        ids = sorted(keeper_ids)
        check_parameters(threshold, ids)
        self._target: tuple[tuple[int, ...], int] = (tuple(ids), threshold)
        # How new keys are dealt (bootstrap's record, rotations); a record in force keeps its own.
        self._derivation = derivation
        self._schedule = schedule
        self._rng = rng
        self._random_bytes = random_bytes
        self._rekey = rekey
        self._effects: list[Effect] = []
        self._timers = Timers()
        self._next_request_id = 1
        self._inflight: dict[int, Request] = {}
        self._record: KeyRecord | None = None
        self._key: RootKey | None = None
        self._rotation: Rotation | None = None
        self._highest = highest_epoch
        self._rotate_due = False
        self._collected: dict[int, dict[int, Share]] = {}  # epoch -> keeper id -> verified shard
        self._from_operator: set[int] = set()
        # Without a key record: the unlabelled shard each keeper showed (SPIKE's Go bootstrap deals them).
        self._unrecorded: dict[int, Share] = {}
        self._recovery_started = now
        self._phase = Phase.UNINITIALISED
        self._last_rule: Rule | None = None  # the rule applied last (tests follow the table with it)
        self._cannot_happen = 0  # answers that hit a rule the table says is never reached
        polled: list[int] = ids
        if record is not None:
            # A stored record is checked like one from bootstrap (`initialise`): a
            # malformed one would otherwise raise later, inside `receive`.
            record.validate()
            if not rekey:
                self._check_record(record)
            if pending is not None:
                pending.validate()
                if not pending.starts_from(record):
                    raise RemoteProtocolError("the stored pending rotation does not start from the stored key record")
            self._record = record
            self._phase = Phase.RECOVERING
            self._highest = max(self._highest, record.epoch)
            polled = sorted({*record.keeper_ids, *(() if pending is None else pending.record.keeper_ids)})
        elif pending is not None:
            raise LocalProtocolError("a pending rotation needs the key record it starts from")
        known = sorted({*ids, *polled})
        self._slots = {k: schedule.interval * index / len(known) for index, k in enumerate(known)}
        self._keepers: dict[int, KeeperRecord] = {}
        for keeper_id in polled:
            self._add_keeper(keeper_id, now)
        if pending is not None:
            self._step(Event.RESUMED, now, Rotation(pending, None, now))
        elif record is not None and rekey and not self._is_target(record):
            self._rotate_due = True

    # ------------------------------------------------------------------ queries

    @property
    def derivation(self) -> ShardDerivation:
        """How this machine splits a new root key (a record in force keeps the derivation it was made with)."""
        return self._derivation

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
        """Shards needed to rebuild the key in force (the configured threshold before there is a record)."""
        return self._target[1] if self._record is None else self._record.threshold

    @property
    def keeper_ids(self) -> tuple[int, ...]:
        """Every keeper polled now, sorted.

        The configured keepers, or the record's (and a rotation's new set);
        a keeper a rekey removed stays until it holds nothing.
        """
        return tuple(sorted(self._keepers))

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
        """Verified shards still missing before a key can be rebuilt (0 when ready)."""
        if self._phase is Phase.READY:
            return 0
        if self._record is None:
            return self._target[1]
        return min(max(0, r.threshold - len(self._collected.get(r.epoch, ()))) for r in self._in_play_records())

    @property
    def redundancy(self) -> int:
        """Keepers holding their verified current shard, minus the threshold."""
        holding = sum(k.state is KeeperState.HOLDING for k in self._keepers.values())
        return holding - self.threshold

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
                slots=k.slots,
            )
            for k in sorted(self._keepers.values(), key=lambda k: k.id)
        )

    def export_shards(self) -> dict[int, Share]:
        """Every keeper's current shard, for the operator's recovery files."""
        record = self._require_record()
        return deal(
            self.root_key,
            epoch=record.epoch,
            threshold=record.threshold,
            ids=record.keeper_ids,
            derivation=record.derivation,
        )

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
        """Time out overdue requests, issue the polls that are due, start a scheduled rotation."""
        while (due := self._timers.pop_due(now)) is not None:
            (kind, keeper_id), when = due
            if kind is TimerKind.ROTATE:
                self._rotate_due = True
                self._start_due(now)
                continue
            keeper = self._keepers[keeper_id]
            if kind is TimerKind.POLL:
                self._poll(keeper, now, scheduled=when)
            elif (request := self._end_request(keeper)) is not None:
                self._decide(keeper, request, TIMED_OUT, now)

    def receive(self, answer: Answer, now: float) -> None:
        """Feed the outcome of a `SendRequest`.  Late or unknown answers are ignored."""
        request = self._inflight.get(answer.request_id)
        if request is None:
            return
        keeper = self._keepers[request.keeper_id]
        self._end_request(keeper)
        keeper.last_answer_at = now
        keeper.latency = now - request.issued_at
        in_play = self._in_play()
        seen = classify(
            request.kind,
            answer,
            self._record,
            keeper.id,
            pending=in_play,
            highest=self._highest,
            asked=request.epoch,
            member=self._member(keeper.id),
        )
        self._decide(keeper, request, seen, now)

    def initialise(self, record: KeyRecord, now: float, *, replace: bool = False) -> bool:
        """Adopt a new key record (from bootstrap).  Returns False if it is already in place.

        Raises `RemoteProtocolError` for a malformed record, `LocalProtocolError`
        for one that does not fit this Nexus's keepers and threshold, and
        `AlreadyInitialised` when another record is in place and not `replace`.
        During a rotation, the rotation's own new record is adopted with the
        key already held: the machine stays READY (a follower's commit).  Any
        other record ends the rotation.
        """
        if not self.check_initialise(record, replace=replace):
            return False
        rotation = self._rotation
        if rotation is not None:
            ours = rotation.stage is not RotationStage.PERSISTING and rotation.pending.record.same_key(record)
            if ours and rotation.new_key is not None and self._key is not None:
                self._step(Event.ADOPTED, now)
                return True
            self._step(Event.REPLACED, now)
        self._forget_key()
        self._record = record
        self._highest = max(self._highest, record.epoch)
        self._from_operator.clear()
        self._unrecorded.clear()
        self._recovery_started = now
        self._set_phase(Phase.RECOVERING, now)
        # Answers to requests made for the old record must not count for the new one, and what
        # keepers showed against the old record says nothing against the new one.
        for keeper_id in record.keeper_ids:
            if keeper_id not in self._keepers:
                self._add_keeper(keeper_id, now)
        for keeper in self._keepers.values():
            self._end_request(keeper)
            keeper.sighting = None
            keeper.cycle = 0
            keeper.anchor = now
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

    def adopt_unrecorded(self) -> RootKey:
        """The key SPIKE's Go bootstrap dealt to the keepers itself, without a key record (it sends none).

        From the unlabelled shards the keepers showed at their latest polls (those still unverified): at
        least `threshold` of them, and every one on the polynomial the lowest `threshold` define, so with
        more than `threshold` keepers a shard of anything else is caught.  Nothing changes here: the
        caller proves the key (Go bootstrap's verification opens under it), writes its record
        (`initialise`) and hands in shards of it (`submit_shard`).  Raises `UnrecordedKeyRefused`.
        """
        if self._record is not None:
            raise UnrecordedKeyRefused("Nexus already has a key record", waiting=False)
        shown = {i: share for i, share in self._unrecorded.items() if self._keepers[i].state is KeeperState.UNVERIFIED}
        if len(shown) < self.threshold:
            raise UnrecordedKeyRefused(
                f"{len(shown)} keeper(s) showed an unlabelled shard at their latest poll, {self.threshold} needed",
                waiting=True,
            )
        if not on_one_polynomial({i: s.as_int() for i, s in shown.items()}, self.threshold):
            raise UnrecordedKeyRefused(
                f"the unlabelled shards of keepers {sorted(shown)} are not shards of one key", waiting=False
            )
        try:
            return combine(shown.values(), self.threshold)
        except ShamirError as exc:
            raise UnrecordedKeyRefused(str(exc), waiting=False) from None

    def submit_shard(self, share: Share, now: float) -> RestoreProgress:
        """An operator hands in a recovery shard (break-glass restore).

        During a rotation, a shard of either epoch in play is accepted.
        """
        record = self._require_record()
        if self._phase is Phase.READY:
            raise LocalProtocolError("Nexus already holds the verified root key")
        in_play = self._in_play_records()
        if not any(share.id in r.keeper_ids for r in in_play):
            raise ShareRejected(f"shard id {share.id} is not one of this deployment's keeper ids")
        if share.id in self._from_operator:
            raise DuplicateShare(f"shard {share.id} was already given")
        if not any(r.matches_share(share) for r in in_play):
            raise ShareRejected(f"shard {share.id} does not belong to key epoch {record.epoch}")
        self._from_operator.add(share.id)
        self._collected.setdefault(share.epoch, {})[share.id] = share
        accepted = len(self._collected[share.epoch])
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
        without a record.  While a pending rotation is stored, answer
        `NewerKeySeen` with `follow_rotation` instead.
        """
        record = self._require_record()
        refuted = 0
        for keeper in list(self._keepers.values()):
            sighting = keeper.sighting
            if sighting is None or sighting.at > checked_at or keeper.request is not None:
                continue
            refuted_request = Request(0, keeper.id, sighting.kind, now, now)
            self._decide(keeper, refuted_request, never_had(sighting.epoch, record), now, count=False)
            refuted += 1
        return refuted

    def shards_dealt(self, now: float) -> int:
        """Bootstrap says the keepers were just given their shards of the record in force: read them now.

        `initialise` polls every keeper at once, but bootstrap deals the
        shards only after the record is installed (a shard without its record
        would be garbage), so that round finds them empty and the key would
        wait for the next polls, up to an interval later.  While recovering,
        this reads each keeper with no request in flight once more (a CHECK,
        handled by the rules table like any read), off the grid: the poll
        timers and every later poll stay where they were, and the read's
        deadline is capped at the keeper's next poll as every request's is, so
        a keeper still has at most one request in flight.  Returns how many
        reads were sent; does nothing unless recovering.
        """
        if self._phase is not Phase.RECOVERING:
            return 0
        sent = 0
        for keeper in sorted(self._keepers.values(), key=lambda k: k.id):
            if keeper.request is None:
                self._check(keeper, now)
                sent += 1
        return sent

    def forget(self, now: float) -> None:
        """Overwrite and drop the keys and any collected shards (shutdown).

        The machine stays usable: without its key it is recovering again, so a
        late answer is handled as in any other recovery.
        """
        self._forget_key()
        if self._phase is Phase.READY:
            self._recovery_started = now
            self._set_phase(Phase.RECOVERING, now)

    # ------------------------------------------------------------------ the rules, carried out

    def _decide(
        self, keeper: KeeperRecord, request: Request, seen: Classified, now: float, *, count: bool = True
    ) -> None:
        """Apply the rule for this answer: the only place an answer changes a keeper."""
        kind = request.kind
        rule = TABLE[(self._phase, kind, seen.outcome)]
        self._last_rule = rule
        if not rule.possible:
            self._cannot_happen += 1
            return
        keeper.sighting = None  # a later answer replaces what the last one showed
        if seen.holds is not None:
            keeper.holds = seen.holds
        if seen.slots is not None:
            keeper.slots = seen.slots
        if rule.state is not None:
            detail = self._holding_detail(keeper, kind) if rule.state is KeeperState.HOLDING else seen.detail
            self._set_state(keeper, rule.state, now, detail, count=count)
        if rule.needs_seed is not None:
            keeper.needs_seed = rule.needs_seed
        for do in rule.then:
            self._do(do, keeper, request, seen, now)
        self._dealing_progress(keeper, kind, now)

    def _do(self, do: Do, keeper: KeeperRecord, request: Request, seen: Classified, now: float) -> None:
        if do is Do.COUNT_EMPTY:
            keeper.empty_answers += 1
        elif do is Do.COUNT_FAILURE:
            keeper.failures += 1
        elif do is Do.REPORT:
            self._effects.append(KeeperMisbehaved(keeper.id, now, seen.problem))
        elif do is Do.REPORT_NEWER:
            assert seen.epoch is not None
            keeper.sighting = Sighting(seen.epoch, now, request.kind)
            self._effects.append(NewerKeySeen(keeper.id, seen.epoch, now))
        elif do is Do.RESEEDED:
            if keeper.unconfirmed_push:
                keeper.unconfirmed_push = False
                keeper.reseeds += 1
                self._effects.append(KeeperReseeded(keeper.id, now, keeper.reseed_from))
        elif do is Do.KEEP_UNRECORDED:
            if seen.share is None:
                self._unrecorded.pop(keeper.id, None)
            else:
                self._unrecorded[keeper.id] = seen.share
        elif do is Do.COLLECT:
            assert seen.share is not None
            self._collected.setdefault(seen.share.epoch, {})[keeper.id] = seen.share
            self._try_recover(now, KeySource.KEEPERS)
        elif do is Do.PUSH:
            self._push(keeper, now)
        elif do is Do.CONFIRM:
            if request.kind is RequestKind.PUSH:
                keeper.unconfirmed_push = True
            body = self._read_body(request.epoch)  # the epoch it was just given
            self._send(keeper, RequestKind.CONFIRM, KEEPER_SHARD_PATH, body, now, request.epoch)
        elif do is Do.CHECK:
            self._check(keeper, now)
        elif do is Do.DEAL:
            self._deal(keeper, now)
        elif do is Do.RETIRE:
            if seen.retire is not None and keeper.request is None:
                body = encode(ForgetRequest(epoch=seen.retire))
                self._send(keeper, RequestKind.FORGET, KEEPER_FORGET_PATH, body, now, seen.retire)
        elif do is Do.CLEAR:
            if keeper.request is None:
                self._send(keeper, RequestKind.CLEAR, KEEPER_FORGET_PATH, encode(ForgetRequest(all=True)), now)
        elif do is Do.RETIRED:
            self._effects.append(ShardRetired(keeper.id, request.epoch, now))
        else:
            self._leave(keeper, now, seen.detail or seen.problem)

    @staticmethod
    def _holding_detail(keeper: KeeperRecord, kind: RequestKind) -> str:
        if not keeper.unconfirmed_push:
            return ""
        return "re-seeded and confirmed" if kind is RequestKind.CONFIRM else "re-seeded, confirmed by a later read"

    def _try_recover(self, now: float, source: KeySource) -> bool:
        """Rebuild a key if enough verified shards of an epoch in play are in; True once it is in use."""
        record = self._record
        if record is None or self._phase is not Phase.RECOVERING:
            return False
        for candidate in self._in_play_records():
            pile = self._collected.get(candidate.epoch, {})
            if len(pile) < candidate.threshold:
                continue
            used = tuple(sorted(pile)[: candidate.threshold])
            key = combine((pile[i] for i in used), candidate.threshold)
            if not candidate.matches_key(key):
                # Every shard passed its commitment, so the record itself is inconsistent.
                key.wipe()
                pile.clear()
                self._effects.append(KeyRejected(candidate.epoch, now, used))
                continue
            if not self._use_key(key, candidate, now):
                continue
            self._collected.clear()
            self._from_operator.clear()
            self._set_phase(Phase.READY, now)
            self._effects.append(KeyRecovered(candidate.epoch, now, used, source, self._recovery_started))
            self._after_rebuild(source, now)
            self._start_due(now)
            return True
        return False

    def _use_key(self, key: RootKey, rebuilt: KeyRecord, now: float) -> bool:
        """Take a rebuilt key of `rebuilt` (the record's, or a rotation's); open the other one from the rotation."""
        rotation = self._rotation
        if rotation is None or rotation.stage is RotationStage.PERSISTING:
            self._key = key
            return True
        pending = rotation.pending
        try:
            if rebuilt is pending.record:
                self._key = pending.open_old(key)
                rotation.new_key = key
            else:
                self._key = key
                rotation.new_key = pending.open_new(key)
        except RemoteProtocolError as exc:
            # A damaged or foreign pending rotation: with the old key, go on without it (nothing of it
            # is dealt, and nothing commits); with only the new one, keep waiting for old shards.
            detail = f"{exc}: the rotation cannot go on (abort_rotation)"
            self._report_rotation(rotation, rotation.stage or RotationStage.DEALING, now, detail)
            if rebuilt is pending.record:
                key.wipe()
                return False
        for keeper in self._keepers.values():
            keeper.deal_polls = 0  # dealing (re)starts now: confirmations from before are read again
        return True

    def _after_rebuild(self, source: KeySource, now: float) -> None:
        for keeper in list(self._keepers.values()):
            if keeper.request is not None:
                continue  # its answer is on the way and is handled when it comes
            do, _ = AFTER_REBUILD[(source, keeper.seen())]
            if do is Do.PUSH:
                self._push(keeper, now)
            elif do is Do.CHECK:
                self._check(keeper, now)

    # ------------------------------------------------------------------ requests and the schedule

    def _add_keeper(self, keeper_id: int, now: float) -> None:
        slot = self._slots.get(keeper_id)
        if slot is None:
            slot = self._slots[keeper_id] = self._schedule.interval * ((keeper_id * _GOLDEN) % 1.0)
        keeper = self._keepers[keeper_id] = KeeperRecord(keeper_id, slot, now)
        self._timers.set((TimerKind.POLL, keeper.id), now)

    def _leave(self, keeper: KeeperRecord, now: float, detail: str) -> None:
        """A keeper a rekey removed holds nothing of ours: it is no longer polled."""
        if self._member(keeper.id):
            return  # it is back in a set meanwhile (a record replaced): it stays
        self._end_request(keeper)
        self._timers.cancel((TimerKind.POLL, keeper.id))
        del self._keepers[keeper.id]
        self._effects.append(KeeperLeft(keeper.id, now, detail))

    def _grid_time(self, keeper: KeeperRecord, cycle: int) -> float:
        interval = self._schedule.interval
        offset = (2.0 * self._rng.random() - 1.0) * self._schedule.jitter * interval
        return keeper.anchor + keeper.slot + cycle * interval + offset

    def _poll(self, keeper: KeeperRecord, now: float, *, scheduled: float) -> None:
        self._end_request(keeper)  # none can be in flight while deadlines are capped; kept as a guard
        keeper.cycle += 1
        due = self._grid_time(keeper, keeper.cycle)
        if due <= now:
            # The driver fell behind by more than a cycle: skip missed slots
            # rather than firing a burst, and stay on the same grid.
            elapsed = now - keeper.anchor - keeper.slot
            keeper.cycle = max(keeper.cycle, int(elapsed // self._schedule.interval) + 1)
            due = max(self._grid_time(keeper, keeper.cycle), now + 1e-3)
        keeper.next_poll_at = due
        self._timers.set((TimerKind.POLL, keeper.id), due)
        keeper.polls += 1
        keeper.last_poll_at = now
        asked = self._asked(keeper)
        self._send(keeper, RequestKind.POLL, KEEPER_SHARD_PATH, self._read_body(asked), now, asked, scheduled)

    def _check(self, keeper: KeeperRecord, now: float) -> None:
        asked = self._asked(keeper)
        self._send(keeper, RequestKind.CHECK, KEEPER_SHARD_PATH, self._read_body(asked), now, asked)

    @staticmethod
    def _read_body(epoch: int | None) -> bytes:
        return _EMPTY_BODY if epoch is None else encode(ShardRequest(epoch))

    def _send(
        self,
        keeper: KeeperRecord,
        kind: RequestKind,
        path: str,
        body: bytes,
        now: float,
        epoch: int | None = None,
        scheduled: float | None = None,
    ) -> None:
        request_id = self._next_request_id
        self._next_request_id += 1
        deadline = min(now + self._schedule.request_timeout, keeper.next_poll_at)
        request = Request(request_id, keeper.id, kind, now, deadline, epoch)
        keeper.request = request
        self._inflight[request_id] = request
        self._timers.set((TimerKind.DEADLINE, keeper.id), deadline)
        self._effects.append(
            SendRequest(keeper.id, request_id, kind, path, deadline, body, now if scheduled is None else scheduled)
        )

    def _end_request(self, keeper: KeeperRecord) -> Request | None:
        """Take the keeper's request out of flight (answered, timed out or dropped)."""
        request, keeper.request = keeper.request, None
        if request is not None:
            del self._inflight[request.request_id]
            self._timers.cancel((TimerKind.DEADLINE, keeper.id))
        return request

    def _push(self, keeper: KeeperRecord, now: float) -> None:
        """Re-seed a keeper with the oldest shard it should hold whose key is known (the record's, first)."""
        if keeper.request is not None:
            return  # its answer is on the way; the rules decide again then
        record = self._require_record()
        rotation = self._rotation
        if keeper.id in record.keeper_ids and self._key is not None:
            key, target = self._key, record
        elif rotation is not None and self._dealing() and keeper.id in rotation.pending.record.keeper_ids:
            assert rotation.new_key is not None
            key, target = rotation.new_key, rotation.pending.record
            keeper.took_new = True
        else:
            return  # nothing it should hold is known (a keeper only a stored rotation names, not being dealt)
        share = share_for(
            key, epoch=target.epoch, threshold=target.threshold, id=keeper.id, derivation=target.derivation
        )
        keeper.reseed_from = keeper.state
        body = encode(ShardContribution.of(share))
        self._send(keeper, RequestKind.PUSH, KEEPER_CONTRIBUTE_PATH, body, now, target.epoch)

    # ------------------------------------------------------------------ bookkeeping

    def _check_record(self, record: KeyRecord) -> None:
        rotation = self._rotation
        if rotation is not None and rotation.pending.record.same_key(record):
            return  # the rotation's own new record
        ids, threshold = self._target
        if tuple(sorted(record.keeper_ids)) != ids:
            raise LocalProtocolError(f"key record is for keepers {list(record.keeper_ids)}, configured are {list(ids)}")
        if record.threshold != threshold:
            raise LocalProtocolError(f"key record has threshold {record.threshold}, configured is {threshold}")
        if record.derivation is not self._derivation:
            raise LocalProtocolError(
                f"key record's shards are derived the {record.derivation.value!r} way, configured is "
                f"{self._derivation.value!r} (--shard-derivation)"
            )

    def _require_record(self) -> KeyRecord:
        if self._record is None:
            raise LocalProtocolError("Nexus has no key record yet: run bootstrap first")
        return self._record

    def _set_state(self, keeper: KeeperRecord, state: KeeperState, now: float, detail: str, *, count: bool) -> None:
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
        rotation = self._rotation
        if rotation is not None and rotation.new_key is not None:
            rotation.new_key.wipe()
            rotation.new_key = None
        self._collected.clear()


def _ids(ids: Iterable[int]) -> str:
    return ", ".join(str(i) for i in ids)
