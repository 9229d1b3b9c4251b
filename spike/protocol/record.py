"""The key record: what Nexus stores to recognise its root key without holding it.

It carries the key epoch, the threshold, the keeper ids, a key check value
(HMAC of a label under the key) and one commitment per shard.  With it,
Nexus can tell a good shard from a bad or stale one on its own, name the
keeper that sent it, and refuse any rebuilt key that does not match.

It also knows every earlier epoch the deployment had (`history`), so that a
shard labelled with an epoch the deployment never had is recognised as
garbage rather than taken for a key this record does not know about
(docs/design.md section 7: epochs only grow, and the record knows them all).
"""

from __future__ import annotations

import bisect
import hmac
from collections.abc import Iterable, Sequence

import msgspec

from .errors import LocalProtocolError, RemoteProtocolError
from .material import MAX_EPOCH, RootKey, Share, key_check_value, shard_commitment
from .shamir import ShardDerivation, check_parameters, deal

#: The most spans of earlier epochs a record keeps (the oldest are let go beyond it).  Epochs grow
#: one at a time, so a deployment's history is one span unless its record was ever replaced with a
#: jump; the bound keeps a stored record small whatever happens.
MAX_HISTORY_SPANS = 256

EpochSpan = tuple[int, int]


class KeyRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Everything needed to verify shards and the rebuilt key, and no secret.

    Store it next to the data (``encode(record)``; read it back with
    ``decode(data, KeyRecord).validate()``).  Make one with `seal_key`; a
    record that replaces another is ``new.succeeding(old)``, which carries
    the old one's epochs into `history`.

    `history` lists every earlier epoch of the deployment as sorted,
    inclusive ``(first, last)`` spans with gaps between them.  ``None`` (the
    default, left out of the JSON) is a record with no known history, as
    records written before spike kept one: then every epoch below `epoch`
    counts as one the deployment had.

    `derivation` is how the shards of this key were derived from it
    (`ShardDerivation`); it is left out of the JSON for spike's own, so
    records written before it existed read back, and are written, unchanged.
    Every re-seed and recovery export of this key follows it, whatever the
    configuration says now: a restart never deals a keeper a shard of another
    polynomial.  (An older spike refuses a record with SPIKE's derivation, as it
    should: it would deal the wrong shards.)
    """

    epoch: int
    threshold: int
    keeper_ids: tuple[int, ...]
    check: bytes
    commitments: dict[int, bytes]
    history: tuple[EpochSpan, ...] | None = None
    derivation: ShardDerivation = ShardDerivation.HMAC

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
        if self.history is not None:
            if len(self.history) > MAX_HISTORY_SPANS:
                raise RemoteProtocolError(f"invalid key record: more than {MAX_HISTORY_SPANS} spans of history")
            below = 0  # the lowest epoch the next span may start at
            for first, last in self.history:
                if not below <= first <= last < self.epoch:
                    raise RemoteProtocolError(
                        "invalid key record: history must be sorted, separate spans of epochs below the current one"
                    )
                below = last + 2  # adjacent spans are written as one
        return self

    def earlier_epochs(self) -> tuple[EpochSpan, ...]:
        """Every epoch the deployment had before this one, as sorted inclusive spans.

        Without a recorded history, every epoch below the current one.
        """
        if self.history is not None:
            return self.history
        return ((0, self.epoch - 1),) if self.epoch > 0 else ()

    def had_epoch(self, epoch: int) -> bool:
        """True if the deployment ever had key epoch `epoch` (the current one or an earlier one)."""
        if epoch == self.epoch:
            return True
        spans = self.earlier_epochs()
        index = bisect.bisect_right(spans, epoch, key=lambda span: span[0]) - 1  # the last span starting at or below
        return index >= 0 and epoch <= spans[index][1]

    def succeeding(self, previous: KeyRecord) -> KeyRecord:
        """This record, as the one that replaces `previous`: its history is `previous`'s epochs.

        Raises `LocalProtocolError` unless this epoch is above `previous`'s: epochs only grow.
        """
        if self.epoch <= previous.epoch:
            raise LocalProtocolError(f"key epochs only grow: epoch {self.epoch} cannot replace epoch {previous.epoch}")
        spans = _merged([*previous.earlier_epochs(), (previous.epoch, previous.epoch)])
        return msgspec.structs.replace(self, history=spans[-MAX_HISTORY_SPANS:])

    def same_key(self, other: KeyRecord) -> bool:
        """True if both describe the same key, epoch and keepers (their histories may differ)."""
        return msgspec.structs.replace(self, history=None) == msgspec.structs.replace(other, history=None)

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
    key: RootKey,
    *,
    epoch: int,
    threshold: int,
    keeper_ids: Sequence[int],
    derivation: ShardDerivation = ShardDerivation.HMAC,
) -> tuple[KeyRecord, dict[int, Share]]:
    """Deal `key` to the keepers and describe the result (the record holds no secret)."""
    shares = deal(key, epoch=epoch, threshold=threshold, ids=keeper_ids, derivation=derivation)
    record = KeyRecord(
        epoch=epoch,
        threshold=threshold,
        keeper_ids=tuple(sorted(keeper_ids)),
        check=key_check_value(key, epoch),
        commitments={i: shard_commitment(s) for i, s in shares.items()},
        derivation=derivation,
    )
    return record, shares


def _merged(spans: Iterable[EpochSpan]) -> tuple[EpochSpan, ...]:
    out: list[EpochSpan] = []
    for first, last in sorted(spans):
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return tuple(out)
