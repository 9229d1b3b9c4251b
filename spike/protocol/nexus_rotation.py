"""Key rotation and rekey in the Nexus custody machine: its calls, its steps, what it knows meanwhile.

`NexusCustody` is built on `RotatingCustody`: this part holds the calls a
driver makes to rotate the root key or move custody (docs/key-lifecycle.md
section 10), how a rotation moves from step to step (the table
`spike.protocol.rotation_steps.STEPS` decides, `_step` carries it out), and
what the machine knows about a rotation when it judges an answer (the epochs
in play, who is a member, which epoch a read asks for).  What happens to each
keeper along the way is the rules table's business, carried out in
`spike.protocol.nexus`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .custody_state import KeeperRecord, Request, Rotation
from .custody_view import RotationRefused, RotationView
from .effects import (
    AbandonRotation,
    CommitRotation,
    Effect,
    PersistRotation,
    Phase,
    RequestKind,
    RotationProgress,
    RotationStage,
)
from .errors import LocalProtocolError
from .material import MAX_EPOCH, RootKey, Share
from .pending import PendingRotation
from .record import KeyRecord, seal_key
from .rotation_steps import STEPS, Act, Event, Step
from .shamir import ShardDerivation, check_parameters, share_for
from .timers import TimerKind, Timers
from .wire import KEEPER_CONTRIBUTE_PATH, TWO_SLOTS, ShardContribution, encode

#: Polls of every keeper of the new set after which a rotation commits with t' of them dealt (the
#: others get their new shard at a later poll, as stale keepers): a keeper that stays down cannot
#: block a rotation, and one that was only slow has had its chances (docs/key-lifecycle.md step 4).
DEAL_ROUNDS = 3
ROTATION_TIMER = 0  # the keeper id the scheduled rotation's timer is filed under (keeper ids start at 1)


class RotatingCustody:
    """The rotation half of `NexusCustody` (not usable on its own: `NexusCustody` provides the rest)."""

    # Kept by NexusCustody.
    _rotation: Rotation | None
    _record: KeyRecord | None
    _key: RootKey | None
    _phase: Phase
    _keepers: dict[int, KeeperRecord]
    _effects: list[Effect]
    _timers: Timers
    _highest: int
    _target: tuple[tuple[int, ...], int]
    _derivation: ShardDerivation
    _rotate_due: bool
    _rekey: bool
    _random_bytes: Callable[[int], bytes] | None
    _collected: dict[int, dict[int, Share]]

    def _require_record(self) -> KeyRecord:
        raise NotImplementedError

    def _set_phase(self, phase: Phase, now: float) -> None:
        raise NotImplementedError

    def _end_request(self, keeper: KeeperRecord) -> Request | None:
        raise NotImplementedError

    def _add_keeper(self, keeper_id: int, now: float) -> None:
        raise NotImplementedError

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
        raise NotImplementedError

    # ------------------------------------------------------------------ queries

    @property
    def rotation(self) -> RotationView | None:
        """The rotation under way (this machine's, or one it follows), or None."""
        rotation = self._rotation
        if rotation is None or rotation.stage is None:
            return None
        new = rotation.pending.record
        dealt = self._dealt(new)
        return RotationView(
            rotation.stage,
            rotation.pending.from_epoch,
            new.epoch,
            new.threshold,
            new.keeper_ids,
            dealt,
            max(0, new.threshold - len(dealt)),
            rotation.started_at,
        )

    @property
    def rotation_key(self) -> RootKey:
        """The new root key of the rotation under way, while it is known.  Secret: never log it.

        Raises `LocalProtocolError` when there is none (no rotation, or the
        machine is not READY).
        """
        rotation = self._rotation
        if rotation is None or rotation.new_key is None:
            raise LocalProtocolError("no rotation key: no rotation under way, or its key is not known yet")
        return rotation.new_key

    @property
    def highest_epoch(self) -> int:
        """The highest key epoch this machine knows the deployment used (abandoned rotations included)."""
        return self._highest

    # ------------------------------------------------------------------ inputs: key rotation

    def start_rotation(
        self,
        now: float,
        *,
        key: RootKey | None = None,
        keeper_ids: Iterable[int] | None = None,
        threshold: int | None = None,
    ) -> PendingRotation:
        """Start rotating the root key (and, with other keepers or threshold, moving custody).

        `key` is the new root key (copied; default: drawn from `random_bytes`);
        `keeper_ids` and `threshold` the new set (default: the configured
        ones, which they replace).  The new epoch is above the record's and
        every epoch ever used.  Emits `PersistRotation`: nothing of the new
        epoch is sent before the driver calls `rotation_persisted`.  Returns
        the pending rotation.  Raises `LocalProtocolError` unless READY with
        no rotation under way (or without a key and no `random_bytes`),
        `ShamirError` for bad ids or threshold, and `RotationRefused` when the
        keepers could be left unable to rebuild either key (some keep only one
        shard: docs/key-lifecycle.md section 7).  A refusal changes nothing.
        """
        record = self._require_record()
        if self._phase is not Phase.READY or self._key is None:
            raise LocalProtocolError(f"a rotation needs the root key in memory (Nexus is {self._phase.value})")
        if self._rotation is not None and self._rotation.stage is not RotationStage.FOLLOWING:
            raise LocalProtocolError(f"a rotation is already under way ({self._rotation.stage})")
        if self._rotation is not None:
            raise LocalProtocolError("another Nexus instance's rotation is under way (follow_rotation)")
        ids = self._target[0] if keeper_ids is None else tuple(sorted(keeper_ids))
        new_threshold = self._target[1] if threshold is None else threshold
        check_parameters(new_threshold, ids)
        self._refuse_unsafe(record, ids, new_threshold)
        epoch = max(record.epoch, self._highest) + 1
        if epoch > MAX_EPOCH:
            raise RotationRefused(f"no key epoch is left above {epoch - 1}")
        if key is None:
            if self._random_bytes is None:
                raise LocalProtocolError("no new key given, and no random_bytes to draw one from")
            new_key = RootKey.generate(self._random_bytes)
        else:
            new_key = RootKey(key.secret_bytes())  # the machine wipes its own copy when done
        if self._derivation is ShardDerivation.SPIKE and new_key == self._key:
            # SPIKE's derivation has no epoch input: the same key at a new epoch would deal every
            # keeper the very shard it holds, so the "rotation" would change nothing but labels.
            new_key.wipe()
            raise RotationRefused(
                "with SPIKE's shard derivation (--shard-derivation spike) the shards depend on the key "
                "alone: a rotation needs a new root key, not the one in force"
            )
        new_record, _ = seal_key(
            new_key, epoch=epoch, threshold=new_threshold, keeper_ids=ids, derivation=self._derivation
        )
        pending = PendingRotation.seal(self._key, record, new_key, new_record)
        self._target = (ids, new_threshold)
        for keeper in self._keepers.values():
            keeper.took_new = False
        self._step(Event.START, now, Rotation(pending, new_key, now))
        return pending

    def rotation_persisted(self, now: float, pending: PendingRotation | None = None) -> None:
        """The driver stored the pending rotation (`PersistRotation`) durably: dealing begins.

        Pass the effect's `pending`: an acknowledgement of a rotation that is
        no longer this machine's (one dropped meanwhile) is then ignored.
        Raises `LocalProtocolError` when no rotation waits for that.
        """
        if self._acknowledges(pending):
            self._step(Event.PERSISTED, now)

    def rotation_not_persisted(self, now: float, reason: str, pending: PendingRotation | None = None) -> None:
        """The driver could not store the pending rotation (refused or failed): it is dropped.

        `reason` is reported (`RotationProgress`, `NOT_STARTED`).  Pass the
        effect's `pending` (see `rotation_persisted`).  Raises
        `LocalProtocolError` when no rotation waits for that.
        """
        if self._acknowledges(pending):
            self._step(Event.NOT_PERSISTED, now, detail=reason)

    def rotation_committed(self, now: float, pending: PendingRotation | None = None) -> None:
        """The driver committed the rotation (`CommitRotation`) durably: the new key is in force.

        The old key is wiped; keepers are told to forget the old epoch at
        their next polls.  Pass the effect's `pending` (see
        `rotation_persisted`).  Raises `LocalProtocolError` when no commit
        waits.
        """
        if self._acknowledges(pending):
            self._step(Event.COMMITTED, now)

    def abort_rotation(self, now: float) -> None:
        """Give up the rotation being dealt: emits `AbandonRotation` (then `rotation_abandoned`).

        Raises `RotationRefused` once a keeper that keeps only one shard took
        its new one (it lost its old shard: finish the rotation instead), and
        `LocalProtocolError` unless a rotation is being dealt.
        """
        rotation = self._rotation
        if rotation is None or rotation.stage is not RotationStage.DEALING:
            raise LocalProtocolError("only a rotation being dealt can be given up")
        single = sorted(k.id for k in self._keepers.values() if k.took_new and k.slots != TWO_SLOTS)
        if single:
            raise RotationRefused(
                f"keepers {_ids(single)} keep one shard only and took their new one: they no longer hold their "
                "old one, so the rotation must be finished"
            )
        self._step(Event.ABORT, now)

    def rotation_abandoned(self, now: float, pending: PendingRotation | None = None) -> None:
        """The driver deleted the pending rotation (`AbandonRotation`): its epoch is burned.

        Pass the effect's `pending` (see `rotation_persisted`).  Raises
        `LocalProtocolError` when no abandonment waits for that.
        """
        if self._acknowledges(pending):
            self._step(Event.ABANDONED, now)

    def follow_rotation(self, pending: PendingRotation | None, now: float) -> None:
        """Another Nexus instance stored `pending` (None: the stored one is gone without a commit).

        The machine treats the shards of that rotation as the rotation's (never
        garbage, never overwritten), does not deal them, and opens its new key
        with its own key, so that `initialise` with the committed record keeps
        it READY.  Raises `RemoteProtocolError` for a malformed pending
        rotation or one that does not open with this key, and
        `LocalProtocolError` when it does not start from this machine's record
        (load that first) or this machine's own rotation is under way.
        """
        if pending is None:
            self._step(Event.UNFOLLOW, now)
            return
        record = self._require_record()
        pending.validate()
        if not pending.starts_from(record):
            raise LocalProtocolError(f"that rotation starts from epoch {pending.from_epoch}, not this record's")
        current = self._rotation
        if current is not None and current.stage is not RotationStage.FOLLOWING:
            raise LocalProtocolError("this instance's own rotation is under way")
        new_key = None if self._key is None else pending.open_new(self._key)
        if current is not None and current.new_key is not None:
            current.new_key.wipe()
        self._highest = max(self._highest, pending.record.epoch)
        self._step(Event.FOLLOW, now, Rotation(pending, new_key, now))

    def retarget(self, now: float, keeper_ids: Iterable[int], threshold: int) -> bool:
        """The configuration changed (a reload): move custody to `keeper_ids` with `threshold`.

        The new set replaces the configured one (what `initialise` checks a
        record against, and what a rotation without arguments goes to) and the
        machine rekeys from then on as if constructed with ``rekey=True``: once
        READY with no rotation under way, a record for another set or
        threshold starts a rotation to this one (reported like any rotation:
        `RotationProgress`, `PERSISTING` or `NOT_STARTED` with the reason).  A
        rotation under way is finished first.  Needs `random_bytes`.  Returns
        whether custody has to move (the record in force is for another set).
        Raises `ShamirError` for bad ids or threshold and `LocalProtocolError`
        without `random_bytes`; a refusal changes nothing.
        """
        ids = tuple(sorted(keeper_ids))
        check_parameters(threshold, ids)
        if self._random_bytes is None:
            raise LocalProtocolError("moving custody needs random_bytes to draw the new key from")
        self._target = (ids, threshold)
        self._rekey = True
        record = self._record
        if record is None or self._is_target(record):
            return False
        self._rotate_due = True
        self._start_due(now)
        return True

    def rotate_at(self, when: float | None) -> None:
        """Start a rotation to the configured keepers at `when`, or as soon after as READY and idle.

        The key is drawn from `random_bytes`; the outcome is reported
        (`RotationProgress`: `PERSISTING`, or `NOT_STARTED` with the reason).
        One rotation per call: arm the next one yourself.  `None` disarms.
        Raises `LocalProtocolError` without `random_bytes`.
        """
        if when is None:
            self._timers.cancel((TimerKind.ROTATE, ROTATION_TIMER))
            return
        if self._random_bytes is None:
            raise LocalProtocolError("a scheduled rotation needs random_bytes to draw its key from")
        self._timers.set((TimerKind.ROTATE, ROTATION_TIMER), when)

    # ------------------------------------------------------------------ a rotation's steps

    def _acknowledges(self, pending: PendingRotation | None) -> bool:
        """Whether an acknowledgement is for the rotation under way (without `pending`: assumed so)."""
        rotation = self._rotation
        return pending is None or (rotation is not None and rotation.pending == pending)

    def _step(self, event: Event, now: float, rotation: Rotation | None = None, *, detail: str = "") -> None:
        """Move the rotation on by `event` (`rotation_steps.STEPS`); raise if it is not expected now."""
        current = self._rotation
        stage = None if current is None else current.stage
        step = STEPS.get((stage, event))
        if step is None:
            where = "no rotation is under way" if stage is None else f"the rotation is {stage.value}"
            raise LocalProtocolError(f"{event.value} is not expected: {where}")
        if rotation is not None:
            self._rotation = current = rotation
        if current is not None and step.stage is not None:
            current.stage = step.stage
        for act in step.acts:
            assert current is not None  # every act belongs to a rotation
            self._act(act, step, current, now, detail)

    def _act(self, act: Act, step: Step, rotation: Rotation, now: float, detail: str) -> None:
        pending = rotation.pending
        if act is Act.PERSIST:
            self._effects.append(PersistRotation(pending, now))
        elif act is Act.DEAL:
            for keeper_id in pending.record.keeper_ids:
                if keeper_id not in self._keepers:
                    self._add_keeper(keeper_id, now)
            for keeper in self._keepers.values():
                keeper.deal_polls = 0
        elif act is Act.COMMIT:
            self._effects.append(CommitRotation(pending, now))
        elif act is Act.ADOPT:
            self._adopt(rotation, now)
        elif act is Act.ABANDON:
            self._effects.append(AbandonRotation(pending, now))
        elif act is Act.BURN:
            self._highest = max(self._highest, pending.record.epoch)
        elif act is Act.DROP:
            if rotation.new_key is not None:
                rotation.new_key.wipe()
                rotation.new_key = None
            self._rotation = None
            dropped = pending.record.epoch
            for keeper in self._keepers.values():
                request = keeper.request
                if request is not None and (request.epoch == dropped or not self._member(keeper.id)):
                    self._end_request(keeper)  # about the rotation given up: it no longer counts
        else:
            self._report_rotation(rotation, step.report or step.stage or RotationStage.NOT_STARTED, now, detail)
            if step.stage is None:
                self._start_due(now)  # a rotation ended: a due one may start

    def _adopt(self, rotation: Rotation, now: float) -> None:
        """The rotation's record is in force: its key (if known) replaces the old one, wiped."""
        record = rotation.pending.record
        if self._key is not None:
            self._key.wipe()
        self._key = rotation.new_key
        rotation.new_key = None
        self._rotation = None
        self._record = record
        self._highest = max(self._highest, record.epoch)
        self._collected.clear()
        for keeper in self._keepers.values():
            keeper.took_new = False
            request = keeper.request
            # What was asked about the old epoch (its re-seed, its read-back), or of a keeper the rekey removed,
            # no longer counts; what was asked about the new one (a poll, a deal) does, and is awaited.
            if request is not None and (request.epoch not in (None, record.epoch) or not self._member(keeper.id)):
                self._end_request(keeper)
        if self._key is None and self._phase is Phase.READY:
            self._set_phase(Phase.RECOVERING, now)
        # A scheduled rotation that came due meanwhile is this one (this instance's, or another's it
        # followed): the next is armed from now by the driver.  A rekey still owed is due at once, unless
        # the record came from another instance: instances configured for different sets would then
        # move custody back and forth for ever (the driver says so; a reload moves it again).
        followed = rotation.stage is RotationStage.FOLLOWING
        self._rotate_due = self._rekey and not self._is_target(record) and not followed

    def _report_rotation(self, rotation: Rotation, stage: RotationStage, now: float, detail: str = "") -> None:
        new = rotation.pending.record
        dealt = self._dealt(new)
        rotation.reported = dealt
        needed = 0 if stage is RotationStage.COMMITTED else max(0, new.threshold - len(dealt))
        from_epoch = rotation.pending.from_epoch
        self._effects.append(RotationProgress(stage, from_epoch, new.epoch, dealt, needed, now, detail))

    def _dealing_progress(self, keeper: KeeperRecord, kind: RequestKind, now: float) -> None:
        """After an answer: count the keeper's polls while dealing, report who holds the new shard, commit."""
        rotation = self._rotation
        if rotation is None or not self._dealing():
            return
        new = rotation.pending.record
        if kind is RequestKind.POLL and keeper.id in new.keeper_ids:
            keeper.deal_polls += 1
        dealt = self._dealt(new)
        if dealt != rotation.reported and rotation.stage is not None:
            self._report_rotation(rotation, rotation.stage, now)
        if rotation.stage is not RotationStage.DEALING or len(dealt) < new.threshold:
            return
        everyone = len(dealt) == len(new.keeper_ids)
        if everyone or all(self._keepers[k].deal_polls >= DEAL_ROUNDS for k in new.keeper_ids):
            self._step(Event.DEALT, now)

    def _start_due(self, now: float) -> None:
        """Start the rotation that is due (scheduled, or a rekey), if it can start now."""
        if not self._rotate_due or self._phase is not Phase.READY or self._rotation is not None:
            return
        self._rotate_due = False
        record = self._require_record()
        try:
            self.start_rotation(now)
        except LocalProtocolError as exc:
            self._effects.append(
                RotationProgress(RotationStage.NOT_STARTED, record.epoch, record.epoch, (), 0, now, str(exc))
            )

    def _refuse_unsafe(self, record: KeyRecord, ids: tuple[int, ...], threshold: int) -> None:
        """Raise `RotationRefused` if keepers that keep one shard could end up rebuilding neither key."""
        kept = set(record.keeper_ids) & set(ids)
        single = sorted(k for k in kept if k not in self._keepers or self._keepers[k].slots != TWO_SLOTS)
        lost = min(len(single), threshold - 1)  # may have lost the old shard before the new key is rebuildable
        if record.shares - lost >= record.threshold:
            return
        need = record.threshold + threshold - 1
        raise RotationRefused(
            f"{record.shares} keepers, threshold {record.threshold}: keepers {_ids(single)} keep one shard only "
            "(SPIKE's Go keeper, or not yet seen holding one); a rotation interrupted half way could leave "
            f"neither key rebuildable; it needs {need} keepers, or keepers that keep the previous shard"
        )

    # ------------------------------------------------------------------ what the machine knows

    def _in_play(self) -> KeyRecord | None:
        """The record of a stored rotation (this machine's or another's): its shards are not garbage."""
        rotation = self._rotation
        if rotation is None or rotation.stage is RotationStage.PERSISTING:
            return None
        return rotation.pending.record

    def _in_play_records(self) -> list[KeyRecord]:
        record = self._require_record()
        pending = self._in_play()
        return [record] if pending is None else [record, pending]

    def _dealing(self) -> bool:
        rotation = self._rotation
        return (
            rotation is not None
            and rotation.stage in (RotationStage.DEALING, RotationStage.COMMITTING)
            and rotation.new_key is not None
            and self._phase is Phase.READY
        )

    def _dealt(self, new: KeyRecord) -> tuple[int, ...]:
        return tuple(k for k in new.keeper_ids if k in self._keepers and new.epoch in self._keepers[k].holds)

    def _member(self, keeper_id: int) -> bool:
        record = self._record
        if record is None or keeper_id in record.keeper_ids:
            return True
        pending = self._in_play()
        return pending is not None and keeper_id in pending.keeper_ids

    def _asked(self, keeper: KeeperRecord) -> int | None:
        """The epoch a read of `keeper` asks for: the newest one it should hold (while READY and dealing)."""
        record = self._record
        if record is None:
            return None
        pending = self._in_play()
        joining = pending is not None and keeper.id in pending.keeper_ids and keeper.id not in record.keeper_ids
        if pending is not None and keeper.id in pending.keeper_ids and (self._dealing() or joining):
            return pending.epoch
        return record.epoch if keeper.id in record.keeper_ids else None

    def _is_target(self, record: KeyRecord) -> bool:
        return (record.keeper_ids, record.threshold) == self._target and record.derivation is self._derivation

    def _deal(self, keeper: KeeperRecord, now: float) -> None:
        """Give a keeper that holds its current shard its new one, keeping the current one beside it."""
        rotation = self._rotation
        record = self._record
        if keeper.request is not None or rotation is None or record is None or not self._dealing():
            return
        new = rotation.pending.record
        if keeper.id not in new.keeper_ids or rotation.new_key is None:
            return
        share = share_for(
            rotation.new_key, epoch=new.epoch, threshold=new.threshold, id=keeper.id, derivation=new.derivation
        )
        keeper.took_new = True
        body = encode(ShardContribution.of(share, keep=record.epoch, keep_commitment=record.commitments.get(keeper.id)))
        self._send(keeper, RequestKind.DEAL, KEEPER_CONTRIBUTE_PATH, body, now, new.epoch)


def _ids(ids: Iterable[int]) -> str:
    return ", ".join(str(i) for i in ids)
