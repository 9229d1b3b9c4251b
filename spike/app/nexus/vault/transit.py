"""Vault's transit engine (encrypt and decrypt) over spike's cipher.

``transit/encrypt/<name>`` seals base64 plaintext with spike's cipher key
(AES-256-GCM, derived from the root key) and answers Vault's ciphertext form,
``vault:v<key version>:<base64 of nonce || ciphertext>``;
``transit/decrypt/<name>`` reverses it.  The key name is bound into every
ciphertext (associated data), so a ciphertext made under one name does not
decrypt under another, as with Vault's separate keys.  Who may use it is what
decides the SPIKE-style cipher: ``execute`` on ``spike/system/cipher/exec``.
Every name exists: Vault creates a key on its first encryption; here there is
nothing to create.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from cryptography.exceptions import InvalidTag

from spike.app.model.policy import SYSTEM_CIPHER, Permission
from spike.app.nexus.authorizer import Authorizer
from spike.app.nexus.cipher_api import MAX_PLAINTEXT, CipherApi
from spike.app.nexus.vault import envelope
from spike.app.nexus.vault.replies import Reply
from spike.app.nexus.vault.request import BadRequest, Operation, VaultRequest

_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
_PREFIX = re.compile(r"vault:v([0-9]+):")


def _context(name: str) -> bytes:
    return b"/transit/" + name.encode("ascii")


def _b64decode(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise _Refused(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _Refused("illegal base64 data") from None


class _Refused(Exception):
    pass


def _items(batch: Any) -> list[dict[str, Any]]:
    if not isinstance(batch, list) or not all(isinstance(item, dict) for item in batch):
        raise _Refused("batch_input must be a list of objects")
    return batch


class Transit:
    def __init__(self, cipher: CipherApi, authorizer: Authorizer) -> None:
        self._cipher = cipher
        self._authorizer = authorizer

    def handle(self, request: VaultRequest, rest: str) -> Reply:
        kind, _, name = rest.partition("/")
        if kind not in ("encrypt", "decrypt") or not name:
            return envelope.UNSUPPORTED_PATH
        if request.operation is not Operation.UPDATE:
            return envelope.UNSUPPORTED_OPERATION
        if not _NAME.fullmatch(name):
            return envelope.errors(400, "key names are 1-128 letters, digits and ._-")
        if not self._authorizer.allows(request.peer, Permission.EXECUTE, SYSTEM_CIPHER):
            return envelope.PERMISSION_DENIED
        try:
            body = request.body()
            batch = body.get("batch_input")
            one = self._encrypt if kind == "encrypt" else self._decrypt
            if batch is not None:
                return envelope.ok({"batch_results": [self._batch_item(one, name, item) for item in _items(batch)]})
            return envelope.ok(one(name, body))
        except _Refused as exc:
            return envelope.errors(400, str(exc))
        except _Sealed:
            return envelope.SEALED
        except BadRequest as exc:
            return envelope.errors(400, str(exc))

    @staticmethod
    def _batch_item(one: Any, name: str, item: dict[str, Any]) -> dict[str, Any]:
        reference = item.get("reference", "")
        try:
            result: dict[str, Any] = one(name, item)
        except _Refused as exc:
            return {"error": str(exc), "reference": reference}
        return {**result, "reference": reference}

    def _encrypt(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        if "plaintext" not in body:
            raise _Refused("missing plaintext to encrypt")
        plaintext = _b64decode(body["plaintext"], "plaintext")
        if len(plaintext) > MAX_PLAINTEXT:
            raise _Refused(f"plaintext exceeds {MAX_PLAINTEXT} bytes")
        sealed = self._cipher.seal(plaintext, _context(name))
        if sealed is None:
            raise _Sealed
        version, blob = sealed
        return {"ciphertext": f"vault:v{version}:{base64.b64encode(blob).decode('ascii')}", "key_version": version}

    def _decrypt(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        text = body.get("ciphertext")
        if not text:
            raise _Refused("missing ciphertext to decrypt")
        if not isinstance(text, str):
            raise _Refused("invalid ciphertext: no prefix")
        found = _PREFIX.match(text)
        if found is None:
            raise _Refused("invalid ciphertext: no prefix")
        blob = _b64decode(text[found.end() :], "ciphertext")
        try:
            plaintext = self._cipher.unseal(int(found.group(1)), blob, _context(name))
        except InvalidTag:
            raise _Refused("cipher: message authentication failed") from None
        if plaintext is None:
            raise _Sealed
        return {"plaintext": base64.b64encode(plaintext).decode("ascii")}


class _Sealed(Exception):
    pass
