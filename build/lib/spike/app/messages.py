"""Request and response bodies of the Nexus API (msgspec structs).

Shared by the server side (`nexus_api`) and the command-line clients, so a
field can only be renamed in one place.
"""

from __future__ import annotations

import msgspec

from spike.protocol.record import KeyRecord

STATUS_PATH = "/v1/operator/status"
BOOTSTRAP_INIT_PATH = "/v1/bootstrap/init"
BOOTSTRAP_VERIFY_PATH = "/v1/bootstrap/verify"

VERIFY_INFO = b"spike/v1/bootstrap-verify"


class KeeperStatus(msgspec.Struct, kw_only=True):
    id: int
    url: str
    state: str
    since: float  # unix time
    detail: str
    polls: int
    empty_answers: int
    failures: int
    reseeds: int
    last_poll: float | None
    latency_ms: float | None


class StatusBody(msgspec.Struct, kw_only=True):
    phase: str
    epoch: int | None
    threshold: int
    shares: int
    shards_needed: int
    redundancy: int | None
    poll_interval: float
    keepers: list[KeeperStatus]
    time: float


class InitRequest(msgspec.Struct, kw_only=True):
    record: KeyRecord
    replace: bool = False


class InitResponse(msgspec.Struct, kw_only=True):
    changed: bool
    epoch: int


class VerifyRequest(msgspec.Struct, kw_only=True):
    nonce: bytes
    ciphertext: bytes


class VerifyResponse(msgspec.Struct, kw_only=True):
    hash: str
