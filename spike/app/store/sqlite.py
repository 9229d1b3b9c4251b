"""Secrets and policies in SQLite: point reads on the caller's thread, writes group-committed.

Reads use their own connection and touch only the rows they name (primary
key lookups, or a range of the path index for listing), so they stay fast
with any number of secrets.  Writes go to one writer thread that takes every
write waiting at that moment, runs each in its own savepoint (one failing
write does not undo the others), and commits them with a single fsync: the
caller's future resolves only after that commit, so an acknowledged write
is durable.  Serialising writes in one thread also makes check-and-set
exact: there is no lost update between two writers.

`SqliteBackend` is the whole storage `Backend` (backend.py) on one SQLite
file: this store, plus the key record of `NexusStore`.  One Nexus process
uses the file; several instances need PostgreSQL (postgres.py).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from spike.app.model import kv
from spike.app.model.policy import MAX_POLICIES
from spike.app.store.backend import ClusterState, PolicyRow, WriteOutcome, WriteQueue, resolved, settle
from spike.app.store.errors import DatabaseUnavailable, StorageError
from spike.app.store.sealing import Sealer, TamperedData, metadata_aad, secret_aad
from spike.app.store.sqlite_schema import DB_NAME, NexusStore, connect, sqlite_failure
from spike.protocol.record import KeyRecord

log = logging.getLogger("spike.nexus.store")

T = TypeVar("T")
WriteOp = Callable[[sqlite3.Connection], T]

_values_encoder = msgspec.json.Encoder()
_values_decoder = msgspec.json.Decoder(dict[str, str])

_SELECT_META = (
    "SELECT current_version, oldest_version, max_versions, cas_required, created_at, updated_at, "
    "custom_metadata FROM secret WHERE path = ?"
)
_SELECT_VALUE = (
    "SELECT v.version, v.sealed, v.deleted_at, v.key_epoch FROM secret AS s "
    "JOIN secret_version AS v ON v.path = s.path "
    "AND v.version = CASE WHEN ?2 = 0 THEN s.current_version ELSE ?2 END WHERE s.path = ?1"
)


_SELECT_POLICY = "SELECT id, name, sealed, created_at, updated_at FROM policy"
_BUMP_POLICIES = "UPDATE policy_version SET version = version + 1 WHERE id = 1"
# One row for an id or a name, the id first (ids are random; names are chosen by people).
_ONE_POLICY = f"{_SELECT_POLICY} WHERE id = ?1 OR name = ?1 ORDER BY id = ?1 DESC LIMIT 1"


@contextmanager
def _reading(what: str) -> Iterator[None]:
    """A read that fails says what it was reading, as a `StorageError` (503 when it is "not now")."""
    try:
        yield
    except sqlite3.Error as exc:
        raise sqlite_failure(f"cannot read {what}: {exc}", exc) from None


class PolicyNameTaken(kv.InvalidRequest):
    status = 409
    code = "api_conflict"


class SecretStore:
    inline_reads = True  # a local file: reads are short enough for the event loop's thread

    def __init__(self, data_dir: Path, *, default_max_versions: int = kv.DEFAULT_MAX_VERSIONS) -> None:
        self._path = data_dir / DB_NAME
        self._reader = connect(self._path)
        self._sealer: Sealer | None = None
        self._epoch = 0
        self.default_max_versions = default_max_versions
        self._queue: WriteQueue[tuple[WriteOp[Any], Future[Any]]] = WriteQueue()
        self._writer = threading.Thread(target=self._write_loop, name="spike-writer", daemon=True)
        self._writer_db = connect(self._path)
        self.batches = 0
        self.writes = 0
        self.refused = 0  # writes refused by the database since the last commit that worked
        self._writer.start()

    # ------------------------------------------------------------------ key

    def unlock(self, sealer: Sealer, epoch: int) -> None:
        """Start sealing and opening with the data key of the verified root key."""
        self._sealer, self._epoch = sealer, epoch

    def lock(self) -> None:
        self._sealer = None

    @property
    def reader(self) -> sqlite3.Connection:
        """The read connection (for the event loop's thread only), shared with the policy store."""
        return self._reader

    def sealer(self) -> Sealer:
        return self._require_sealer()

    def _require_sealer(self) -> Sealer:
        if self._sealer is None:
            raise StorageError("the store is locked: no root key")
        return self._sealer

    # ------------------------------------------------------------------ reads

    def read(self, call: Callable[[], T]) -> Future[T]:
        return resolved(call)

    def get(self, path: str, version: int) -> tuple[int, dict[str, str]]:
        with _reading(path):
            row = self._reader.execute(_SELECT_VALUE, (path, version)).fetchone()
        if row is None:
            raise kv.NotFound("no such secret or version")
        found, sealed, deleted_at, epoch = row
        if sealed is None or deleted_at is not None:
            raise kv.NotFound("this version is deleted or destroyed")
        plaintext = self._open(sealed, secret_aad(path, found), epoch, f"{path} version {found}")
        return found, _values_decoder.decode(plaintext)

    def _open(self, sealed: bytes, aad: bytes, epoch: int, what: str) -> bytes:
        if epoch != self._epoch:
            raise TamperedData(f"{what} is sealed under key epoch {epoch}, the current key is {self._epoch}")
        try:
            return self._require_sealer().open(sealed, aad)
        except TamperedData as exc:
            raise TamperedData(f"{what}: {exc} (tampered with, or moved from another path)") from None

    def metadata(self, path: str) -> tuple[kv.SecretMeta, list[kv.VersionInfo]]:
        with _reading(f"the metadata of {path}"):
            meta = _load_meta(self._reader, path, self)
            if meta is None:
                raise kv.NotFound("no such secret")
            rows = self._reader.execute(
                "SELECT version, created_at, deleted_at, sealed IS NULL FROM secret_version "
                "WHERE path = ? ORDER BY version",
                (path,),
            ).fetchall()
        return meta, [kv.VersionInfo(v, c, d, bool(x)) for v, c, d, x in rows]

    def list_paths(self, prefix: str, *, limit: int, after: str = "") -> list[str]:
        """Paths that start with `prefix`, in order, after `after`, at most `limit`.

        A range scan of the primary key: cost grows with the page returned,
        not with the number of secrets stored.
        """
        if after and after >= prefix:
            sql, args = "SELECT path FROM secret WHERE path > ?", [after]
        else:
            sql, args = "SELECT path FROM secret WHERE path >= ?", [prefix]
        if prefix:
            sql += " AND path < ?"
            args.append(prefix[:-1] + chr(ord(prefix[-1]) + 1))
        with _reading(f"the paths under {prefix!r}"):
            return [p for (p,) in self._reader.execute(sql + " ORDER BY path LIMIT ?", [*args, limit])]

    def count(self) -> int:
        with _reading("the number of secrets"):
            return int(self._reader.execute("SELECT count(*) FROM secret").fetchone()[0])

    # ------------------------------------------------------------------ policies

    def policy_rows(self) -> list[PolicyRow]:
        with _reading("the policies"):
            return self._reader.execute(f"{_SELECT_POLICY} ORDER BY name").fetchall()

    def policy_row(self, id_or_name: str) -> PolicyRow | None:
        with _reading(f"policy {id_or_name}"):
            row: PolicyRow | None = self._reader.execute(_ONE_POLICY, (id_or_name,)).fetchone()
        return row

    def policy_names(self) -> list[tuple[str, str]]:
        with _reading("the policy names"):
            return [(i, n) for i, n in self._reader.execute("SELECT id, name FROM policy ORDER BY name")]

    def policy_put(
        self, name: str, seal: Callable[[str], bytes], *, create_only: bool, new_id: Callable[[], str]
    ) -> Future[tuple[str, bool]]:
        def op(db: sqlite3.Connection) -> tuple[str, bool]:
            now = time.time()
            row = db.execute("SELECT id FROM policy WHERE name = ?", (name,)).fetchone()
            if row is not None:
                if create_only:
                    raise PolicyNameTaken(f"a policy named {name} exists")
                (policy_id,) = row
                db.execute(
                    "UPDATE policy SET sealed = ?, updated_at = ? WHERE id = ?", (seal(policy_id), now, policy_id)
                )
                db.execute(_BUMP_POLICIES)
                return policy_id, False
            (count,) = db.execute("SELECT count(*) FROM policy").fetchone()
            if count >= MAX_POLICIES:
                raise kv.InvalidRequest(f"at most {MAX_POLICIES} policies")
            policy_id = new_id()
            db.execute(
                "INSERT INTO policy (id, name, sealed, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                (policy_id, name, seal(policy_id), now, now),
            )
            db.execute(_BUMP_POLICIES)
            return policy_id, True

        return self.submit(op)

    def policy_delete(self, id_or_name: str) -> Future[None]:
        def op(db: sqlite3.Connection) -> None:
            row = db.execute(_ONE_POLICY, (id_or_name,)).fetchone()
            if row is None:
                raise kv.NotFound("no such policy")
            db.execute("DELETE FROM policy WHERE id = ?", (row[0],))
            db.execute(_BUMP_POLICIES)

        return self.submit(op)

    def policy_reseal(self, policy_id: str, expected: bytes, sealed: bytes) -> Future[bool]:
        def op(db: sqlite3.Connection) -> bool:
            changed = db.execute(
                "UPDATE policy SET sealed = ? WHERE id = ? AND sealed = ?", (sealed, policy_id, expected)
            ).rowcount
            if changed:
                db.execute(_BUMP_POLICIES)
            return bool(changed)

        return self.submit(op)

    def policy_version(self) -> int:
        with _reading("the policies' change counter"):
            return int(self._reader.execute("SELECT version FROM policy_version WHERE id = 1").fetchone()[0])

    # ------------------------------------------------------------------ writes

    def submit(self, op: WriteOp[T]) -> Future[T]:
        future: Future[T] = Future()
        self._queue.put((op, future))
        return future

    def put(self, path: str, values: dict[str, str], cas: int | None) -> Future[int]:
        plaintext = _values_encoder.encode(values)
        sealer = self._require_sealer()
        epoch = self._epoch
        default = self.default_max_versions

        def op(db: sqlite3.Connection) -> int:
            now = time.time()
            meta = _load_meta(db, path, None)
            stored = [v for (v,) in db.execute("SELECT version FROM secret_version WHERE path = ?", (path,))]
            plan = kv.plan_put(meta, stored, path=path, cas=cas, now=now, default_max_versions=default)
            sealed = sealer.seal(plaintext, secret_aad(path, plan.version))
            if meta is None:
                db.execute(
                    "INSERT INTO secret (path, current_version, oldest_version, max_versions, "
                    "cas_required, created_at, updated_at, custom_metadata) VALUES (?, ?, ?, 0, 0, ?, ?, NULL)",
                    (path, plan.version, plan.meta.oldest_version, now, now),
                )
            else:
                db.execute(
                    "UPDATE secret SET current_version = ?, oldest_version = ?, updated_at = ? WHERE path = ?",
                    (plan.version, plan.meta.oldest_version, now, path),
                )
            db.execute(
                "INSERT INTO secret_version (path, version, sealed, created_at, deleted_at, key_epoch) "
                "VALUES (?, ?, ?, ?, NULL, ?)",
                (path, plan.version, sealed, now, epoch),
            )
            if plan.pruned:
                db.executemany(
                    "DELETE FROM secret_version WHERE path = ? AND version = ?",
                    [(path, v) for v in plan.pruned],
                )
            return plan.version

        return self.submit(op)

    def delete(self, path: str, versions: list[int]) -> Future[None]:
        return self._mark(path, versions, "deleted_at = ?", lambda: (time.time(),))

    def undelete(self, path: str, versions: list[int]) -> Future[None]:
        return self._mark(path, versions, "deleted_at = NULL", lambda: ())

    def destroy(self, path: str, versions: list[int]) -> Future[None]:
        return self._mark(path, versions, "sealed = NULL", lambda: ())

    def _mark(
        self, path: str, versions: list[int], assignment: str, args: Callable[[], tuple[Any, ...]]
    ) -> Future[None]:
        def op(db: sqlite3.Connection) -> None:
            meta = _load_meta(db, path, None)
            if meta is None:
                raise kv.NotFound("no such secret")
            db.executemany(
                f"UPDATE secret_version SET {assignment} WHERE path = ? AND version = ? AND sealed IS NOT NULL",  # noqa: S608 - fixed strings
                [(*args(), path, v) for v in kv.targets(meta, versions)],
            )
            db.execute("UPDATE secret SET updated_at = ? WHERE path = ?", (time.time(), path))

        return self.submit(op)

    def update_metadata(
        self,
        path: str,
        *,
        max_versions: int | None,
        cas_required: bool | None,
        custom_metadata: dict[str, str] | None,
    ) -> Future[None]:
        sealer = self._require_sealer()
        sealed_custom = (
            None
            if custom_metadata is None
            else sealer.seal(_values_encoder.encode(custom_metadata), metadata_aad(path))
        )

        def op(db: sqlite3.Connection) -> None:
            now = time.time()
            if _load_meta(db, path, None) is None:
                # Like Vault, metadata may be written before the first version.
                db.execute(
                    "INSERT INTO secret (path, current_version, oldest_version, max_versions, "
                    "cas_required, created_at, updated_at, custom_metadata) VALUES (?, 0, 0, 0, 0, ?, ?, NULL)",
                    (path, now, now),
                )
            if max_versions is not None:
                db.execute("UPDATE secret SET max_versions = ? WHERE path = ?", (max_versions, path))
            if cas_required is not None:
                db.execute("UPDATE secret SET cas_required = ? WHERE path = ?", (int(cas_required), path))
            if sealed_custom is not None:
                db.execute("UPDATE secret SET custom_metadata = ? WHERE path = ?", (sealed_custom, path))
            db.execute("UPDATE secret SET updated_at = ? WHERE path = ?", (now, path))

        return self.submit(op)

    def delete_all(self, path: str) -> Future[None]:
        """Remove a secret with every version and its metadata."""

        def op(db: sqlite3.Connection) -> None:
            if db.execute("DELETE FROM secret WHERE path = ?", (path,)).rowcount == 0:
                raise kv.NotFound("no such secret")
            db.execute("DELETE FROM secret_version WHERE path = ?", (path,))

        return self.submit(op)

    # ------------------------------------------------------------------ writer thread

    def _write_loop(self) -> None:
        while (batch := self._queue.next_batch()) is not None:
            self._commit(self._writer_db, batch)

    def _commit(self, db: sqlite3.Connection, batch: list[tuple[WriteOp[Any], Future[Any]]]) -> None:
        outcomes: list[WriteOutcome] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            for op, future in batch:
                db.execute("SAVEPOINT op")
                try:
                    result = op(db)
                except Exception as exc:  # the op's own failure: undo just this op
                    db.execute("ROLLBACK TO op")
                    db.execute("RELEASE op")
                    outcomes.append((future, None, exc))
                else:
                    db.execute("RELEASE op")
                    outcomes.append((future, result, None))
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error as again:  # SQLite rolls back by itself when it cannot; never end the thread
                    log.debug("rollback after a failed write: %s", again)
            error = sqlite_failure(f"the database refused the write: {exc}", exc)
            if not isinstance(error, DatabaseUnavailable):
                log.error("write of %d operation(s) failed and was rolled back: %s", len(batch), exc)  # noqa: TRY400
            elif not self.refused:
                log.error(  # noqa: TRY400 - the cause in one line
                    "writes to %s fail (%s): refused with 503 until they work again; reads go on",
                    self._path,
                    exc,
                )
            self.refused += len(batch)
            for _, future in batch:
                future.set_exception(error)
            return
        if self.refused:
            log.warning("writes to %s work again (%d refused meanwhile)", self._path, self.refused)
            self.refused = 0
        self.batches += 1
        self.writes += len(batch)
        settle(outcomes)

    def close(self) -> None:
        self._queue.stop()
        self._writer.join(timeout=10)
        self._reader.close()
        self._writer_db.close()


class SqliteBackend(SecretStore):
    """The storage `Backend` on one SQLite file in the data dir: for one Nexus process."""

    shared = False

    def __init__(self, data_dir: Path, *, default_max_versions: int = kv.DEFAULT_MAX_VERSIONS) -> None:
        self._records = NexusStore(data_dir)  # opens (creating and migrating) the file first
        try:
            super().__init__(data_dir, default_max_versions=default_max_versions)
        except sqlite3.Error as exc:
            self._records.close()
            raise StorageError(f"cannot open the database in {data_dir}: {exc}") from None
        self.description = f"the data dir {data_dir}"

    def load_key_record(self) -> KeyRecord | None:
        return self._records.load_key_record()

    def install_key_record(self, record: KeyRecord, *, replace: KeyRecord | None) -> KeyRecord:
        return self._records.install_key_record(record, replace=replace)

    def cluster_state(self) -> ClusterState:
        return ClusterState(self.load_key_record(), self.policy_version())

    def close(self) -> None:
        super().close()
        self._records.close()


def _load_meta(db: sqlite3.Connection, path: str, store: SecretStore | None) -> kv.SecretMeta | None:
    row = db.execute(_SELECT_META, (path,)).fetchone()
    if row is None:
        return None
    current, oldest, max_versions, cas_required, created, updated, custom_sealed = row
    custom: dict[str, str] = {}
    if custom_sealed is not None and store is not None:
        custom = _values_decoder.decode(
            store._open(custom_sealed, metadata_aad(path), store._epoch, f"{path} metadata")
        )
    return kv.SecretMeta(path, current, oldest, max_versions, bool(cas_required), created, updated, custom)
