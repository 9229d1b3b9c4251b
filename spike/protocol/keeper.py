"""The keeper: one shard (two during a key rotation), in memory only, handed out only to Nexus (ADR-0021).

The keeper holds at most two shards: the latest one, and the one Nexus asked
it to keep beside it when it dealt a new key epoch (docs/key-lifecycle.md
section 2).  Its requests:

================================  ==========================================
``POST /v1/store/contribute``     Nexus or Bootstrap gives it a shard -> 200
``POST /v1/store/shard``          Nexus asks for it -> 200, or 404 when EMPTY
``POST /v1/store/forget``         Nexus tells it to drop a shard (or all) -> 200
================================  ==========================================

A caller that sends no extension field sees SPIKE's keeper exactly: a read
with ``{}`` answers the latest shard, and a contribution without ``keep``
leaves it holding that one shard only.  A malformed, wrong-length or
all-zero shard is a 400 and changes nothing; a peer that is not Nexus (or
Bootstrap, for contributions) gets a 401 before its body is even looked at.
The keeper never talks to anyone first.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from enum import Enum

from .api import (
    BAD_REQUEST,
    CONFLICT,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    OK_EMPTY,
    UNAUTHORIZED,
    ApiRequest,
    ApiResponse,
)
from .errors import RemoteProtocolError, ShamirError
from .identity import Role, TrustDomains
from .material import Share, shard_commitment
from .wire import (
    KEEPER_CONTRIBUTE_PATH,
    KEEPER_FORGET_PATH,
    KEEPER_SHARD_PATH,
    TWO_SLOTS,
    ForgetRequest,
    ShardAnswer,
    ShardContribution,
    ShardRequest,
    decode,
)

#: The largest request body a keeper server should accept (a shard contribution is ~150 bytes).
MAX_KEEPER_BODY = 4096

_PATHS = (KEEPER_CONTRIBUTE_PATH, KEEPER_SHARD_PATH, KEEPER_FORGET_PATH)


class KeeperChange(Enum):
    """What a request did to the keeper, for the caller to log (never the bytes)."""

    NONE = "none"
    STORED = "stored"  # EMPTY -> HOLDING
    REPLACED = "replaced"  # HOLDING a different shard -> HOLDING
    FORGOTTEN = "forgotten"  # a shard dropped on Nexus's request (`forget`)


@dataclass(frozen=True, slots=True)
class KeeperOutcome:
    """The keeper's answer to one request, and what to log about it (never shard bytes)."""

    response: ApiResponse
    change: KeeperChange = KeeperChange.NONE
    refused: str | None = None  # why a request was refused, for the log


class _Held:
    """One shard in memory, with the labels it came with."""

    __slots__ = ("shard", "id", "epoch")

    def __init__(self, shard: bytes, keeper_id: int | None, epoch: int | None) -> None:
        self.shard = bytearray(shard)
        self.id = keeper_id
        self.epoch = epoch

    def same(self, shard: bytes, keeper_id: int | None, epoch: int | None) -> bool:
        return self.shard == shard and self.id == keeper_id and self.epoch == epoch

    def wipe(self) -> None:
        for i in range(len(self.shard)):
            self.shard[i] = 0


class Keeper:
    """Sans-IO keeper: feed it requests, send back what it answers.

    Not thread-safe: a server that handles requests on several threads calls
    `handle` under one lock (it never blocks, so the lock is held briefly).
    """

    def __init__(self, trust: TrustDomains) -> None:
        self._trust = trust
        self._latest: _Held | None = None
        self._previous: _Held | None = None  # kept only on request (`keep`), always labelled with an epoch

    @property
    def holds_shard(self) -> bool:
        """True once a shard has been contributed (until `forget`)."""
        return self._latest is not None

    @property
    def epochs(self) -> tuple[int | None, ...]:
        """The epoch labels of the shards it holds, latest first (``()`` when empty)."""
        return tuple(held.epoch for held in (self._latest, self._previous) if held is not None)

    def handle(self, request: ApiRequest) -> KeeperOutcome:
        """Answer one request.  Never raises for anything the peer sent: bad input is a 4xx outcome.

        Bodies longer than `MAX_KEEPER_BODY` should be refused by the server before they get here.
        """
        if request.path not in _PATHS:
            return KeeperOutcome(NOT_FOUND, refused="unknown path")
        if request.method != "POST":
            return KeeperOutcome(METHOD_NOT_ALLOWED, refused="method not allowed")
        role = self._trust.role_of(request.peer)
        if request.path == KEEPER_SHARD_PATH:
            if role is not Role.NEXUS:
                return KeeperOutcome(UNAUTHORIZED, refused=f"shard read by {request.peer}")
            return KeeperOutcome(self._answer_shard(request.body))
        if request.path == KEEPER_FORGET_PATH:
            if role is not Role.NEXUS:
                return KeeperOutcome(UNAUTHORIZED, refused=f"forget from {request.peer}")
            return self._forget(request.body)
        if role not in (Role.NEXUS, Role.BOOTSTRAP):
            return KeeperOutcome(UNAUTHORIZED, refused=f"contribution from {request.peer}")
        return self._contribute(request.body)

    def _answer_shard(self, body: bytes) -> ApiResponse:
        latest = self._latest
        if latest is None:
            return NOT_FOUND
        try:
            wanted = decode(body, ShardRequest).epoch
        except RemoteProtocolError:
            wanted = None  # SPIKE's keeper ignores the body of a read: so does this one, unless it names an epoch
        if wanted is None:
            return ApiResponse.json(ShardAnswer(list(latest.shard), latest.id, latest.epoch))
        previous = self._previous
        shown, other = (previous, latest) if previous is not None and previous.epoch == wanted else (latest, previous)
        other_epoch = None if other is None else other.epoch
        return ApiResponse.json(ShardAnswer(list(shown.shard), shown.id, shown.epoch, other_epoch, TWO_SLOTS))

    def _contribute(self, body: bytes) -> KeeperOutcome:
        try:
            contribution = decode(body, ShardContribution)
        except RemoteProtocolError as exc:
            return KeeperOutcome(BAD_REQUEST, refused=str(exc))
        shard = contribution.shard_bytes()
        if not any(shard):
            return KeeperOutcome(BAD_REQUEST, refused="all-zero shard")
        keep = contribution.keep
        if keep is not None and (contribution.epoch is None or keep == contribution.epoch):
            return KeeperOutcome(BAD_REQUEST, refused="keep needs an epoch, and another one than the shard's")
        held = (self._latest, self._previous)
        kept = next((h for h in held if h is not None and keep is not None and h.epoch == keep), None)
        latest = self._latest
        if keep is not None and kept is None and latest is not None and latest.epoch is None and self._previous is None:
            # A lone shard given without labels (by SPIKE's bootstrap, say): Nexus checked it against epoch `keep`'s
            # commitment before asking, so it is that epoch's, and is kept as such.
            kept = _Held(bytes(latest.shard), latest.id, keep)
        if keep is not None and kept is None:
            # Nexus saw that shard a moment ago; without it (a restart since) the keeper would end up with the
            # new shard alone, and a keeper holding the new epoch's shard must still hold the old one.
            return KeeperOutcome(CONFLICT, refused=f"asked to keep a shard of epoch {keep}, which it does not hold")
        if kept is not None and not _commits_to(kept, contribution):
            # What it holds changed since Nexus verified it (garbage put there in between): keeping it would
            # leave a wrong shard of the key in force that no read checks until the rotation ends.
            return KeeperOutcome(
                CONFLICT, refused=f"its shard of epoch {keep} is not the one the key record commits to"
            )
        if latest is not None and latest.same(shard, contribution.id, contribution.epoch) and kept is self._previous:
            return KeeperOutcome(OK_EMPTY)
        change = KeeperChange.STORED if latest is None else KeeperChange.REPLACED
        for dropped in held:
            if dropped is not None and dropped is not kept:
                dropped.wipe()
        self._latest = _Held(shard, contribution.id, contribution.epoch)
        self._previous = kept
        return KeeperOutcome(OK_EMPTY, change)

    def _forget(self, body: bytes) -> KeeperOutcome:
        try:
            request = decode(body, ForgetRequest).validate()
        except RemoteProtocolError as exc:
            return KeeperOutcome(BAD_REQUEST, refused=str(exc))
        if request.all:
            change = KeeperChange.FORGOTTEN if self._latest is not None else KeeperChange.NONE
            self.forget()
            return KeeperOutcome(OK_EMPTY, change)
        latest, previous = self._latest, self._previous
        if previous is not None and previous.epoch == request.epoch:
            previous.wipe()
            self._previous = None
        elif latest is not None and latest.epoch == request.epoch:
            latest.wipe()
            self._latest, self._previous = previous, None
        else:
            return KeeperOutcome(OK_EMPTY)
        return KeeperOutcome(OK_EMPTY, KeeperChange.FORGOTTEN)

    def forget(self) -> None:
        """Overwrite and drop every shard (on shutdown, or on Nexus's ``forget`` of all)."""
        for held in (self._latest, self._previous):
            if held is not None:
                held.wipe()
        self._latest = None
        self._previous = None


def _commits_to(kept: _Held, contribution: ShardContribution) -> bool:
    """Whether `kept` is the shard `contribution.keep_commitment` commits to (no commitment: any, as before)."""
    expected = contribution.keep_commitment
    if expected is None:
        return True
    if contribution.id is None or contribution.keep is None:
        return False
    try:
        share = Share(contribution.id, contribution.keep, bytes(kept.shard))
    except ShamirError:
        return False
    return hmac.compare_digest(shard_commitment(share), expected)
