"""Containers for key material that never show their bytes.

`repr()` of these types is redacted so that a stray log line, a traceback
or an assertion message cannot carry a key or a shard.  The root key is
kept in a `bytearray` so that it can be overwritten when Nexus lets go of
it; Python may still hold transient copies (hashing needs `bytes`), which is
as far as the language allows.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

from .errors import LocalProtocolError, ShamirError

#: Order of the NIST P-256 group: the prime field Shamir works in.
ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
KEY_SIZE = 32
SHARD_SIZE = 32
MIN_KEEPER_ID = 1
MAX_KEEPER_ID = 255
MAX_EPOCH = 2**63 - 1

_KEY_CHECK_LABEL = b"spike/v1/key-check"
_COMMITMENT_LABEL = b"spike/v1/shard-commitment"
_HKDF_SALT = b"spike/v1/hkdf-salt"


def _epoch_bytes(epoch: int) -> bytes:
    if not 0 <= epoch <= MAX_EPOCH:
        raise LocalProtocolError(f"epoch must be between 0 and {MAX_EPOCH}")
    return epoch.to_bytes(8, "big")


class RootKey:
    """A 256-bit root key: a non-zero element of the P-256 scalar field."""

    __slots__ = ("_buf",)

    def __init__(self, value: bytes | bytearray) -> None:
        if len(value) != KEY_SIZE:
            raise LocalProtocolError(f"a root key is {KEY_SIZE} bytes, not {len(value)}")
        number = int.from_bytes(value, "big")
        if not 0 < number < ORDER:
            raise LocalProtocolError("a root key must be a non-zero element of the field")
        self._buf = bytearray(value)

    @classmethod
    def generate(cls, random_bytes: Callable[[int], bytes]) -> RootKey:
        """Draw a key from `random_bytes` (e.g. `os.urandom`), rejecting out-of-field values."""
        while True:
            candidate = random_bytes(KEY_SIZE)
            if 0 < int.from_bytes(candidate, "big") < ORDER:
                return cls(candidate)

    def secret_bytes(self) -> bytes:
        """The 32 key bytes (a copy).  Secret: never log them."""
        if not any(self._buf):
            raise LocalProtocolError("this root key has been wiped")
        return bytes(self._buf)

    def as_int(self) -> int:
        """The key as a field element."""
        return int.from_bytes(self.secret_bytes(), "big")

    def wipe(self) -> None:
        """Overwrite the key bytes with zeros; the key is unusable afterwards."""
        for i in range(len(self._buf)):
            self._buf[i] = 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RootKey):
            return NotImplemented
        return hmac.compare_digest(self._buf, other._buf)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "RootKey(<redacted>)"


class Share:
    """One Shamir share: the keeper id (the x coordinate), the key epoch and 32 bytes."""

    __slots__ = ("id", "epoch", "_value")

    id: int
    epoch: int
    _value: bytes

    def __init__(self, id: int, epoch: int, value: bytes) -> None:
        if not isinstance(id, int) or not MIN_KEEPER_ID <= id <= MAX_KEEPER_ID:
            raise ShamirError(f"a share id must be between {MIN_KEEPER_ID} and {MAX_KEEPER_ID}")
        _epoch_bytes(epoch)
        if len(value) != SHARD_SIZE:
            raise ShamirError(f"a share is {SHARD_SIZE} bytes, not {len(value)}")
        if int.from_bytes(value, "big") >= ORDER:
            raise ShamirError("a share must be an element of the field")
        object.__setattr__(self, "id", id)
        object.__setattr__(self, "epoch", epoch)
        object.__setattr__(self, "_value", bytes(value))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Share is immutable")

    def secret_bytes(self) -> bytes:
        """The 32 share bytes.  Secret: never log them."""
        return self._value

    def as_int(self) -> int:
        """The share's y as a field element."""
        return int.from_bytes(self._value, "big")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Share):
            return NotImplemented
        return self.id == other.id and self.epoch == other.epoch and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash((self.id, self.epoch))

    def __repr__(self) -> str:
        return f"Share(id={self.id}, epoch={self.epoch}, value=<redacted>)"


def key_check_value(key: RootKey, epoch: int) -> bytes:
    """HMAC of a fixed label: lets Nexus recognise its key without storing it."""
    return hmac.new(key.secret_bytes(), _KEY_CHECK_LABEL + _epoch_bytes(epoch), "sha256").digest()


def shard_commitment(share: Share) -> bytes:
    """SHA-256 binding a share to its epoch and id, to verify one share on its own."""
    digest = hashlib.sha256(_COMMITMENT_LABEL)
    digest.update(_epoch_bytes(share.epoch))
    digest.update(share.id.to_bytes(1, "big"))
    digest.update(share.secret_bytes())
    return digest.digest()


def derive_key(key: RootKey, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869) from the root key, one purpose per `info` label."""
    if not 0 < length <= 255 * 32:
        raise LocalProtocolError("HKDF output length out of range")
    prk = hmac.new(_HKDF_SALT, key.secret_bytes(), "sha256").digest()
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), "sha256").digest()
        out += block
        counter += 1
    return out[:length]
