"""Opaque list cursors: where a listing stopped, in a form that tells the caller nothing.

A list request scans a bounded number of paths; when that many paths went by
before a page filled (the caller may see few of them), the answer's cursor
must still move the listing forward without naming a path the caller may
not list.  The token is the path where the scan stopped, padded to the
longest path (its length tells nothing either) and sealed under the keyring's
data key with associated data naming the caller and the prefix: only this
caller can continue this listing with it, on any Nexus instance of the
deployment, across root and data-key rotations, until `bootstrap --force`.
Paths never start with ``!``, so a token is never mistaken for one.
"""

from __future__ import annotations

import base64
import binascii

from spike.app.model import kv
from spike.app.store.backend import SecretBackend
from spike.app.store.errors import StorageError
from spike.app.store.sealing import DataKeyGone, TamperedData
from spike.protocol.identity import SpiffeId

TOKEN_PREFIX = "!"  # noqa: S105 - not a password: what no path starts with
_PAD = kv.MAX_PATH_BYTES


class CursorError(Exception):
    """A cursor that is neither a path nor a token this caller was given."""


def _aad(caller: SpiffeId | None, prefix: str) -> bytes:
    return b"spike/v1/list-cursor\x00" + str(caller or "").encode() + b"\x00" + prefix.encode()


class ListCursors:
    def __init__(self, store: SecretBackend) -> None:
        self._store = store

    @staticmethod
    def is_token(after: str) -> bool:
        return after.startswith(TOKEN_PREFIX)

    def token(self, path: str, caller: SpiffeId | None, prefix: str) -> str:
        plain = path.encode().ljust(_PAD, b"\x00")
        sealed = self._store.seal_value(plain, _aad(caller, prefix))
        return TOKEN_PREFIX + base64.urlsafe_b64encode(sealed).decode().rstrip("=")

    def open(self, after: str, caller: SpiffeId | None, prefix: str) -> str:
        """The path to continue after: `after` itself if it is a path, the one a token stands for otherwise."""
        if not self.is_token(after):
            return after
        text = after[len(TOKEN_PREFIX) :]
        try:
            sealed = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            plain = self._store.open_value(sealed, _aad(caller, prefix))
            path = plain.rstrip(b"\x00").decode()
        except (binascii.Error, ValueError, TamperedData, DataKeyGone, StorageError):
            raise CursorError(
                "the list cursor is not one this caller was given (or the key changed): list again"
            ) from None
        return path
