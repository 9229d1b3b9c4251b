"""The key record: what Nexus stores to recognise its root key without holding it.

It carries the key epoch, the threshold, the keeper ids, a key check value
(HMAC of a label under the key) and one commitment per shard.  With it,
Nexus can tell a good shard from a bad or stale one on its own, name the
keeper that sent it, and refuse any rebuilt key that does not match.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

import msgspec

from .errors import RemoteProtocolError
from .material import MAX_EPOCH, RootKey, Share, key_check_value, shard_commitment
from .shamir import check_parameters, deal


class KeyRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything needed to verify shards and the rebuilt key, and no secret.

    Store it next to the data (``encode(record)``; read it back with
    ``decode(data, KeyRecord).validate()``).  Make one with `seal_key`.
    """

    epoch: int
    threshold: int
    keeper_ids: tuple[int, ...]
    check: bytes
    commitments: dict[int, bytes]

    @property
    def shares(self) -> int:
        """The number of shards (keepers), n."""
        return len(self.keeper_ids)

    def validate(self) -> KeyRecord:
        """Raise `RemoteProtocolError` unless the record is well formed."""
        try:
            check_parameters(self.threshold, self.keeper_ids)
        except ValueError as exc:
            raise RemoteProtocolError(f"invalid key record: {exc}") from None
        if not 0 <= self.epoch <= MAX_EPOCH:
            raise RemoteProtocolError("invalid key record: epoch out of range")
        if len(self.check) != 32:
            raise RemoteProtocolError("invalid key record: key check value is not 32 bytes")
        if set(self.commitments) != set(self.keeper_ids):
            raise RemoteProtocolError("invalid key record: commitments do not match keeper ids")
        if any(len(c) != 32 for c in self.commitments.values()):
            raise RemoteProtocolError("invalid key record: a commitment is not 32 bytes")
        return self

    def matches_key(self, key: RootKey) -> bool:
        """True if `key` is the key this record describes (constant-time comparison)."""
        return hmac.compare_digest(key_check_value(key, self.epoch), self.check)

    def matches_share(self, share: Share) -> bool:
        """True if `share` is keeper `share.id`'s shard of this epoch."""
        expected = self.commitments.get(share.id)
        if expected is None or share.epoch != self.epoch:
            return False
        return hmac.compare_digest(shard_commitment(share), expected)


def seal_key(
    key: RootKey, *, epoch: int, threshold: int, keeper_ids: Sequence[int]
) -> tuple[KeyRecord, dict[int, Share]]:
    """Deal `key` to the keepers and describe the result (the record holds no secret)."""
    shares = deal(key, epoch=epoch, threshold=threshold, ids=keeper_ids)
    record = KeyRecord(
        epoch=epoch,
        threshold=threshold,
        keeper_ids=tuple(sorted(keeper_ids)),
        check=key_check_value(key, epoch),
        commitments={i: shard_commitment(s) for i, s in shares.items()},
    )
    return record, shares
