"""The keyring: data-encryption keys in terms, wrapped under the root key, as Vault keeps them.

Every stored value (secret versions, custom metadata, policy bodies, list
cursors) is sealed with AES-256-GCM under a random data key, a **term**, and
the sealed blob says which term:

    2 || term (4 bytes, big endian) || 96-bit random nonce || ciphertext+tag

and its associated data is those first five bytes followed by what the value
is and where it belongs (sealing.py), so a blob moved to another place, or
relabelled with another term, fails authentication.  New values are sealed
under the newest term (`active`); older terms stay readable.  Term numbers
grow and are never reused in one database, `bootstrap --force` included
(key_state.py keeps the highest one in clear).

Values sealed by spike before the keyring (format byte 1, sealed under
HKDF(root key, "spike/v1/data-key")) are opened with the **legacy term**
(number 0): that derived key, taken into the keyring the first time a
database written before it is unlocked, so they stay readable after the
root key changes.

The keyring also holds the key of encryption as a service (cipher_api.py):
taken, the same way, from the root key it was first made with, so a
ciphertext handed out before a root key rotation still decrypts after it.

The keyring is stored wrapped under a key derived from the root key of the
epoch in force (HKDF-SHA256, bound to the epoch), with AES-256-GCM whose
associated data names the epoch and the newest term:

    2 || epoch (8 bytes) || newest term (4 bytes) || nonce || ciphertext+tag

A root key rotation wraps the same keyring under the new key (`wrap`): no
stored value is sealed again, whatever their number.

A value whose term the keyring does not hold because it is older than every
term it holds was sealed under a key that no longer exists (`bootstrap
--force` replaced the root key, and the old keyring with it): `DataKeyGone`,
which is not tampering.  A term newer than every term held is another
instance's data-key rotation this keyring has not seen yet (`NewerTerm`:
read the keyring again).  A blob that fails authentication under a term that
is held is `TamperedData`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable
from typing import NoReturn

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from spike.app.store.errors import StorageError
from spike.app.store.sealing import DATA_KEY_INFO, FORMAT_V1, NONCE_SIZE, DataKeyGone, TamperedData
from spike.protocol.material import MAX_EPOCH, RootKey, derive_key

FORMAT_V2 = 2  # a value sealed under a term
KEYRING_FORMAT = 2  # a wrapped keyring
LEGACY_TERM = 0
MAX_TERM = 2**32 - 1
KEY_SIZE = 32
CIPHER_KEY_INFO = b"spike/v1/cipher-key"  # what the cipher key was derived with before the keyring

_KEK_INFO = b"spike/v2/keyring-key"
_KEYRING_AAD = b"spike/v2/keyring\x00"
_SEALED = struct.Struct(">BI")  # format, term
_WRAPPED = struct.Struct(">BQI")  # format, epoch, newest term
_SEALED_SIZE = _SEALED.size
_NONCE_END = _SEALED_SIZE + NONCE_SIZE
_TAG = 16


class NewerTerm(Exception):
    """A value sealed under a term newer than this keyring's: another instance rotated the data key."""


class Term(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One data key: its number, the key, when it was made; the legacy term also names its root key's epoch."""

    term: int
    key: bytes
    created: float
    legacy_epoch: int | None = None

    def __repr__(self) -> str:
        return f"Term({self.term}, created={self.created}, legacy_epoch={self.legacy_epoch})"


class _Body(msgspec.Struct, forbid_unknown_fields=True):
    terms: list[Term]
    cipher_key: bytes


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Body)


def term_of(blob: bytes) -> int:
    """The term a sealed value names (`LEGACY_TERM` for the format before the keyring); `TamperedData` if neither."""
    if len(blob) >= 1 + NONCE_SIZE + _TAG and blob[0] == FORMAT_V1:
        return LEGACY_TERM
    if len(blob) >= _SEALED.size + NONCE_SIZE + _TAG and blob[0] == FORMAT_V2:
        return int(_SEALED.unpack_from(blob)[1])
    raise TamperedData("sealed value has an unknown format or is truncated")


def wrapped_header(blob: bytes) -> tuple[int, int]:
    """(root key epoch, newest term) of a wrapped keyring, read from its clear header; `ValueError` if it is none."""
    if len(blob) < _WRAPPED.size + NONCE_SIZE + _TAG or blob[0] != KEYRING_FORMAT:
        raise ValueError("not a wrapped keyring")
    _, epoch, newest = _WRAPPED.unpack_from(blob)
    return int(epoch), int(newest)


def _kek(root_key: RootKey, epoch: int) -> AESGCM:
    if not 0 <= epoch <= MAX_EPOCH:
        raise ValueError(f"epoch {epoch} out of range")
    return AESGCM(derive_key(root_key, _KEK_INFO + epoch.to_bytes(8, "big")))


class Keyring:
    """The data keys of one database, in terms; seals under the newest, opens under any.  Thread-safe, immutable."""

    def __init__(self, terms: Iterable[Term], cipher_key: bytes, random_bytes: Callable[[int], bytes] = os.urandom):
        held = sorted(terms, key=lambda t: t.term)
        if not held or len(cipher_key) != KEY_SIZE:
            raise ValueError("a keyring holds at least one term and a cipher key")
        if len({t.term for t in held}) != len(held) or any(len(t.key) != KEY_SIZE for t in held):
            raise ValueError("a keyring's terms are distinct 32-byte keys")
        if held[0].term < 0 or held[-1].term > MAX_TERM:
            raise ValueError("term out of range")
        if any(t.legacy_epoch is not None for t in held if t.term != LEGACY_TERM) or (
            held[0].term == LEGACY_TERM and held[0].legacy_epoch is None
        ):
            raise ValueError("only the legacy term, 0, names a root key epoch")
        self._terms = tuple(held)
        self._aeads = {t.term: AESGCM(t.key) for t in held}
        # A sealed value's header (format, term) -> (term, its key): opening one is a single lookup.
        self._by_header = {
            _SEALED.pack(FORMAT_V2, t.term): (t.term, aead)
            for t, aead in zip(held, self._aeads.values(), strict=True)
            if t.term != LEGACY_TERM
        }
        self._cipher_key = cipher_key
        self._random = random_bytes
        self.active = held[-1].term  # new values are sealed under the newest term
        self.first = held[0].term
        self._header = _SEALED.pack(FORMAT_V2, self.active)
        self._active_aead = self._aeads[self.active]

    def __repr__(self) -> str:
        return f"Keyring(terms={[t.term for t in self._terms]}, active={self.active})"

    @classmethod
    def create(
        cls,
        root_key: RootKey,
        *,
        term: int,
        legacy_epoch: int | None,
        now: float,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> Keyring:
        """A new keyring with one random term, `term`, under root key `root_key`.

        With `legacy_epoch` (a database written before the keyring, whose record
        is of that epoch: `root_key` is that epoch's), it also holds the legacy
        term, the data key values were sealed under before.  The cipher key is
        derived from `root_key` as it was before the keyring.
        """
        terms = [Term(term, random_bytes(KEY_SIZE), now)]
        if legacy_epoch is not None:
            terms.append(Term(LEGACY_TERM, derive_key(root_key, DATA_KEY_INFO), now, legacy_epoch))
        return cls(terms, derive_key(root_key, CIPHER_KEY_INFO), random_bytes)

    @property
    def terms(self) -> tuple[Term, ...]:
        """Every term held, oldest first (secret: the keys are in them)."""
        return self._terms

    @property
    def legacy_epoch(self) -> int | None:
        """The root key epoch of the legacy term, or None without one."""
        return self._terms[0].legacy_epoch

    @property
    def cipher_key(self) -> bytes:
        return self._cipher_key

    def with_term(self, term: int, now: float) -> Keyring:
        """This keyring and a new random term, `term` (above every term ever used), for new values."""
        if term <= self.active:
            raise ValueError(f"term {term} is not above the newest, {self.active}")
        return Keyring((*self._terms, Term(term, self._random(KEY_SIZE), now)), self._cipher_key, self._random)

    # ------------------------------------------------------------------ values

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """`plaintext` sealed under the newest term, with `aad` (what it is and where it belongs)."""
        nonce = self._random(NONCE_SIZE)
        header = self._header
        return header + nonce + self._active_aead.encrypt(nonce, plaintext, header + aad)

    def open(self, blob: bytes, aad: bytes, label: int | None = None) -> bytes:
        """The plaintext of a sealed value; with `label`, the term its row says it is under.

        `TamperedData` if it fails authentication, has no known format, or is
        not under `label`; `DataKeyGone` if its term is older than every term
        held (or it is a legacy value and the legacy term is gone), `NewerTerm`
        if its term is newer than every term held.
        """
        header = blob[:_SEALED_SIZE]
        held = self._by_header.get(header)  # the common case: a term held, in one lookup
        if held is not None and len(blob) >= _NONCE_END + _TAG:
            term, aead = held
            nonce, body, associated = blob[_SEALED_SIZE:_NONCE_END], blob[_NONCE_END:], header + aad
        else:
            term = term_of(blob)
            found = self._aeads.get(term)
            if found is None:
                self._missing(term)
            aead = found
            nonce, body, associated = blob[1 : 1 + NONCE_SIZE], blob[1 + NONCE_SIZE :], aad  # the legacy format
        if label is not None and label != term:
            raise TamperedData(f"labelled with data-key term {label}, but sealed under term {term}")
        try:
            return aead.decrypt(nonce, body, associated)
        except InvalidTag:
            raise TamperedData("sealed value failed authentication") from None

    def _missing(self, term: int) -> NoReturn:
        if term == LEGACY_TERM or term < self.first:
            raise DataKeyGone(
                f"sealed under data-key term {term}, which no longer exists: the root key it belonged to "
                "was replaced (bootstrap --force)"
            )
        if term > self.active:
            raise NewerTerm(f"sealed under data-key term {term}, newer than this keyring's {self.active}")
        raise TamperedData(f"sealed value names data-key term {term}, which this database never had")

    # ------------------------------------------------------------------ stored wrapped

    def wrap(self, root_key: RootKey, epoch: int) -> bytes:
        """This keyring wrapped under root key `root_key` of epoch `epoch`, as the store keeps it."""
        header = _WRAPPED.pack(KEYRING_FORMAT, epoch, self.active)
        nonce = self._random(NONCE_SIZE)
        body = _encoder.encode(_Body(list(self._terms), self._cipher_key))
        return header + nonce + _kek(root_key, epoch).encrypt(nonce, body, _KEYRING_AAD + header)

    @classmethod
    def unwrap(
        cls, blob: bytes, root_key: RootKey, epoch: int, random_bytes: Callable[[int], bytes] = os.urandom
    ) -> Keyring:
        """The keyring in `blob`, wrapped under `root_key` of `epoch`; `StorageError` if it is not, or is damaged."""
        try:
            stored_epoch, newest = wrapped_header(blob)
        except ValueError:
            raise StorageError("the stored keyring is damaged: not a wrapped keyring") from None
        if stored_epoch != epoch:
            raise StorageError(f"the stored keyring is wrapped under the root key of epoch {stored_epoch}, not {epoch}")
        header = blob[: _WRAPPED.size]
        nonce = blob[_WRAPPED.size : _WRAPPED.size + NONCE_SIZE]
        try:
            plain = _kek(root_key, epoch).decrypt(nonce, blob[_WRAPPED.size + NONCE_SIZE :], _KEYRING_AAD + header)
        except InvalidTag:
            raise StorageError(
                f"the stored keyring does not open with the root key of epoch {epoch} (damaged, or another key)"
            ) from None
        try:
            body = _decoder.decode(plain)
            keyring = cls(body.terms, body.cipher_key, random_bytes)
        except (msgspec.DecodeError, ValueError) as exc:
            raise StorageError(f"the stored keyring cannot be read: {exc}") from None
        if keyring.active != newest:
            raise StorageError("the stored keyring is damaged: its header and its terms disagree")
        return keyring
