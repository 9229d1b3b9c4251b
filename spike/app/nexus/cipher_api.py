"""Encryption as a service: AES-256-GCM under the keyring's cipher key.

The key is the one spike always derived from the root key, kept in the
keyring (spike/app/store/keyring.py) since: a root key rotation leaves it
as it is, so ciphertexts handed out before a rotation still decrypt.

As in SPIKE, two forms: JSON with base64 fields, or raw bytes
(``application/octet-stream``) where the ciphertext is
``version byte || 12-byte nonce || ciphertext+tag``.  Callers never see the
key, and plaintexts are limited to `MAX_PLAINTEXT` bytes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from spike.app.api.messages import (
    CIPHER_MAX_OVERHEAD,
    CIPHER_MAX_PLAINTEXT,
    CIPHER_NONCE_SIZE,
    CipherDecryptRequest,
    CipherDecryptResponse,
    CipherEncryptRequest,
    CipherEncryptResponse,
)
from spike.app.nexus import refusals
from spike.app.store.errors import StorageError
from spike.protocol.api import ApiRequest, ApiResponse
from spike.protocol.errors import RemoteProtocolError
from spike.protocol.wire import ErrorCode, decode

log = logging.getLogger("spike.nexus.cipher")

CIPHER_AAD = b"spike/v1/cipher"
VERSION = 1
NONCE_SIZE = CIPHER_NONCE_SIZE
MAX_PLAINTEXT = CIPHER_MAX_PLAINTEXT
MAX_OVERHEAD = CIPHER_MAX_OVERHEAD
OCTET_STREAM = "application/octet-stream"
ALGORITHMS = ("", "AES-GCM", "aes-256-gcm")
# The cipher key is taken up at first use: until the keyring can be read (no root key yet, or no database).
NOT_READY = ApiResponse.error(503, ErrorCode.NOT_READY, "its cipher key cannot be read yet (see `spike status`)")


class CipherApi:
    def __init__(self, random_bytes: Callable[[int], bytes] = os.urandom, *, max_ciphertext: int | None = None) -> None:
        self._aead: AESGCM | None = None
        self._key_source: Callable[[], bytes] | None = None
        self._random = random_bytes
        # SPIKE_NEXUS_CRYPTO_MAX_CIPHERTEXT_SIZE: SPIKE's limit on AES-GCM ciphertext (tag included);
        # its plaintext limit is 16 bytes (the tag) less.  None: spike's own 1 MiB of plaintext.
        self._max_plaintext = MAX_PLAINTEXT if max_ciphertext is None else max_ciphertext - 16

    def unlock(self, key_source: Callable[[], bytes]) -> None:
        """Encrypt and decrypt with the key `key_source()` gives (the keyring's cipher key), from the first use:
        a store whose keyring cannot be read yet answers 503 until it can."""
        self._aead, self._key_source = None, key_source

    def lock(self) -> None:
        self._aead, self._key_source = None, None

    def _key(self) -> AESGCM | None:
        aead, source = self._aead, self._key_source
        if aead is None and source is not None:
            try:
                aead = AESGCM(source())
            except StorageError as exc:
                log.warning("the cipher key is not available yet: %s", exc)
                return None
            if self._key_source is source:
                self._aead = aead
        return aead

    def seal(self, plaintext: bytes, context: bytes) -> tuple[int, bytes] | None:
        """(key version, nonce || ciphertext) of `plaintext` with `context` bound in; None while locked.

        For the other faces of the cipher (Vault's transit): `context` keeps what they seal
        apart from this API's ciphertexts and from each other's (a transit key name).
        """
        aead = self._key()
        if aead is None:
            return None
        nonce = self._random(NONCE_SIZE)
        return VERSION, nonce + aead.encrypt(nonce, plaintext, CIPHER_AAD + context)

    def unseal(self, version: int, sealed: bytes, context: bytes) -> bytes | None:
        """What `seal` sealed with the same `context`; None while locked, `InvalidTag` for anything else."""
        aead = self._key()
        if aead is None:
            return None
        if version != VERSION or len(sealed) < NONCE_SIZE:
            raise InvalidTag
        return aead.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], CIPHER_AAD + context)

    def encrypt(self, request: ApiRequest) -> ApiResponse:
        aead = self._key()
        if aead is None:
            return NOT_READY
        stream = request.content_type == OCTET_STREAM
        if stream:
            plaintext = request.body
        else:
            try:
                body = decode(request.body, CipherEncryptRequest)
            except RemoteProtocolError as exc:
                log.info("encrypt: %s", exc)
                return refusals.bad_request(str(exc))
            if body.algorithm not in ALGORITHMS:
                log.info("encrypt: unsupported algorithm")
                return refusals.bad_request("unsupported algorithm: AES-GCM is the only one")
            plaintext = body.plaintext
        if len(plaintext) > self._max_plaintext:
            log.info("encrypt: plaintext of %d bytes exceeds %d", len(plaintext), self._max_plaintext)
            return refusals.bad_request(f"the plaintext is longer than {self._max_plaintext} bytes")
        nonce = self._random(NONCE_SIZE)
        ciphertext = aead.encrypt(nonce, plaintext, CIPHER_AAD)
        if stream:
            return ApiResponse(200, bytes([VERSION]) + nonce + ciphertext, OCTET_STREAM)
        return ApiResponse.json(CipherEncryptResponse(version=VERSION, nonce=nonce, ciphertext=ciphertext))

    def decrypt(self, request: ApiRequest) -> ApiResponse:
        aead = self._key()
        if aead is None:
            return NOT_READY
        stream = request.content_type == OCTET_STREAM
        if stream:
            blob = request.body
            version, nonce, ciphertext = (blob[0] if blob else -1), blob[1 : 1 + NONCE_SIZE], blob[1 + NONCE_SIZE :]
        else:
            try:
                body = decode(request.body, CipherDecryptRequest)
            except RemoteProtocolError as exc:
                log.info("decrypt: %s", exc)
                return refusals.bad_request(str(exc))
            version, nonce, ciphertext = body.version, body.nonce, body.ciphertext
        if version != VERSION or len(nonce) != NONCE_SIZE:
            log.info("decrypt: unknown version or malformed nonce")
            return refusals.bad_request(
                "not a ciphertext of `spike cipher encrypt`: unknown version byte, or too short"
            )
        if len(ciphertext) > self._max_plaintext + 16:
            log.info("decrypt: ciphertext of %d bytes exceeds %d", len(ciphertext), self._max_plaintext + 16)
            return refusals.bad_request(f"the ciphertext is longer than {self._max_plaintext + 16} bytes")
        try:
            plaintext = aead.decrypt(nonce, ciphertext, CIPHER_AAD)
        except InvalidTag:
            log.info("decrypt: ciphertext failed authentication")
            return refusals.bad_request(
                "the ciphertext does not open under this Nexus's cipher key: damaged, or sealed by another deployment"
            )
        if stream:
            return ApiResponse(200, plaintext, OCTET_STREAM)
        return ApiResponse.json(CipherDecryptResponse(plaintext=plaintext))
