"""What the Nexus custody machine remembers per keeper, per request and about a rotation (internal).

Plain records with no behaviour of their own: `spike.protocol.nexus` reads
and changes them, the rules tables decide how.
"""

from __future__ import annotations

from dataclasses import dataclass

from .custody_rules import Seen
from .effects import KeeperState, RequestKind, RotationStage
from .material import RootKey
from .pending import PendingRotation


@dataclass(frozen=True, slots=True)
class Request:
    request_id: int
    keeper_id: int
    kind: RequestKind
    issued_at: float
    deadline: float
    epoch: int | None = None  # asked for (a read), given (a push or deal), or to forget


class Rotation:
    """The rotation under way: its stage, the pending rotation, the new key while it is known."""

    __slots__ = ("stage", "pending", "new_key", "started_at", "reported")

    def __init__(self, pending: PendingRotation, new_key: RootKey | None, now: float) -> None:
        self.stage: RotationStage | None = None  # set by the first step
        self.pending = pending
        self.new_key = new_key
        self.started_at = now
        self.reported: tuple[int, ...] = ()  # the dealt keepers last reported


@dataclass(frozen=True, slots=True)
class Sighting:
    """A keeper's last answer showed a shard of a newer epoch than the record."""

    epoch: int
    at: float
    kind: RequestKind  # of the request it answered: the rule that refutes it is that kind's


class KeeperRecord:
    __slots__ = (
        "id", "slot", "state", "since", "detail", "polls", "empty_answers", "failures",
        "reseeds", "last_poll_at", "last_answer_at", "latency", "cycle", "next_poll_at",
        "request", "needs_seed", "reseed_from", "unconfirmed_push", "sighting", "outcomes",
        "anchor", "holds", "slots", "deal_polls", "took_new",
    )  # fmt: skip

    def __init__(self, keeper_id: int, slot: float, now: float) -> None:
        self.id = keeper_id
        self.anchor = now  # where its grid starts: construction, `initialise`, or when it joined the set
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
        self.request: Request | None = None  # at most one in flight
        self.needs_seed = False  # its last regular answer that showed anything showed it lacks its shard
        self.reseed_from = KeeperState.UNKNOWN  # its state when the last push was sent
        # It accepted a push whose read-back has not shown the shard yet (the confirmation may
        # miss its deadline on a slow day): the next read that shows it reports the re-seed.
        self.unconfirmed_push = False
        self.sighting: Sighting | None = None  # set only while its last answer showed a newer epoch
        self.outcomes: dict[str, int] = {}  # answers by the state they showed
        self.holds: frozenset[int] = frozenset()  # epochs its last telling answer showed it holds, verified
        self.slots: int | None = None  # shards it keeps, as its last shard answer said
        self.deal_polls = 0  # polls decided since the rotation began dealing
        self.took_new = False  # it was dealt a new shard in this rotation

    def seen(self) -> Seen:
        if self.state is KeeperState.HOLDING:
            return Seen.HOLDING
        if self.state is KeeperState.NEWER_EPOCH:
            return Seen.NEWER
        return Seen.NEEDS_SHARD if self.needs_seed else Seen.UNSURE
