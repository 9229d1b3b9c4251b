"""Sealed values refuse to be read when the database has been tampered with.

Every stored value is AES-256-GCM with associated data naming its path and
version, so the tests below play an attacker with write access to the file
(through sqlite3, and once with raw bytes): flip a bit anywhere in a sealed
value, truncate it, copy a row to another path or version, swap two values,
relabel its key epoch, move custom metadata.  Each read must raise
`TamperedData`; through the API it is a bare 500 `api_internal_error` and one
error line in the log naming what was refused, and the value itself appears
nowhere: not in the answer, not in the log.
"""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec
import pytest
from store_helpers import OTHER_KEY, ROOT_KEY, WAIT, open_store, raw_db

from spike.app.api.messages import SECRETS_METADATA_PATH, SECRETS_PATH
from spike.app.nexus.authorizer import Authorizer
from spike.app.nexus.secrets_api import SecretsApi
from spike.app.store.errors import StorageError
from spike.app.store.sealing import FORMAT_V1, NONCE_SIZE, Sealer, TamperedData, secret_aad
from spike.app.store.sqlite import SecretStore
from spike.app.store.sqlite_schema import DB_NAME
from spike.protocol.api import ApiRequest, ApiResponse
from spike.protocol.identity import Role, TrustDomains
from spike.protocol.record import seal_key

VALUE = "s3cr3t-VALUE-do-not-leak"
OTHER = "another-VALUE-do-not-leak"


@pytest.fixture
def filled(store: SecretStore) -> SecretStore:
    store.put("app/db", {"password": VALUE}, None).result(WAIT)
    store.put("app/db", {"password": VALUE + "-2"}, None).result(WAIT)
    store.put("app/other", {"password": OTHER}, None).result(WAIT)
    return store


def sealed_of(data_dir: Path, path: str, version: int) -> bytes:
    with raw_db(data_dir) as db:
        (blob,) = db.execute(
            "SELECT sealed FROM secret_version WHERE path = ? AND version = ?", (path, version)
        ).fetchone()
    return bytes(blob)


def set_sealed(data_dir: Path, path: str, version: int, blob: bytes) -> None:
    with raw_db(data_dir) as db:
        changed = db.execute(
            "UPDATE secret_version SET sealed = ? WHERE path = ? AND version = ?", (blob, path, version)
        ).rowcount
    assert changed == 1


TRUST = TrustDomains.single("spike.test")


def api_get(store: SecretStore, path: str, version: int = 0, *, metadata: bool = False) -> ApiResponse:
    api = SecretsApi(store, Authorizer(TRUST))
    handler, _ = (api.metadata_handlers() if metadata else api.handlers())["get"]
    request = ApiRequest(
        "POST",
        SECRETS_METADATA_PATH if metadata else SECRETS_PATH,
        TRUST.id_of(Role.PILOT_SUPERUSER),
        msgspec.json.encode({"path": path, "version": version}),
        "action=get",
    )
    reply = handler(request)
    assert isinstance(reply, ApiResponse)  # reads answer inline
    return reply


def assert_refused(
    store: SecretStore, caplog: pytest.LogCaptureFixture, path: str, version: int = 0, *, metadata: bool = False
) -> None:
    """The store raises; the API answers a bare 500 and logs one error line; the value is nowhere."""
    if metadata:
        with pytest.raises(TamperedData):
            store.metadata(path)
    else:
        with pytest.raises(TamperedData):
            store.get(path, version)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="spike"):
        response = api_get(store, path, version, metadata=metadata)
    assert (response.status, response.body) == (500, b'{"err":"api_internal_error"}')
    refused = [r for r in caplog.records if "REFUSED TAMPERED DATA" in r.getMessage()]
    assert len(refused) == 1, caplog.text
    assert refused[0].levelno == logging.ERROR
    assert path in refused[0].getMessage()
    for secret in (VALUE, OTHER):
        assert secret not in caplog.text
        assert secret.encode() not in response.body


@pytest.mark.parametrize(
    "offset",
    [0, 1, 1 + NONCE_SIZE - 1, 1 + NONCE_SIZE, 1 + NONCE_SIZE + 5, -16, -1],
    ids=["format", "nonce-first", "nonce-last", "ciphertext-first", "ciphertext", "tag-first", "tag-last"],
)
def test_a_flipped_bit_anywhere_is_refused(
    filled: SecretStore, data_dir: Path, caplog: pytest.LogCaptureFixture, offset: int
) -> None:
    blob = bytearray(sealed_of(data_dir, "app/db", 2))
    blob[offset] ^= 0x01
    set_sealed(data_dir, "app/db", 2, bytes(blob))
    assert_refused(filled, caplog, "app/db")
    assert filled.get("app/db", 1) == (1, {"password": VALUE})  # its neighbours are untouched
    assert filled.get("app/other", 0) == (1, {"password": OTHER})


@pytest.mark.parametrize("length", [0, 1, 1 + NONCE_SIZE, 1 + NONCE_SIZE + 15, -1])
def test_a_truncated_value_is_refused(
    filled: SecretStore, data_dir: Path, caplog: pytest.LogCaptureFixture, length: int
) -> None:
    set_sealed(data_dir, "app/db", 2, sealed_of(data_dir, "app/db", 2)[:length])
    assert_refused(filled, caplog, "app/db")


def test_a_row_copied_to_another_path_is_refused(
    filled: SecretStore, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Moved onto an existing secret, and planted as a new secret with its own metadata row."""
    stolen = sealed_of(data_dir, "app/db", 1)
    set_sealed(data_dir, "app/other", 1, stolen)
    with raw_db(data_dir) as db:
        db.execute(
            "INSERT INTO secret SELECT 'planted/db', current_version, oldest_version, max_versions, cas_required, "
            "created_at, updated_at, NULL, 0 FROM secret WHERE path = 'app/db'"
        )
        db.execute(
            "INSERT INTO secret_version SELECT 'planted/db', version, sealed, created_at, deleted_at, key_epoch, "
            "key_term FROM secret_version WHERE path = 'app/db'"
        )
    assert_refused(filled, caplog, "app/other")
    assert_refused(filled, caplog, "planted/db")
    assert_refused(filled, caplog, "planted/db", 1)


def test_a_row_copied_to_another_version_is_refused(
    filled: SecretStore, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Rolling a secret back by copying its old value over the current version."""
    set_sealed(data_dir, "app/db", 2, sealed_of(data_dir, "app/db", 1))
    assert_refused(filled, caplog, "app/db")
    assert_refused(filled, caplog, "app/db", 2)


def test_two_values_swapped_are_both_refused(
    filled: SecretStore, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mine, theirs = sealed_of(data_dir, "app/db", 1), sealed_of(data_dir, "app/other", 1)
    set_sealed(data_dir, "app/db", 1, theirs)
    set_sealed(data_dir, "app/other", 1, mine)
    assert_refused(filled, caplog, "app/db", 1)
    assert_refused(filled, caplog, "app/other", 1)


def test_a_value_relabelled_with_another_data_key_term_is_refused(
    filled: SecretStore, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The row's term column and the term its blob names (authenticated with it) must agree.

    Before the keyring this relabelled the key epoch column; a value is now bound to its data-key term, and
    its row's key epoch only says under which root key it was written (a rotation keeps the keyring)."""
    with raw_db(data_dir) as db:
        db.execute("UPDATE secret_version SET key_term = key_term + 1 WHERE path = 'app/db' AND version = 2")
    assert_refused(filled, caplog, "app/db")


def test_custom_metadata_moved_to_another_path_is_refused(
    filled: SecretStore, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    filled.update_metadata("app/db", max_versions=None, cas_required=None, custom_metadata={"owner": VALUE}).result(
        WAIT
    )
    assert filled.metadata("app/db")[0].custom_metadata == {"owner": VALUE}
    with raw_db(data_dir) as db:
        db.execute(
            "UPDATE secret SET custom_metadata = (SELECT custom_metadata FROM secret WHERE path = 'app/db') "
            "WHERE path = 'app/other'"
        )
    assert_refused(filled, caplog, "app/other", metadata=True)


def test_a_flipped_byte_in_the_database_file_is_refused(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Raw bytes this time: the sealed value is found in spike.db and one byte of it changed on disk."""
    store = open_store(data_dir)
    store.put("app/db", {"password": VALUE}, None).result(WAIT)
    store.put("app/other", {"password": OTHER}, None).result(WAIT)
    store.close()  # the last connection checkpoints the WAL into the main file
    blob = sealed_of(data_dir, "app/db", 1)
    db_file = data_dir / DB_NAME
    raw = bytearray(db_file.read_bytes())
    assert raw.count(blob) == 1
    assert VALUE.encode() not in raw and OTHER.encode() not in raw  # nothing is stored in clear
    raw[raw.index(blob) + len(blob) // 2] ^= 0x80
    db_file.write_bytes(bytes(raw))

    store = open_store(data_dir)
    try:
        assert_refused(store, caplog, "app/db")
        assert store.get("app/other", 0) == (1, {"password": OTHER})
    finally:
        store.close()


def test_another_root_key_reads_nothing(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A wrong key is an authentication failure, never garbage returned as a value.

    The keyring is what the root key opens: another key opens no keyring, so no value is even tried (a
    storage error, 500, logged once per use; before the keyring, each value refused to open)."""
    store = open_store(data_dir)
    store.put("app/db", {"password": VALUE}, None).result(WAIT)
    store.close()
    wrong = open_store(data_dir, OTHER_KEY)
    try:
        with pytest.raises(StorageError, match="keyring does not open with the root key of epoch 1"):
            wrong.get("app/db", 0)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="spike"):
            response = api_get(wrong, "app/db")
        assert (response.status, response.body) == (500, b'{"err":"api_internal_error"}')
        assert "keyring does not open" in caplog.text
        assert VALUE not in caplog.text and VALUE.encode() not in response.body
    finally:
        wrong.close()


def test_sealing_uses_a_fresh_nonce_and_binds_path_and_version() -> None:
    sealer = Sealer(OTHER_KEY)
    plaintext = msgspec.json.encode({"password": VALUE})
    first, second = sealer.seal(plaintext, secret_aad("a/b", 1)), sealer.seal(plaintext, secret_aad("a/b", 1))
    assert first[0] == second[0] == FORMAT_V1
    assert first[1 : 1 + NONCE_SIZE] != second[1 : 1 + NONCE_SIZE]  # fresh nonce
    assert first != second
    assert sealer.open(first, secret_aad("a/b", 1)) == sealer.open(second, secret_aad("a/b", 1)) == plaintext
    for aad in (secret_aad("a/c", 1), secret_aad("a/b", 2), secret_aad("a/b/", 1)):
        with pytest.raises(TamperedData):
            sealer.open(first, aad)


# ---------------------------------------------------------------------- the keyring (spike/app/store/keyring.py)


def set_term(data_dir: Path, path: str, version: int, term: int, *, blob_too: bool) -> None:
    """Relabel a value's data-key term in its row, and in its sealed blob's header if `blob_too`."""
    with raw_db(data_dir) as db:
        if blob_too:
            blob = sealed_of(data_dir, path, version)
            db.execute(
                "UPDATE secret_version SET sealed = ? WHERE path = ? AND version = ?",
                (blob[:1] + term.to_bytes(4, "big") + blob[5:], path, version),
            )
        db.execute("UPDATE secret_version SET key_term = ? WHERE path = ? AND version = ?", (term, path, version))


def test_a_value_naming_a_term_this_database_never_had_is_refused(
    filled: SecretStore, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Newer than any term held: the stored keyring is read again (another instance may have made it), and
    since it does not hold it either, the value is refused as tampered with."""
    set_term(data_dir, "app/db", 2, filled.keyring().active + 5, blob_too=True)
    assert_refused(filled, caplog, "app/db")


def test_a_value_relabelled_with_another_term_that_exists_is_refused(
    filled: SecretStore, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The term is in the authenticated header: the other term's key does not open it."""
    filled.rotate_data_key()
    set_term(data_dir, "app/db", 2, filled.keyring().active, blob_too=True)
    assert_refused(filled, caplog, "app/db")


def test_a_keyring_put_back_to_an_older_copy_is_refused(filled: SecretStore, data_dir: Path) -> None:
    """Rolling the keyring back to before a data-key rotation (to drop the newest term) opens nothing."""
    with raw_db(data_dir) as db:
        (older,) = db.execute("SELECT keyring FROM key_record").fetchone()
    filled.rotate_data_key()
    filled.put("app/db", {"password": VALUE + "-3"}, None).result(WAIT)
    with raw_db(data_dir) as db:
        db.execute("UPDATE key_record SET keyring = ?", (older,))
    again = open_store(data_dir)
    try:
        with pytest.raises(StorageError, match="replaced with an older copy"):
            again.get("app/db", 1)
    finally:
        again.close()


def test_a_keyring_wrapped_for_another_epoch_is_refused(filled: SecretStore, data_dir: Path) -> None:
    """The epoch is bound into the wrapping: a keyring moved from another record's epoch opens nothing."""
    record, _ = seal_key(ROOT_KEY, epoch=2, threshold=2, keeper_ids=[1, 2, 3])
    with raw_db(data_dir) as db:
        db.execute("UPDATE key_record SET epoch = 2, record = ?", (msgspec.json.encode(record),))
        (wrapped,) = db.execute("SELECT keyring FROM key_record").fetchone()
    again = open_store(data_dir, epoch=2)
    try:
        with pytest.raises(StorageError, match="wrapped under the root key of epoch 1, not 2"):
            again.get("app/db", 1)
    finally:
        again.close()
    # Its clear header rewritten to say epoch 2: the header is authenticated, nothing opens.
    with raw_db(data_dir) as db:
        db.execute("UPDATE key_record SET keyring = ?", (wrapped[:1] + (2).to_bytes(8, "big") + wrapped[9:],))
    again = open_store(data_dir, epoch=2)
    try:
        with pytest.raises(StorageError, match="does not open with the root key of epoch 2"):
            again.get("app/db", 1)
    finally:
        again.close()
