"""Sealing stored values with AES-256-GCM: what they are bound to, and the format before the keyring.

Values are sealed under the data keys of the keyring (keyring.py), whose
blobs name their term.  `Sealer` is the format spike wrote before the
keyring, kept to describe (and test) what older databases hold: a key
derived from the root key, and a blob of
``version byte || 96-bit random nonce || ciphertext+tag``.  Either way,
a value's associated data names what it is (secret value, custom metadata,
policy) and where it belongs (path, version), so a row copied to another
path or version, or a flipped bit anywhere, fails authentication on read.
Random 96-bit nonces keep the collision risk negligible for far more writes
than one deployment makes under one key (NIST SP 800-38D allows 2**32).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from spike.protocol.material import RootKey, derive_key

FORMAT_V1 = 1
NONCE_SIZE = 12
DATA_KEY_INFO = b"spike/v1/data-key"


class TamperedData(Exception):
    """A sealed blob failed authentication: modified, truncated, or moved to another place."""


class DataKeyGone(Exception):
    """A value sealed under a data key that no longer exists: its root key was replaced (`bootstrap --force`).

    Not tampering, and nobody can read it any more: the API answers 409 with
    this reason, and the value can be written again (keyring.py).
    """


def _aad(kind: bytes, *parts: bytes) -> bytes:
    return b"spike/v1/" + kind + b"\x00" + b"\x00".join(parts)


def secret_aad(path: str, version: int) -> bytes:
    return _aad(b"secret", path.encode(), version.to_bytes(8, "big"))


def metadata_aad(path: str) -> bytes:
    return _aad(b"custom-metadata", path.encode())


def policy_aad(policy_id: str, name: str) -> bytes:
    return _aad(b"policy", policy_id.encode(), name.encode())


class Sealer:
    """Seals and opens blobs with one data key; thread-safe (AESGCM objects are)."""

    def __init__(self, key: RootKey, random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self._aead = AESGCM(derive_key(key, DATA_KEY_INFO))
        self._random = random_bytes

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = self._random(NONCE_SIZE)
        return bytes([FORMAT_V1]) + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        if len(blob) < 1 + NONCE_SIZE + 16 or blob[0] != FORMAT_V1:
            raise TamperedData("sealed value has an unknown format or is truncated")
        try:
            return self._aead.decrypt(blob[1 : 1 + NONCE_SIZE], blob[1 + NONCE_SIZE :], aad)
        except InvalidTag:
            raise TamperedData("sealed value failed authentication") from None
