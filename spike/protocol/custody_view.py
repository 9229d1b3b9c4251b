"""What the Nexus custody machine is configured with and shows: its schedule, views, refusals.

The values a driver passes to `NexusCustody` or reads from it, apart from
effects and answers: `PollSchedule`, the snapshots `KeeperView`,
`RotationView` and `RestoreProgress`, the `RandomSource` protocol, and the
exceptions the machine raises when the caller's input is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from .effects import KeeperState, RotationStage
from .errors import LocalProtocolError


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


class UnrecordedKeyRefused(LocalProtocolError):
    """No key from the keepers' unlabelled shards (`NexusCustody.adopt_unrecorded`): the message says why.

    `waiting` is True when fewer than the threshold of keepers show one (ask again later), False when
    the shards they show cannot be one key's (they do not lie on one polynomial, or a key record exists).
    """

    def __init__(self, message: str, *, waiting: bool) -> None:
        super().__init__(message)
        self.waiting = waiting


class RotationRefused(LocalProtocolError):
    """A rotation (or giving one up) was refused: the message says why, and nothing changed."""


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
    slots: int | None = None  # shards it keeps, as its last shard answer said (1: SPIKE's keeper; None: unknown)


@dataclass(frozen=True, slots=True)
class RotationView:
    """A rotation under way (`NexusCustody.rotation`), for status and metrics."""

    stage: RotationStage
    from_epoch: int
    to_epoch: int
    threshold: int  # of the new record
    keeper_ids: tuple[int, ...]  # of the new record
    dealt: tuple[int, ...]  # keepers of the new set whose last read showed their verified new shard
    needed: int  # more keepers that must show it before the commit
    started_at: float


@dataclass(frozen=True, slots=True)
class RestoreProgress:
    """What `NexusCustody.submit_shard` achieved: shards in hand, still needed, key rebuilt."""

    accepted: int  # shards in hand
    needed: int  # still missing before the key can be rebuilt
    ready: bool
