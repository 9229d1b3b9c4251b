"""The memory backend (SPIKE_NEXUS_BACKEND_STORE=memory): SPIKE's development store, nothing kept.

The same `SqlStore` as SQLite's (the same tables, statements and KV and policy
decisions), on a database that lives in this process's memory only
(`sqlite_schema.memory_database`): no file is made, in the data dir or
anywhere else, so nothing of it survives the process, however it ends
(SIGKILL included).

There is no key record: nothing is recovered, so nothing needs recognising.
The keyring that seals values in memory is made once, under the key Nexus
draws at start (`nexus/memory_mode.py`), and held here, never stored.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from spike.app.config import NO_DATA_DIR
from spike.app.model import kv
from spike.app.store.errors import StorageError
from spike.app.store.keyring import Keyring
from spike.app.store.sqlite import SecretStore
from spike.app.store.sqlite_schema import memory_database
from spike.protocol.material import RootKey


class MemoryBackend(SecretStore):
    """Secrets and policies in this process's memory: lost when it exits."""

    shared = False
    description = "memory (nothing is kept)"

    def __init__(self, *, default_max_versions: int = kv.DEFAULT_MAX_VERSIONS) -> None:
        super().__init__(NO_DATA_DIR, default_max_versions=default_max_versions, memory=memory_database())
        self._held: Keyring | None = None
        self._held_lock = threading.Lock()

    def open_keyring(
        self, root_key: RootKey, epoch: int, *, now: float, random_bytes: Callable[[int], bytes] = os.urandom
    ) -> Keyring:
        """The keyring of this process's key, made at its first use and held in memory only (no record)."""
        with self._held_lock:
            if self._held is None:
                self._held = Keyring.create(root_key, term=1, legacy_epoch=None, now=now, random_bytes=random_bytes)
            return self._held

    def add_data_term(
        self,
        root_key: RootKey,
        epoch: int,
        *,
        now: float,
        rewrap: bool,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> Keyring:
        raise StorageError("the memory backend has one data key for the life of the process")
