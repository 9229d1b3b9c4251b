"""The keyring on its own (spike/app/store/keyring.py): terms, what a sealed value names, the wrapped keyring."""

from __future__ import annotations

import pytest
from store_helpers import OTHER_KEY, ROOT_KEY

from spike.app.store.errors import StorageError
from spike.app.store.keyring import (
    FORMAT_V2,
    LEGACY_TERM,
    Keyring,
    NewerTerm,
    Term,
    term_of,
    wrapped_header,
)
from spike.app.store.sealing import NONCE_SIZE, DataKeyGone, Sealer, TamperedData, secret_aad

AAD = secret_aad("app/db", 1)


def test_a_value_is_sealed_under_the_newest_term_which_it_names_and_is_bound_to() -> None:
    keyring = Keyring.create(ROOT_KEY, term=1, legacy_epoch=None, now=0.0)
    sealed = keyring.seal(b"plain", AAD)
    assert sealed[0] == FORMAT_V2 and term_of(sealed) == 1 == keyring.active
    assert keyring.open(sealed, AAD) == b"plain"
    newer = keyring.with_term(2, 1.0)
    assert newer.active == 2 and newer.first == 1
    again = newer.seal(b"plain", AAD)
    assert term_of(again) == 2
    assert newer.open(sealed, AAD) == newer.open(again, AAD) == b"plain"  # older terms stay readable
    # The term is part of what is authenticated: relabelled to another term that exists, it fails.
    relabelled = sealed[:1] + (2).to_bytes(4, "big") + sealed[5:]
    with pytest.raises(TamperedData, match="failed authentication"):
        newer.open(relabelled, AAD)
    with pytest.raises(TamperedData):
        newer.open(again, secret_aad("app/db", 2))  # bound to its place, as before the keyring


def test_an_older_term_than_any_held_is_gone_a_newer_one_is_not_seen_yet_a_gap_is_tampering() -> None:
    old = Keyring.create(ROOT_KEY, term=1, legacy_epoch=None, now=0.0).with_term(2, 0.0)
    forced = Keyring.create(OTHER_KEY, term=3, legacy_epoch=None, now=0.0).with_term(5, 0.0)
    with pytest.raises(DataKeyGone, match="term 2, which no longer exists"):
        forced.open(old.seal(b"x", AAD), AAD)
    with pytest.raises(NewerTerm):
        old.open(forced.seal(b"x", AAD), AAD)
    gap = forced.seal(b"x", AAD)
    with pytest.raises(TamperedData, match="term 4, which this database never had"):
        forced.open(gap[:1] + (4).to_bytes(4, "big") + gap[5:], AAD)


def test_values_sealed_before_the_keyring_open_with_the_legacy_term_and_only_with_it() -> None:
    legacy = Sealer(ROOT_KEY).seal(b"old value", AAD)
    assert term_of(legacy) == LEGACY_TERM
    keyring = Keyring.create(ROOT_KEY, term=1, legacy_epoch=7, now=0.0)
    assert keyring.legacy_epoch == 7 and [t.term for t in keyring.terms] == [LEGACY_TERM, 1]
    assert keyring.open(legacy, AAD) == b"old value"
    assert term_of(keyring.seal(b"new", AAD)) == 1  # new values are never sealed the old way
    with pytest.raises(DataKeyGone):
        Keyring.create(ROOT_KEY, term=1, legacy_epoch=None, now=0.0).open(legacy, AAD)
    with pytest.raises(TamperedData):
        Keyring.create(OTHER_KEY, term=1, legacy_epoch=7, now=0.0).open(legacy, AAD)


def test_the_keyring_is_wrapped_under_the_root_key_of_one_epoch() -> None:
    keyring = Keyring.create(ROOT_KEY, term=1, legacy_epoch=3, now=0.0).with_term(4, 1.0)
    blob = keyring.wrap(ROOT_KEY, 3)
    assert wrapped_header(blob) == (3, 4)
    opened = Keyring.unwrap(blob, ROOT_KEY, 3)
    assert [t.term for t in opened.terms] == [0, 1, 4] and opened.cipher_key == keyring.cipher_key
    assert opened.open(keyring.seal(b"v", AAD), AAD) == b"v"
    rewrapped = opened.wrap(OTHER_KEY, 4)  # a root key rotation: the same keys under the new root key
    assert Keyring.unwrap(rewrapped, OTHER_KEY, 4).terms == keyring.terms
    for key, epoch, match in ((OTHER_KEY, 3, "does not open"), (ROOT_KEY, 4, "of epoch 3, not 4")):
        with pytest.raises(StorageError, match=match):
            Keyring.unwrap(blob, key, epoch)
    # The clear header is authenticated: another epoch or newest term written into it fails.
    for offset in (8, 12, 13 + NONCE_SIZE, len(blob) - 1):
        damaged = bytearray(blob)
        damaged[offset] ^= 1
        with pytest.raises(StorageError):
            Keyring.unwrap(bytes(damaged), ROOT_KEY, 3)
    with pytest.raises(StorageError, match="not a wrapped keyring"):
        Keyring.unwrap(blob[:20], ROOT_KEY, 3)


def test_nothing_secret_in_a_repr_and_a_malformed_keyring_is_refused() -> None:
    keyring = Keyring.create(ROOT_KEY, term=1, legacy_epoch=2, now=0.0)
    for text in (repr(keyring), repr(keyring.terms)):
        assert keyring.terms[1].key.hex() not in text and "key=" not in text
    with pytest.raises(ValueError, match="terms are distinct"):
        Keyring([Term(1, bytes(32), 0.0), Term(1, bytes(32), 0.0)], bytes(32))
    with pytest.raises(ValueError, match="only the legacy term"):
        Keyring([Term(1, bytes(32), 0.0, legacy_epoch=1)], bytes(32))
    with pytest.raises(ValueError, match="not above the newest"):
        keyring.with_term(1, 0.0)


def test_the_cipher_key_is_the_one_derived_from_the_root_key_the_keyring_was_made_with() -> None:
    """Ciphertexts handed out by encryption as a service before the keyring still decrypt."""
    from spike.app.store.keyring import CIPHER_KEY_INFO
    from spike.protocol.material import derive_key

    keyring = Keyring.create(ROOT_KEY, term=1, legacy_epoch=None, now=0.0)
    assert keyring.cipher_key == derive_key(ROOT_KEY, CIPHER_KEY_INFO)
    assert Keyring.unwrap(keyring.wrap(OTHER_KEY, 2), OTHER_KEY, 2).cipher_key == keyring.cipher_key


def test_sealing_uses_a_fresh_nonce() -> None:
    keyring = Keyring.create(ROOT_KEY, term=1, legacy_epoch=None, now=0.0)
    first, second = keyring.seal(b"same", AAD), keyring.seal(b"same", AAD)
    assert first[5 : 5 + NONCE_SIZE] != second[5 : 5 + NONCE_SIZE]
