"""What the Nexus custody machine asks its driver to do, or wants reported.

`SendRequest` must be performed.  So must the three store effects
(`PersistRotation`, `CommitRotation`, `AbandonRotation`), which only a
driver that rotates keys ever sees: each answers a call it made
(docs/key-lifecycle.md).  The others are reports for logs, metrics and
status, carrying ids, states and times but never key or shard bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, StrEnum

from .pending import PendingRotation


class Phase(Enum):
    """Where Nexus stands with its root key."""

    UNINITIALISED = "uninitialised"  # no key record: waiting for bootstrap
    RECOVERING = "recovering"  # key record, no key: collecting shards
    READY = "ready"  # verified root key in memory


class KeeperState(Enum):
    """Nexus's view of one keeper, from its latest answer."""

    UNKNOWN = "unknown"  # not answered yet
    HOLDING = "holding"  # holds its verified current shard
    EMPTY = "empty"  # answered 404 (or a Go keeper's 400)
    WRONG_SHARD = "wrong_shard"  # holds a shard that fails its commitment
    UNVERIFIED = "unverified"  # holds a shard, and there is no key record to check it against
    UNREACHABLE = "unreachable"  # no HTTP answer
    BAD_ANSWER = "bad_answer"  # an answer that breaks the wire contract
    # Holds a shard labelled with a newer key epoch than this machine's record: left alone until the
    # driver loads that record or says the deployment never had that epoch (`confirm_record`).
    NEWER_EPOCH = "newer_epoch"
    # No longer in the key's keeper set (a rekey removed it) and still holding a shard: told to forget it.
    REMOVED = "removed"


class RequestKind(Enum):
    """Why a `SendRequest` was issued (informational: the driver performs every kind the same way)."""

    POLL = "poll"  # regular scheduled shard read
    PUSH = "push"  # re-seed: contribute its shard
    CONFIRM = "confirm"  # shard read right after a push
    CHECK = "check"  # shard read when the key was just rebuilt, before pushing on an old answer
    DEAL = "deal"  # a rotation: its shard of the new epoch, keeping its current one beside it
    FORGET = "forget"  # retire one shard it no longer needs (an earlier or abandoned epoch's)
    CLEAR = "clear"  # forget every shard: a rekey removed it from the keeper set


class RotationStage(Enum):
    """Where a key rotation stands (docs/key-lifecycle.md section 3).

    The first five are stages of a rotation under way (`RotationView.stage`);
    the last three end one and appear only in `RotationProgress` reports.
    """

    PERSISTING = "persisting"  # the pending rotation is with the driver, to be stored: nothing dealt yet
    DEALING = "dealing"  # stored: keepers are dealt their new shards at their polls
    COMMITTING = "committing"  # enough keepers showed the new shard: the commit is with the driver
    ABANDONING = "abandoning"  # given up: the driver is deleting the pending rotation
    FOLLOWING = "following"  # another Nexus instance's rotation, seen in the store: this one does not deal
    COMMITTED = "committed"  # the new key is in force
    ABANDONED = "abandoned"  # the rotation is gone; its epoch is burned
    NOT_STARTED = "not_started"  # refused, or the driver could not store it: nothing happened


@dataclass(frozen=True, slots=True)
class SendRequest:
    """POST `body` to `path` on keeper `keeper_id`; give up at `deadline`."""

    keeper_id: int
    request_id: int
    kind: RequestKind
    path: str
    deadline: float
    body: bytes = field(repr=False)
    scheduled_at: float = 0.0  # when a POLL was due on the grid (else when it was issued)


@dataclass(frozen=True, slots=True)
class KeeperStateChanged:
    """A keeper's state (Nexus's view of it) changed; `detail` says why, in words."""

    keeper_id: int
    previous: KeeperState
    state: KeeperState
    at: float
    detail: str = ""


@dataclass(frozen=True, slots=True)
class KeeperReseeded:
    """A push was confirmed by reading the shard back."""

    keeper_id: int
    at: float
    was: KeeperState


@dataclass(frozen=True, slots=True)
class KeeperMisbehaved:
    """A keeper answered something wrong: a bad or stale shard, garbage, a refusal."""

    keeper_id: int
    at: float
    problem: str


@dataclass(frozen=True, slots=True)
class NewerKeySeen:
    """A keeper showed a shard labelled with a key epoch newer than the machine's record.

    Either another Nexus instance installed a newer key record (load it with
    `NexusCustody.initialise(record, now, replace=True)`), or the label is
    garbage.  Until the driver has looked, the keeper is left alone: it is
    not this machine's to overwrite.  A driver that has read the deployment's
    stored record and found the machine's own in force says so with
    `NexusCustody.confirm_record`; the keeper is then reported and re-seeded.
    Emitted for every answer that shows such a shard, so that each one can be
    checked against a read of the record made after it.
    """

    keeper_id: int
    epoch: int
    at: float


@dataclass(frozen=True, slots=True)
class PhaseChanged:
    """Nexus moved from one `Phase` to another."""

    previous: Phase
    phase: Phase
    at: float


class KeySource(StrEnum):
    """Where the shards that rebuilt the key came from (a str: logs and metric labels take it as it is)."""

    KEEPERS = "keepers"
    OPERATOR = "operator"


@dataclass(frozen=True, slots=True)
class KeyRecovered:
    """The root key was rebuilt and verified: Nexus is READY."""

    epoch: int
    at: float
    keeper_ids: tuple[int, ...]  # whose shards rebuilt the key
    source: KeySource
    started_at: float  # when this recovery began, for its duration


@dataclass(frozen=True, slots=True)
class KeyRejected:
    """Shards that passed their commitments rebuilt a key that fails the check value."""

    epoch: int
    at: float
    keeper_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PersistRotation:
    """Store `pending`, only if the stored record is still epoch `pending.from_epoch` and none is stored.

    Then call `NexusCustody.rotation_persisted` once the write is durable, or
    `rotation_not_persisted` if it was refused or failed.  Nothing of the new
    epoch leaves the machine before.
    """

    pending: PendingRotation
    at: float


@dataclass(frozen=True, slots=True)
class CommitRotation:
    """In one write: make `pending.record` the key record in force and delete `pending`.

    Only if the stored record is still epoch `pending.from_epoch` and
    `pending` is stored.  Then call `NexusCustody.rotation_committed`.
    """

    pending: PendingRotation
    at: float


@dataclass(frozen=True, slots=True)
class AbandonRotation:
    """Delete `pending` and raise the stored high-water mark of epochs to `pending.record.epoch`.

    Then call `NexusCustody.rotation_abandoned`.
    """

    pending: PendingRotation
    at: float


@dataclass(frozen=True, slots=True)
class RotationProgress:
    """A rotation moved on: its stage, the keepers of the new set that hold their new shard, how many more it needs."""

    stage: RotationStage
    from_epoch: int
    to_epoch: int
    dealt: tuple[int, ...]
    needed: int  # keepers still to show their new shard before the commit (0 once committed)
    at: float
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ShardRetired:
    """A keeper confirmed it forgot its shard of `epoch` (``None``: every shard it held)."""

    keeper_id: int
    epoch: int | None
    at: float


@dataclass(frozen=True, slots=True)
class KeeperLeft:
    """A keeper removed from the set by a rekey holds nothing of ours any more: it is no longer polled."""

    keeper_id: int
    at: float
    detail: str = ""


Report = (
    KeeperStateChanged
    | KeeperReseeded
    | KeeperMisbehaved
    | PhaseChanged
    | KeyRecovered
    | KeyRejected
    | NewerKeySeen
    | RotationProgress
    | ShardRetired
    | KeeperLeft
)
StoreEffect = PersistRotation | CommitRotation | AbandonRotation
Effect = SendRequest | StoreEffect | Report
