"""Helpers for the storage tier: a real SQLite file in a tmp dir, opened as Nexus opens it.

`open_store` runs the schema migrations (through `NexusStore`, as `spike nexus`
does at start), stores a key record for a fixed root key if there is none (a
bootstrap), then opens a `SecretStore` and unlocks it with that key (which
makes its keyring).  `CountingSealer` counts every seal and open of the
keyring, so a test can say how many values an operation decrypted.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from spike.app.store.backend import Backend
from spike.app.store.sqlite import SecretStore, SqliteBackend
from spike.app.store.sqlite_schema import DB_NAME, NexusStore
from spike.protocol.material import RootKey
from spike.protocol.record import KeyRecord, seal_key

ROOT_KEY = RootKey(bytes(range(1, 33)))
OTHER_KEY = RootKey(bytes(range(2, 34)))
EPOCH = 1
RECORD, _ = seal_key(ROOT_KEY, epoch=EPOCH, threshold=2, keeper_ids=[1, 2, 3])
WAIT = 10.0  # seconds a test waits for one write's future


class CountingSealer:
    """Put in front of a store's keyring (`open_store(..., sealer=...)`): counts every seal and open."""

    def __init__(self) -> None:
        self.sealed = 0
        self.opened = 0
        self.inner: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        self.sealed += 1
        return bytes(self.inner.seal(plaintext, aad))

    def open(self, blob: bytes, aad: bytes, label: int | None = None) -> bytes:
        self.opened += 1
        return bytes(self.inner.open(blob, aad, label))


def migrate(data_dir: Path) -> None:
    NexusStore(data_dir).close()


def with_record(data_dir: Path, key: RootKey = ROOT_KEY, epoch: int = EPOCH) -> KeyRecord:
    """The data dir's key record: stored now for `key` if there is none (a bootstrap), as Nexus unlocks only then."""
    store = NexusStore(data_dir)
    try:
        record = store.load_key_record()
        if record is None:
            record = seal_key(key, epoch=epoch, threshold=2, keeper_ids=[1, 2, 3])[0]
            store.save_key_record(record)
        return record
    finally:
        store.close()


def open_store(
    data_dir: Path,
    key: RootKey = ROOT_KEY,
    *,
    epoch: int = EPOCH,
    sealer: CountingSealer | None = None,
    **options: Any,
) -> SecretStore:
    """A store on the data dir's file, unlocked with `key` at `epoch` (its record is made first if none is stored)."""
    with_record(data_dir, key, epoch)
    store = SecretStore(data_dir, **options)
    store.unlock(key, epoch)
    if sealer is not None:
        sealer.inner = store.keyring()
        store._keyring = sealer  # type: ignore[assignment]  # counts what the store seals and opens
    return store


def raw_db(data_dir: Path) -> sqlite3.Connection:
    """A plain connection to the same file, for what an attacker with the file could do."""
    return sqlite3.connect(data_dir / DB_NAME, isolation_level=None)


def snapshot(data_dir: Path) -> tuple[list[Any], list[Any]]:
    """Every row of both secret tables, in order: equal snapshots mean nothing changed."""
    with raw_db(data_dir) as db:
        secrets = db.execute("SELECT * FROM secret ORDER BY path").fetchall()
        versions = db.execute("SELECT * FROM secret_version ORDER BY path, version").fetchall()
    return secrets, versions


BACKENDS = ("sqlite", "postgres")


def open_backend(kind: str, data_dir: Path, *, unlock: bool = True, **options: Any) -> Any:
    """A whole storage backend on SQLite (a file in `data_dir`), a fresh PostgreSQL database or in memory
    (`memory`: nothing in `data_dir`); with `unlock`, bootstrapped (`RECORD`) and unlocked with `ROOT_KEY`,
    else empty."""
    if kind == "sqlite":
        backend: Any = SqliteBackend(data_dir, **options)
    elif kind == "memory":  # no key record: the process's key, as memory_mode.MemoryNexus unlocks it
        from spike.app.store.memory import MemoryBackend

        backend = MemoryBackend(**options)
        if unlock:
            backend.unlock(ROOT_KEY, 0)
        return backend
    else:
        from tests import pg_server

        return open_postgres(pg_server.server().database(), unlock=unlock, **options)
    if unlock:
        backend.install_key_record(RECORD, replace=None)
        backend.unlock(ROOT_KEY, EPOCH)
    return backend


def open_postgres(url: str, *, unlock: bool = True, **options: Any) -> Any:
    """An instance on the PostgreSQL database at `url`; with `unlock`, bootstrapped (`RECORD`, installed by
    the first instance to open the database) and unlocked with `ROOT_KEY`."""
    from spike.app.store.postgres import PostgresBackend

    backend = PostgresBackend(url, read_threads=2, **options)
    if unlock:
        backend.install_key_record(RECORD, replace=None)
        backend.unlock(ROOT_KEY, EPOCH)
    return backend


def second_instance(backend: Backend, tmp_path: Path) -> Any:
    """Another instance on the same data: the same file for SQLite, the same database for PostgreSQL."""
    if backend.shared:
        from spike.app.store.postgres import PostgresBackend

        assert isinstance(backend, PostgresBackend)
        other: Any = PostgresBackend(backend._url, read_threads=2)
    else:
        from spike.app.store.sqlite import SqliteBackend

        other = SqliteBackend(tmp_path / "data")
    other.unlock(ROOT_KEY, EPOCH)
    return other
