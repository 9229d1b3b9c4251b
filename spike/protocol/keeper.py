"""The keeper: one shard, in memory only, handed out only to Nexus (ADR-0021).

The keeper has two states, EMPTY and HOLDING, and two requests:

================================  ==========================================
``POST /v1/store/contribute``     Nexus or Bootstrap gives it a shard -> 200
``POST /v1/store/shard``          Nexus asks for it -> 200, or 404 when EMPTY
================================  ==========================================

A malformed, wrong-length or all-zero shard is a 400 and changes nothing; a
peer that is not Nexus (or Bootstrap, for contributions) gets a 401 before
its body is even looked at.  The keeper never talks to anyone first.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .api import (
    BAD_REQUEST,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    OK_EMPTY,
    UNAUTHORIZED,
    ApiRequest,
    ApiResponse,
)
from .errors import RemoteProtocolError
from .identity import Role, TrustDomains
from .wire import KEEPER_CONTRIBUTE_PATH, KEEPER_SHARD_PATH, ShardContribution, decode

#: The largest request body a keeper server should accept (a shard contribution is ~150 bytes).
MAX_KEEPER_BODY = 4096


class KeeperChange(Enum):
    """What a request did to the keeper, for the caller to log (never the bytes)."""

    NONE = "none"
    STORED = "stored"  # EMPTY -> HOLDING
    REPLACED = "replaced"  # HOLDING a different shard -> HOLDING


@dataclass(frozen=True, slots=True)
class KeeperOutcome:
    """The keeper's answer to one request, and what to log about it (never shard bytes)."""

    response: ApiResponse
    change: KeeperChange = KeeperChange.NONE
    refused: str | None = None  # why a request was refused, for the log


class Keeper:
    """Sans-IO keeper: feed it requests, send back what it answers.

    Not thread-safe: a server that handles requests on several threads calls
    `handle` under one lock (it never blocks, so the lock is held briefly).
    """

    def __init__(self, trust: TrustDomains) -> None:
        self._trust = trust
        self._shard: bytearray | None = None
        self._extension: tuple[int | None, int | None] = (None, None)  # (id, epoch)

    @property
    def holds_shard(self) -> bool:
        """True once a shard has been contributed (until `forget`)."""
        return self._shard is not None

    def handle(self, request: ApiRequest) -> KeeperOutcome:
        """Answer one request.  Never raises for anything the peer sent: bad input is a 4xx outcome.

        Bodies longer than `MAX_KEEPER_BODY` should be refused by the server before they get here.
        """
        if request.path not in (KEEPER_CONTRIBUTE_PATH, KEEPER_SHARD_PATH):
            return KeeperOutcome(NOT_FOUND, refused="unknown path")
        if request.method != "POST":
            return KeeperOutcome(METHOD_NOT_ALLOWED, refused="method not allowed")
        role = self._trust.role_of(request.peer)
        if request.path == KEEPER_SHARD_PATH:
            if role is not Role.NEXUS:
                return KeeperOutcome(UNAUTHORIZED, refused=f"shard read by {request.peer}")
            return KeeperOutcome(self._answer_shard())
        if role not in (Role.NEXUS, Role.BOOTSTRAP):
            return KeeperOutcome(UNAUTHORIZED, refused=f"contribution from {request.peer}")
        return self._contribute(request.body)

    def _answer_shard(self) -> ApiResponse:
        if self._shard is None:
            return NOT_FOUND
        keeper_id, epoch = self._extension
        return ApiResponse.json(ShardContribution(list(self._shard), keeper_id, epoch))

    def _contribute(self, body: bytes) -> KeeperOutcome:
        try:
            contribution = decode(body, ShardContribution)
        except RemoteProtocolError as exc:
            return KeeperOutcome(BAD_REQUEST, refused=str(exc))
        shard = contribution.shard_bytes()
        if not any(shard):
            return KeeperOutcome(BAD_REQUEST, refused="all-zero shard")
        extension = (contribution.id, contribution.epoch)
        if self._shard is not None and self._shard == shard and self._extension == extension:
            return KeeperOutcome(OK_EMPTY)
        change = KeeperChange.STORED if self._shard is None else KeeperChange.REPLACED
        self.forget()
        self._shard = bytearray(shard)
        self._extension = extension
        return KeeperOutcome(OK_EMPTY, change)

    def forget(self) -> None:
        """Overwrite and drop the shard (on shutdown, or before replacing it)."""
        if self._shard is not None:
            for i in range(len(self._shard)):
                self._shard[i] = 0
        self._shard = None
        self._extension = (None, None)
