"""The sans-IO core of spike: Shamir, keeper and Nexus custody state machines, wire formats.

Nothing in this package performs I/O, reads a clock or draws randomness by
itself: time comes in as ``now``, randomness is injected, and decisions come
out as effects.  See ``docs/embedding.md``.
"""

from .api import ApiRequest, ApiResponse
from .effects import (
    Effect,
    KeeperMisbehaved,
    KeeperReseeded,
    KeeperState,
    KeeperStateChanged,
    KeyRecovered,
    KeyRejected,
    Phase,
    PhaseChanged,
    Report,
    RequestKind,
    SendRequest,
)
from .errors import LocalProtocolError, RemoteProtocolError, ShamirError, SpikeError
from .events import Answer, RequestFailed, ResponseReceived
from .identity import InvalidSpiffeId, Role, SpiffeId, TrustDomains
from .keeper import Keeper, KeeperChange, KeeperOutcome
from .material import ORDER, RootKey, Share, derive_key, key_check_value, shard_commitment
from .nexus import (
    AlreadyInitialised,
    DuplicateShare,
    KeeperView,
    NexusCustody,
    PollSchedule,
    RandomSource,
    RestoreProgress,
    ShareRejected,
)
from .record import KeyRecord, seal_key
from .shamir import combine, deal, share_for, split_with
from .wire import (
    KEEPER_CONTRIBUTE_PATH,
    KEEPER_SHARD_PATH,
    ErrorCode,
    ShardAnswer,
    ShardContribution,
)

__all__ = [
    "KEEPER_CONTRIBUTE_PATH",
    "KEEPER_SHARD_PATH",
    "ORDER",
    "AlreadyInitialised",
    "DuplicateShare",
    "Answer",
    "ApiRequest",
    "ApiResponse",
    "Effect",
    "ErrorCode",
    "InvalidSpiffeId",
    "Keeper",
    "KeeperChange",
    "KeeperMisbehaved",
    "KeeperOutcome",
    "KeeperReseeded",
    "KeeperState",
    "KeeperStateChanged",
    "KeeperView",
    "KeyRecord",
    "KeyRecovered",
    "KeyRejected",
    "LocalProtocolError",
    "NexusCustody",
    "Phase",
    "PhaseChanged",
    "PollSchedule",
    "RandomSource",
    "RemoteProtocolError",
    "Report",
    "RequestFailed",
    "RequestKind",
    "ResponseReceived",
    "RestoreProgress",
    "Role",
    "RootKey",
    "SendRequest",
    "ShamirError",
    "Share",
    "ShareRejected",
    "ShardAnswer",
    "ShardContribution",
    "SpiffeId",
    "SpikeError",
    "TrustDomains",
    "combine",
    "deal",
    "derive_key",
    "key_check_value",
    "seal_key",
    "shard_commitment",
    "share_for",
    "split_with",
]
