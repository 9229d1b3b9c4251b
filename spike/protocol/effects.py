"""What the Nexus custody machine asks its driver to do, or wants reported.

`SendRequest` is the only effect that must be performed; the others are
reports for logs, metrics and status, carrying ids, states and times but
never key or shard bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, StrEnum


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


class RequestKind(Enum):
    """Why a `SendRequest` was issued (informational: the driver performs every kind the same way)."""

    POLL = "poll"  # regular scheduled shard read
    PUSH = "push"  # re-seed: contribute its shard
    CONFIRM = "confirm"  # shard read right after a push
    CHECK = "check"  # shard read when the key was just rebuilt, before pushing on an old answer


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


Report = (
    KeeperStateChanged | KeeperReseeded | KeeperMisbehaved | PhaseChanged | KeyRecovered | KeyRejected | NewerKeySeen
)
Effect = SendRequest | Report
