"""spike.app's and spike.transports' records that hold a secret keep it out of their repr.

These records are msgspec Structs (cheaper to define at start than dataclasses, issue 20), whose repr
shows every field unless the class says otherwise: each record with a field that may be a secret value,
a token, a password or a key is checked here.  spike.protocol's records are dataclasses that hide their
own (`field(repr=False)`, RootKey's repr).
"""

from __future__ import annotations

from pathlib import Path

from spike.app.config import NexusConfig
from spike.app.model.kv import ImportedSecret, ImportedVersion
from spike.app.nexus.vault.request import VaultRequest
from spike.app.store.data_keys import _Unlocked
from spike.protocol import ApiRequest, RootKey, SpiffeId
from spike.transports.http1 import Head, Request

SECRET = "s3cr3t-value-never-shown"
PEER = SpiffeId.parse("spiffe://spike.ist/workload/app")


def test_a_parsed_request_shows_neither_its_body_nor_its_headers() -> None:
    headers = {b"x-vault-token": SECRET.encode(), b"authorization": f"Bearer {SECRET}".encode()}
    request = Request("PUT", "/v1/secret/data/db", headers, f'{{"value": "{SECRET}"}}'.encode(), True)
    head = Head("PUT", "/v1/secret/data/db", headers, True, 1)
    for record in (request, head):
        assert SECRET not in repr(record)
        assert "/v1/secret/data/db" in repr(record)


def test_a_vault_request_shows_no_token() -> None:
    raw = ApiRequest("GET", "/v1/secret/data/db", PEER, b"", headers={b"x-vault-token": SECRET.encode()})
    request = VaultRequest.of(raw)
    assert request.token == SECRET
    assert SECRET not in repr(request)
    assert "secret/data/db" in repr(request)


def test_an_unlocked_data_key_store_shows_no_root_key() -> None:
    key = bytes(range(32))
    shown = repr(_Unlocked(RootKey(key), 3))
    assert key.hex() not in shown
    assert repr(key) not in shown
    assert "epoch=3" in shown


def test_a_nexus_configuration_shows_its_database_url_without_the_password() -> None:
    config = NexusConfig(
        common=None,  # type: ignore[arg-type]  # not read by repr
        bind=("127.0.0.1", 8553),
        keepers={1: "https://k1:8443"},
        threshold=2,
        schedule=None,  # type: ignore[arg-type]
        data_dir=Path("/var/lib/spike"),
        database_url=f"postgresql://spike:{SECRET}@db.internal/spike?password={SECRET}",
    )
    shown = repr(config)
    assert SECRET not in shown
    assert "postgresql://spike:***@db.internal/spike" in shown
    assert "threshold=2" in shown


def test_an_imported_version_shows_its_keys_not_its_values() -> None:
    version = ImportedVersion(2, {"password": SECRET}, 1.0, deleted_at=2.0)
    for shown in (repr(version), repr(ImportedSecret("apps/db", (version,), 1.0, 2.0))):
        assert SECRET not in shown
        assert "password" in shown
