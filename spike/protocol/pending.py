"""The pending rotation: what the store holds while the root key moves from epoch e to a new epoch.

It carries the new key record, the epoch and key check value it starts
from, and each key wrapped under the other: the new key under the old, the
old key under the new.  So a Nexus that rebuilds *either* key from the
keepers after a restart holds both, and resumes dealing the same new key
(docs/key-lifecycle.md sections 4 and 5).  Nothing in it is secret in clear:
store it next to the data, like the record.

A wrap is the key XOR an HKDF-SHA256 pad derived from the other key, bound
to both epochs and to the wrapped key's own check value, so no pad is ever
used twice; an opened key is used only if it matches its check value, so a
damaged or foreign pending rotation is refused, never used.
"""

from __future__ import annotations

import hmac

import msgspec

from .errors import RemoteProtocolError
from .material import KEY_SIZE, MAX_EPOCH, ORDER, RootKey, derive_key, key_check_value
from .record import KeyRecord

_NEW_KEY_LABEL = b"spike/v1/rotation-new-key"
_OLD_KEY_LABEL = b"spike/v1/rotation-old-key"


def _pad(under: RootKey, label: bytes, from_epoch: int, to_epoch: int, check: bytes) -> bytes:
    info = label + from_epoch.to_bytes(8, "big") + to_epoch.to_bytes(8, "big") + check
    return derive_key(under, info, KEY_SIZE)


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


class PendingRotation(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A rotation stored but not committed: the new record, where it starts from, both keys wrapped.

    Make one with `NexusCustody.start_rotation` (or `PendingRotation.seal`);
    store it with ``encode(pending)`` and read it back with
    ``decode(data, PendingRotation).validate()``.  `record` is the new key
    record (its history includes `from_epoch`); `from_check` is the key
    check value of the record it replaces.
    """

    record: KeyRecord
    from_epoch: int
    from_check: bytes
    new_key: bytes  # the new key, wrapped under the old one
    old_key: bytes  # the old key, wrapped under the new one

    def __repr__(self) -> str:
        return (
            f"PendingRotation(epoch {self.from_epoch} -> {self.record.epoch}, keepers={list(self.record.keeper_ids)})"
        )

    @classmethod
    def seal(cls, old_key: RootKey, old_record: KeyRecord, new_key: RootKey, new_record: KeyRecord) -> PendingRotation:
        """The pending rotation from `old_record` (key `old_key`) to `new_record` (key `new_key`).

        Raises `LocalProtocolError` (from `KeyRecord.succeeding`) unless the
        new epoch is above the old one; the new record gets the old one's
        epochs as its history.
        """
        record = new_record.succeeding(old_record)
        e, f = old_record.epoch, record.epoch
        wrapped_new = _xor(new_key.secret_bytes(), _pad(old_key, _NEW_KEY_LABEL, e, f, record.check))
        wrapped_old = _xor(old_key.secret_bytes(), _pad(new_key, _OLD_KEY_LABEL, e, f, old_record.check))
        return cls(record, e, old_record.check, wrapped_new, wrapped_old)

    def validate(self) -> PendingRotation:
        """Raise `RemoteProtocolError` unless it is well formed."""
        self.record.validate()
        if not 0 <= self.from_epoch < self.record.epoch <= MAX_EPOCH:
            raise RemoteProtocolError("invalid pending rotation: the new epoch must be above the one it starts from")
        if not self.record.had_epoch(self.from_epoch):
            raise RemoteProtocolError("invalid pending rotation: the new record's history lacks the epoch it replaces")
        if len(self.from_check) != 32 or len(self.new_key) != KEY_SIZE or len(self.old_key) != KEY_SIZE:
            raise RemoteProtocolError("invalid pending rotation: a check value or wrapped key has the wrong length")
        return self

    def starts_from(self, record: KeyRecord) -> bool:
        """True if this rotation replaces `record` (same epoch and key check value)."""
        return self.from_epoch == record.epoch and hmac.compare_digest(self.from_check, record.check)

    def open_new(self, old_key: RootKey) -> RootKey:
        """The new key, opened with the old one.  Raises `RemoteProtocolError` if it does not open."""
        pad = _pad(old_key, _NEW_KEY_LABEL, self.from_epoch, self.record.epoch, self.record.check)
        return self._opened(_xor(self.new_key, pad), self.record.epoch, self.record.check)

    def open_old(self, new_key: RootKey) -> RootKey:
        """The old key, opened with the new one.  Raises `RemoteProtocolError` if it does not open."""
        pad = _pad(new_key, _OLD_KEY_LABEL, self.from_epoch, self.record.epoch, self.from_check)
        return self._opened(_xor(self.old_key, pad), self.from_epoch, self.from_check)

    @staticmethod
    def _opened(raw: bytes, epoch: int, check: bytes) -> RootKey:
        if 0 < int.from_bytes(raw, "big") < ORDER:
            key = RootKey(raw)
            if hmac.compare_digest(key_check_value(key, epoch), check):
                return key
            key.wipe()
        raise RemoteProtocolError(f"the pending rotation's key of epoch {epoch} does not open with this key")
