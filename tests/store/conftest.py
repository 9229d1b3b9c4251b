"""Fixtures for the storage tier: `SecretStore` on a real SQLite file in tmp_path; `backend` on each backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from store_helpers import BACKENDS, CountingSealer, open_backend, open_store

from spike.app.store.sqlite import SecretStore
from spike.app.store.sqlite_schema import DB_NAME


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def sealer() -> CountingSealer:
    return CountingSealer()


@pytest.fixture
def store(data_dir: Path, sealer: CountingSealer) -> Iterator[SecretStore]:
    store = open_store(data_dir, sealer=sealer)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def db_file(data_dir: Path) -> Path:
    return data_dir / DB_NAME


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """The storage backend under test, bootstrapped and unlocked: SQLite, then PostgreSQL (a real server, a
    fresh database)."""
    backend = open_backend(request.param, tmp_path / "data")
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture(params=BACKENDS)
def empty_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """The storage backend under test, as before the first bootstrap: no record, locked."""
    backend = open_backend(request.param, tmp_path / "data", unlock=False)
    try:
        yield backend
    finally:
        backend.close()
