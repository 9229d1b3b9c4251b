"""The sans-IO core of spike: Shamir, keeper and Nexus custody state machines, wire formats.

Nothing in this package performs I/O, reads a clock or draws randomness by
itself: time comes in as ``now``, randomness is injected, and decisions come
out as effects.  Everything listed in ``__all__`` is the public API, under
the compatibility policy of ``docs/api-policy.md``; names reached only
through submodules are internal.  ``docs/embedding.md`` is the guide:

* Nexus side: `NexusCustody` (with `PollSchedule`, a `RandomSource`, a
  `KeyRecord`) emits effects -- `SendRequest` to perform, `Report` values to
  log -- and takes answers (`ResponseReceived`, `RequestFailed` with a
  `FailureKind`).  Key rotation adds three store effects
  (`PersistRotation`, `CommitRotation`, `AbandonRotation`: `StoreEffect`)
  and a `PendingRotation` to store (docs/key-lifecycle.md).
* Keeper side: `Keeper` turns an `ApiRequest` into a `KeeperOutcome`.
* Material: `RootKey`, `Share`, `seal_key`, Shamir (`deal`, `combine`, ...).
* Identity: `SpiffeId`, `TrustDomains`, `Role`, `peer_spiffe_id`; trust per domain:
  `TrustBundles` (which CA serves which trust domain), `chain_refusal`, `TrustBundleError`.
* Wire: `ShardContribution`, `ShardAnswer`, `ShardRequest`, `ForgetRequest`,
  `encode`, `decode`, paths.
* Errors: `LocalProtocolError` (the caller's mistake), `RemoteProtocolError`
  (a peer's), both `SpikeError`.
"""

import importlib
from typing import TYPE_CHECKING

# The public names are imported on first use (PEP 562), not by this file: any
# `import spike.protocol.identity` (the CLI's client path) runs this file first, and importing every
# submodule here made `spike secret get` load the whole custody core it never uses (issue 20).
if TYPE_CHECKING:
    from .api import ApiRequest, ApiResponse
    from .effects import (
        AbandonRotation,
        CommitRotation,
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
        PersistRotation,
        Phase,
        PhaseChanged,
        Report,
        RequestKind,
        RotationProgress,
        RotationStage,
        SendRequest,
        ShardRetired,
        StoreEffect,
    )
    from .errors import LocalProtocolError, RemoteProtocolError, ShamirError, SpikeError
    from .events import Answer, FailureKind, RequestFailed, ResponseReceived
    from .identity import InvalidSpiffeId, KeeperIdentity, NexusIdentity, Role, SpiffeId, TrustDomains, peer_spiffe_id
    from .keeper import MAX_KEEPER_BODY, Keeper, KeeperChange, KeeperOutcome
    from .material import ORDER, RootKey, Share, derive_key, key_check_value, shard_commitment
    from .nexus import (
        AlreadyInitialised,
        DuplicateShare,
        KeeperView,
        NexusCustody,
        PollSchedule,
        RandomSource,
        RestoreProgress,
        RotationRefused,
        RotationView,
        ShareRejected,
        UnrecordedKeyRefused,
    )
    from .pending import PendingRotation
    from .record import KeyRecord, seal_key
    from .shamir import ShardDerivation, combine, deal, share_for, split_with
    from .trust import TrustBundleError, TrustBundles, chain_refusal
    from .wire import (
        KEEPER_CONTRIBUTE_PATH,
        KEEPER_FORGET_PATH,
        KEEPER_SHARD_PATH,
        ErrorCode,
        ForgetRequest,
        ShardAnswer,
        ShardContribution,
        ShardRequest,
        decode,
        encode,
    )

__all__ = [
    "KEEPER_CONTRIBUTE_PATH",
    "KEEPER_FORGET_PATH",
    "KEEPER_SHARD_PATH",
    "MAX_KEEPER_BODY",
    "NexusIdentity",
    "ORDER",
    "AbandonRotation",
    "AlreadyInitialised",
    "Answer",
    "ApiRequest",
    "ApiResponse",
    "CommitRotation",
    "DuplicateShare",
    "Effect",
    "ErrorCode",
    "FailureKind",
    "ForgetRequest",
    "InvalidSpiffeId",
    "Keeper",
    "KeeperChange",
    "KeeperIdentity",
    "KeeperLeft",
    "KeeperMisbehaved",
    "KeeperOutcome",
    "KeeperReseeded",
    "KeeperState",
    "KeeperStateChanged",
    "KeeperView",
    "KeyRecord",
    "KeyRecovered",
    "KeyRejected",
    "KeySource",
    "LocalProtocolError",
    "NewerKeySeen",
    "NexusCustody",
    "PendingRotation",
    "PersistRotation",
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
    "RotationProgress",
    "RotationRefused",
    "RotationStage",
    "RotationView",
    "SendRequest",
    "ShamirError",
    "ShardAnswer",
    "ShardContribution",
    "ShardDerivation",
    "ShardRequest",
    "ShardRetired",
    "Share",
    "ShareRejected",
    "SpiffeId",
    "SpikeError",
    "StoreEffect",
    "TrustBundleError",
    "TrustBundles",
    "TrustDomains",
    "UnrecordedKeyRefused",
    "chain_refusal",
    "combine",
    "deal",
    "decode",
    "derive_key",
    "encode",
    "key_check_value",
    "peer_spiffe_id",
    "seal_key",
    "shard_commitment",
    "share_for",
    "split_with",
]

_NAMES_IN = {  # submodule: its public names
    "api": "ApiRequest ApiResponse",
    "effects": (
        "AbandonRotation CommitRotation Effect KeeperLeft KeeperMisbehaved KeeperReseeded KeeperState "
        "KeeperStateChanged KeyRecovered KeyRejected KeySource NewerKeySeen PersistRotation Phase PhaseChanged Report "
        "RequestKind RotationProgress RotationStage SendRequest ShardRetired StoreEffect"
    ),
    "errors": "LocalProtocolError RemoteProtocolError ShamirError SpikeError",
    "events": "Answer FailureKind RequestFailed ResponseReceived",
    "identity": "InvalidSpiffeId KeeperIdentity NexusIdentity Role SpiffeId TrustDomains peer_spiffe_id",
    "keeper": "MAX_KEEPER_BODY Keeper KeeperChange KeeperOutcome",
    "material": "ORDER RootKey Share derive_key key_check_value shard_commitment",
    "nexus": (
        "AlreadyInitialised DuplicateShare KeeperView NexusCustody PollSchedule RandomSource RestoreProgress "
        "RotationRefused RotationView ShareRejected UnrecordedKeyRefused"
    ),
    "pending": "PendingRotation",
    "record": "KeyRecord seal_key",
    "shamir": "ShardDerivation combine deal share_for split_with",
    "trust": "TrustBundleError TrustBundles chain_refusal",
    "wire": (
        "KEEPER_CONTRIBUTE_PATH KEEPER_FORGET_PATH KEEPER_SHARD_PATH ErrorCode ForgetRequest ShardAnswer "
        "ShardContribution ShardRequest decode encode"
    ),
}
_SUBMODULE_OF = {name: module for module, names in _NAMES_IN.items() for name in names.split()}

if not TYPE_CHECKING:  # hidden from mypy, so that a misspelt name stays an error there rather than Any

    def __getattr__(name: str) -> object:
        module = _SUBMODULE_OF.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value  # the next look-up finds it without this function
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})
