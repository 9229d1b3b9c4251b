"""The storage interface Nexus runs on, whatever the database, split by concern.

Two implementations: `SqliteBackend` (sqlite.py: one file next to one Nexus,
the embedded default) and `PostgresBackend` (postgres.py: one PostgreSQL
database shared by several Nexus instances).  Both are a `SqlStore`
(sql_store.py): the same tables, the same statements (statements.py), the
same sealing and the same KV decisions (model/kv.py); the conformance tests
in tests/store run against both.

What a backend is, one protocol per concern, composed into `Backend`:

* `Sealing`: the keyring of data keys, opened by `unlock` once the root key is known.
* `Secrets`: the key/value data (Vault KV v2).
* `PolicyRows`: the policies' rows, sealed and opened by `PolicyStore` (policies.py).
* `Reads`: how a read is run without stalling the event loop.
* `KeyRecords`: the key record (what recognises the root key; never the key), the epochs'
  high-water mark and a pending rotation (key_state.py; docs/key-lifecycle.md).
* `Lifecycle`: what the database is, what other instances changed, closing.

The contract every implementation keeps:

* Reads (`get`, `metadata`, `list_paths`, `count`, the policy reads) are
  blocking calls, safe from any thread.  When `inline_reads` is true they are
  local and short, and the API calls them on the event loop's thread; when it
  is false (a database across a network) the API runs them through `read`,
  which answers with a `Future`, so the event loop never waits on the network.
* Writes return a `Future` that resolves once the write is committed (durable),
  with the write's result or the `kv.KvError` that refused it.  Writes submitted
  one after the other by one caller are applied in that order.  Check-and-set is
  exact: of two writes with the same `cas`, whichever Nexus they went to,
  exactly one wins.
* Database trouble is a `StorageError`; `DatabaseUnavailable` (its subclass)
  means "not now": the API answers 503 and the caller may try again.  A write
  whose outcome could not be learnt is `OutcomeUnknown`, never a guess.
* The key record is installed with `install_key_record`, atomically: of two
  instances installing different records at once, one wins and both learn
  which.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Protocol, TypeVar

import msgspec

from spike.app.model import kv
from spike.app.store.keyring import Keyring
from spike.app.store.read_cache import ReadCache
from spike.protocol.material import RootKey
from spike.protocol.pending import PendingRotation
from spike.protocol.record import KeyRecord

T = TypeVar("T")

# id, name, sealed body, created_at, updated_at
PolicyRow = tuple[str, str, bytes, float, float]


class ClusterState(msgspec.Struct, frozen=True):
    """What other Nexus instances may have changed: the key record, the policies' change counter, and the
    rotation state (the pending rotation, the epochs' high-water mark)."""

    record: KeyRecord | None
    policy_version: int
    pending: PendingRotation | None = None
    highest_epoch: int = 0
    data_term: int = 0  # the newest data-key term (keyring.py)
    rewrap_target: int | None = None  # a re-wrap of stored values to this term is under way


class KeyringStatus(msgspec.Struct, frozen=True):
    """The data keys, for `spike status` and metrics: no key in it."""

    active_term: int  # new values are sealed under it
    terms: tuple[tuple[int, float], ...]  # every term held and when it was made, oldest first
    values_by_term: dict[int, int]  # stored values (versions, custom metadata, policies) per term, from the rows
    rewrap_target: int | None  # a re-wrap to this term is under way (stored: it resumes after a restart)
    rewrapping: bool  # this instance runs it now
    rewrapped: int  # values this instance sealed again since it started

    @property
    def rewrap_remaining(self) -> int:
        """Stored values below the term a re-wrap is under way to (0 without one)."""
        if self.rewrap_target is None:
            return 0
        return sum(n for term, n in self.values_by_term.items() if term < self.rewrap_target)


class Sealing(Protocol):
    """The keyring of data keys everything stored is sealed with (keyring.py): none until `unlock`, none again
    after `lock`."""

    def unlock(self, root_key: RootKey, epoch: int) -> None:
        """Use the keyring under the verified root key of the stored record (epoch `epoch`); again after a
        root key rotation is committed, with the new key."""
        ...

    def lock(self) -> None: ...

    def keyring(self) -> Keyring:
        """The keyring in use; `StorageError` while locked."""
        ...

    def sealer(self) -> Keyring:
        """What values are sealed and opened with (the keyring); `StorageError` while locked."""
        ...

    def seal_value(self, plaintext: bytes, aad: bytes) -> bytes:
        """`plaintext` sealed under the newest data-key term."""
        ...

    def open_value(self, sealed: bytes, aad: bytes) -> bytes:
        """A sealed value's plaintext: `TamperedData`, or `DataKeyGone` for a data key that no longer exists."""
        ...

    def reload_keyring(self) -> Keyring:
        """Read the stored keyring again (another instance may have added a term)."""
        ...

    def rotate_data_key(self, *, rewrap: bool = False) -> int:
        """Add a data-key term for new values (one write); with `rewrap`, seal stored values again under it in the
        background.  The new term; `RotationUnderWay` (409) while a root key rotation is stored."""
        ...

    def rewrap(self) -> int:
        """Start a background re-wrap of stored values to the newest term; the term."""
        ...

    def keyring_status(self, *, fresh: bool = False) -> KeyringStatus:
        """The data-key terms and the re-wrap's progress (blocking: it counts the rows)."""
        ...


class Secrets(Protocol):
    """Versioned secrets (Vault KV v2): reads answer at once, writes with a future."""

    default_max_versions: int

    def get(self, path: str, version: int) -> tuple[int, dict[str, str]]: ...

    def cached_get(self, path: str, version: int) -> tuple[int, dict[str, str]] | None:
        """`get`'s answer at once, without I/O, when the store keeps it in memory (PostgreSQL's read cache);
        None: call `get`.  Safe on the event loop's thread."""
        ...

    def metadata(self, path: str) -> tuple[kv.SecretMeta, list[kv.VersionInfo]]: ...

    def list_paths(self, prefix: str, *, limit: int, after: str = "") -> list[str]: ...

    def count(self) -> int: ...

    def put(self, path: str, values: dict[str, str], cas: int | None) -> Future[int]: ...

    def delete(self, path: str, versions: list[int]) -> Future[None]: ...

    def undelete(self, path: str, versions: list[int]) -> Future[None]: ...

    def destroy(self, path: str, versions: list[int]) -> Future[None]: ...

    def update_metadata(
        self,
        path: str,
        *,
        max_versions: int | None,
        cas_required: bool | None,
        custom_metadata: dict[str, str] | None,
    ) -> Future[None]: ...

    def delete_all(self, path: str) -> Future[None]: ...

    def import_batch(
        self, secrets: Sequence[kv.ImportedSecret], policies: Sequence[PolicyRow], *, merge: bool
    ) -> Future[None]:
        """Secrets (sealed by the store) and sealed policy rows in one write, or nothing (sql_store.py)."""
        ...


class PolicyRows(Protocol):
    """The policies as rows (sealed and opened by PolicyStore) and their change counter."""

    def policy_rows(self) -> list[PolicyRow]:
        """Every policy row, by name."""
        ...

    def policy_row(self, id_or_name: str) -> PolicyRow | None:
        """The row with this id, else the one with this name."""
        ...

    def policy_names(self) -> list[tuple[str, str]]:
        """(id, name) of every policy, by name."""
        ...

    def policy_put(
        self, name: str, seal: Callable[[str], bytes], *, create_only: bool, new_id: Callable[[], str]
    ) -> Future[tuple[str, bool]]:
        """Create the policy named `name` or replace its body (`seal(id)`); (id, created)."""
        ...

    def policy_delete(self, id_or_name: str) -> Future[None]: ...

    def policy_reseal(self, policy_id: str, expected: bytes, sealed: bytes) -> Future[bool]:
        """Replace a policy's sealed body if it is still `expected` (an upgrade in place); whether it was."""
        ...

    def policy_version(self) -> int:
        """The policies' change counter: bumped in the transaction of every policy write."""
        ...


class Reads(Protocol):
    @property
    def inline_reads(self) -> bool:
        """True: reads are cheap local calls, fine on the event loop; False: go through `read`."""
        ...

    def read(self, call: Callable[[], T]) -> Future[T]:
        """Run a blocking read away from the caller's thread."""
        ...

    @property
    def read_cache(self) -> ReadCache | None:
        """PostgreSQL's read cache (read_cache.py), for metrics; None without one."""
        ...


class KeyRecords(Protocol):
    def load_key_record(self) -> KeyRecord | None:
        """The stored key record, or None before the first bootstrap."""
        ...

    def install_key_record(self, record: KeyRecord, *, replace: KeyRecord | None) -> KeyRecord:
        """Store `record` and return the record now in force.

        With `replace` None, only if no record is stored yet; otherwise only if
        the stored record is still `replace` (or none is stored).  When the
        answer is not `record`, another record was there first: use it instead.
        A replacement deletes any pending rotation and keeps the epochs'
        high-water mark: `EpochUsed` (nothing changes) unless `record`'s epoch
        is above it.
        """
        ...

    def load_keyring(self) -> tuple[int, bytes | None] | None:
        """(the record's epoch, the keyring wrapped under its root key or None), or None before a bootstrap."""
        ...

    def load_rotation_state(self) -> tuple[PendingRotation | None, bytes | None, int]:
        """(pending rotation or None, the keyring blob stored with it or None, the epochs' high-water mark)."""
        ...

    def persist_rotation(self, pending: PendingRotation, keyring_blob: bytes) -> bool:
        """Store a rotation if the record is still the one it starts from and none is stored; False if refused."""
        ...

    def commit_rotation(self, pending: PendingRotation) -> bool:
        """Record := `pending.record`, keyring := the one stored with it, pending deleted, in one write."""
        ...

    def abandon_rotation(self, pending: PendingRotation) -> bool:
        """Pending deleted and the high-water mark raised to its epoch; False if another one is stored."""
        ...


class Lifecycle(Protocol):
    @property
    def shared(self) -> bool:
        """True if other Nexus instances may use the same database at the same time."""
        ...

    @property
    def description(self) -> str:
        """Where the data lives, for logs (never a password)."""
        ...

    def cluster_state(self) -> ClusterState:
        """The key record and policy change counter as stored now (what other instances may have changed)."""
        ...

    def close(self) -> None: ...


class SecretBackend(Sealing, Secrets, PolicyRows, Reads, Protocol):
    """What the API serves from: secrets and policies, sealed with the data key handed over by `unlock`."""

    def close(self) -> None: ...


class Backend(SecretBackend, KeyRecords, Lifecycle, Protocol):
    """Everything Nexus keeps: the key record, secrets and policies."""
