"""Helpers for the storage tier: a real SQLite file in a tmp dir, opened as Nexus opens it.

`open_store` runs the schema migrations (through `NexusStore`, as `spike nexus`
does at start), then opens a `SecretStore` and unlocks it with a data key
derived from a fixed root key.  `CountingSealer` counts every seal and open,
so a test can say how many values an operation decrypted.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from spike.app.store.sealing import Sealer
from spike.app.store.sqlite import SecretStore, SqliteBackend
from spike.app.store.sqlite_schema import DB_NAME, NexusStore
from spike.protocol.material import RootKey

ROOT_KEY = RootKey(bytes(range(1, 33)))
OTHER_KEY = RootKey(bytes(range(2, 34)))
EPOCH = 1
WAIT = 10.0  # seconds a test waits for one write's future


class CountingSealer(Sealer):
    def __init__(self, key: RootKey) -> None:
        super().__init__(key)
        self.sealed = 0
        self.opened = 0

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        self.sealed += 1
        return super().seal(plaintext, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        self.opened += 1
        return super().open(blob, aad)


def migrate(data_dir: Path) -> None:
    NexusStore(data_dir).close()


def open_store(
    data_dir: Path, key: RootKey = ROOT_KEY, *, epoch: int = EPOCH, sealer: Sealer | None = None, **options: Any
) -> SecretStore:
    migrate(data_dir)
    store = SecretStore(data_dir, **options)
    store.unlock(sealer or Sealer(key), epoch)
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
    """A whole storage backend, empty, on SQLite (a file in `data_dir`) or a fresh PostgreSQL database."""
    if kind == "sqlite":
        backend: Any = SqliteBackend(data_dir, **options)
    else:
        from spike.app.store.postgres import PostgresBackend
        from tests import pg_server

        backend = PostgresBackend(pg_server.server().database(), read_threads=2, **options)
    if unlock:
        backend.unlock(Sealer(ROOT_KEY), EPOCH)
    return backend
