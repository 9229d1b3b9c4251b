"""Secrets and policies on SQL, once for both databases: the data key, the reads and the writes.

`SqlStore` is what SQLite and PostgreSQL share: every key/value and policy
operation, written once against the statements of statements.py and the
decisions of model/kv.py.  A backend adds how it runs them:

* `_read(work, what)`: run one read on a connection (SQLite: its reader
  connection, on the caller's thread; PostgreSQL: a pooled connection, with
  outage handling);
* `_submit(op, path=..., epoch=...)`: queue one write for its writer thread,
  which runs `op` inside a group-committed transaction (sqlite.py,
  postgres_writer.py) and settles the future after the commit;
* its `Dialect`: what the SQL cannot say the same way in both (how a list of
  versions is bound, how a write reads a secret's versions, whether a write's
  statements go in one round trip).

A write's operation first reads what it needs and asks model/kv.py what to
do; a refusal (`kv.KvError`) is raised before the operation writes anything.

Sealing goes through one place, here: `_sealing()` gives the sealer a write
seals with and the key epoch stored with it, and `_open` opens a stored value
after checking the epoch it was sealed under.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from spike.app.model import kv
from spike.app.model.policy import MAX_POLICIES
from spike.app.store.backend import PolicyRow
from spike.app.store.errors import StorageError
from spike.app.store.sealing import Sealer, TamperedData, metadata_aad, secret_aad
from spike.app.store.statements import Statements

T = TypeVar("T")

_values_encoder = msgspec.json.Encoder()
_values_decoder = msgspec.json.Decoder(dict[str, str])


class Connection(Protocol):
    """What an operation uses of a connection: sqlite3's and psycopg's both have it."""

    def execute(self, query: str, params: dict[str, Any], /) -> Any: ...


C = TypeVar("C", bound=Connection)
C_contra = TypeVar("C_contra", bound=Connection, contravariant=True)

# One write, run by the writer thread inside its transaction.
WriteOp = Callable[[C], T]

# current_version, oldest_version, max_versions, cas_required, created_at, updated_at, sealed custom metadata
MetaRow = tuple[int, int, int, Any, float, float, bytes | None]


class Dialect(Protocol[C_contra]):
    """What the two databases do differently, for statements that are otherwise the same."""

    sql: Statements  # statements.py's, rendered for this driver

    def for_each_version(self, conn: C_contra, statement: str, params: dict[str, Any], versions: Sequence[int]) -> None:
        """Run a statement with `= ANY(:versions)` for these versions."""
        ...

    def read_for_write(self, conn: C_contra, path: str) -> tuple[kv.SecretMeta | None, list[int]]:
        """A secret's metadata (without its custom metadata) and stored version numbers, or (None, [])."""
        ...

    def read_metadata(self, conn: C_contra, path: str) -> tuple[MetaRow | None, list[kv.VersionInfo]]:
        """A secret's metadata row and its versions, in order."""
        ...

    def pipeline(self, conn: C_contra) -> AbstractContextManager[Any]:
        """The statements run inside go to the database in one round trip (a put's writes).

        Only for three statements or more: on loopback, psycopg's pipeline costs more than one round
        trip saves, so the two-statement writes do without it."""
        ...


class PolicyNameTaken(kv.InvalidRequest):
    status = 409
    code = "api_conflict"


class SqlStore(ABC, Generic[C]):
    """Secrets and policies on a SQL database; a backend provides `_read`, `_submit` and its `Dialect`."""

    def __init__(self, dialect: Dialect[C], *, default_max_versions: int) -> None:
        self._dialect = dialect
        self._sql = dialect.sql
        self.default_max_versions = default_max_versions
        self._sealer: Sealer | None = None
        self._epoch = 0

    # ------------------------------------------------------------------ what a backend provides

    @abstractmethod
    def _read(self, work: Callable[[C], T], what: str) -> T:
        """Run `work` on a connection for reads; `what` names what is read, for an error message."""

    @abstractmethod
    def _submit(self, op: WriteOp[C, T], *, path: str | None, epoch: int | None) -> Future[T]:
        """Queue `op` for the writer; `path`: the secret it changes (None: the policies); `epoch`: the
        key epoch it sealed under (None: it seals nothing)."""

    # ------------------------------------------------------------------ the data key

    def unlock(self, sealer: Sealer, epoch: int) -> None:
        """Start sealing and opening with the data key of the verified root key."""
        self._sealer, self._epoch = sealer, epoch

    def lock(self) -> None:
        self._sealer = None

    def sealer(self) -> Sealer:
        if self._sealer is None:
            raise StorageError("the store is locked: no root key")
        return self._sealer

    def _sealing(self) -> tuple[Sealer, int]:
        """What a write seals with now, and the key epoch stored with what it seals."""
        return self.sealer(), self._epoch

    def _open(self, sealed: bytes, aad: bytes, epoch: int, what: str) -> bytes:
        if epoch != self._epoch:
            raise TamperedData(f"{what} is sealed under key epoch {epoch}, the current key is {self._epoch}")
        try:
            return self.sealer().open(sealed, aad)
        except TamperedData as exc:
            raise TamperedData(f"{what}: {exc} (tampered with, or moved from another path)") from None

    # ------------------------------------------------------------------ secret reads
    # sqlite3 and psycopg both give BLOB/bytea columns as bytes: rows are used as they come.

    def get(self, path: str, version: int) -> tuple[int, dict[str, str]]:
        statement = self._sql.value
        row = self._read(lambda c: c.execute(statement, {"path": path, "version": version}).fetchone(), path)
        if row is None:
            raise kv.NotFound("no such secret or version")
        found, sealed, deleted_at, epoch = row
        if sealed is None or deleted_at is not None:
            raise kv.NotFound("this version is deleted or destroyed")
        plaintext = self._open(sealed, secret_aad(path, found), epoch, f"{path} version {found}")
        return found, _values_decoder.decode(plaintext)

    def metadata(self, path: str) -> tuple[kv.SecretMeta, list[kv.VersionInfo]]:
        read_metadata = self._dialect.read_metadata
        row, versions = self._read(lambda c: read_metadata(c, path), f"the metadata of {path}")
        if row is None:
            raise kv.NotFound("no such secret")
        current, oldest, max_versions, cas_required, created, updated, custom_sealed = row
        custom: dict[str, str] = {}
        if custom_sealed is not None:
            custom = _values_decoder.decode(
                self._open(custom_sealed, metadata_aad(path), self._epoch, f"{path} metadata")
            )
        meta = kv.SecretMeta(path, current, oldest, max_versions, bool(cas_required), created, updated, custom)
        return meta, versions

    def list_paths(self, prefix: str, *, limit: int, after: str = "") -> list[str]:
        """Paths that start with `prefix`, in order, after `after`, at most `limit`.

        A range scan of the primary key: cost grows with the page returned,
        not with the number of secrets stored.
        """
        params: dict[str, Any] = {"prefix": prefix, "after": after, "limit": limit}
        if prefix:
            params["end"] = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        sql = self._sql
        if after and after >= prefix:
            statement = sql.paths_after_below if prefix else sql.paths_after
        else:
            statement = sql.paths_from_below if prefix else sql.paths_from
        rows = self._read(lambda c: c.execute(statement, params).fetchall(), f"the paths under {prefix!r}")
        return [p for (p,) in rows]

    def count(self) -> int:
        statement = self._sql.count
        return int(self._read(lambda c: c.execute(statement, {}).fetchone(), "the number of secrets")[0])

    # ------------------------------------------------------------------ policy reads

    def policy_rows(self) -> list[PolicyRow]:
        statement = self._sql.policies
        rows: list[PolicyRow] = self._read(lambda c: c.execute(statement, {}).fetchall(), "the policies")
        return rows

    def policy_row(self, id_or_name: str) -> PolicyRow | None:
        statement = self._sql.policy
        row: PolicyRow | None = self._read(
            lambda c: c.execute(statement, {"x": id_or_name}).fetchone(), f"policy {id_or_name}"
        )
        return row

    def policy_names(self) -> list[tuple[str, str]]:
        statement = self._sql.policy_names
        return [(i, n) for i, n in self._read(lambda c: c.execute(statement, {}).fetchall(), "the policy names")]

    def policy_version(self) -> int:
        statement = self._sql.policy_version
        row = self._read(lambda c: c.execute(statement, {}).fetchone(), "the policies' change counter")
        return 0 if row is None else int(row[0])

    # ------------------------------------------------------------------ secret writes

    def put(self, path: str, values: dict[str, str], cas: int | None) -> Future[int]:
        plaintext = _values_encoder.encode(values)
        sealer, epoch = self._sealing()
        default = self.default_max_versions
        dialect, sql = self._dialect, self._sql

        def op(conn: C) -> int:
            now = time.time()
            meta, stored = dialect.read_for_write(conn, path)
            plan = kv.plan_put(meta, stored, path=path, cas=cas, now=now, default_max_versions=default)
            sealed = sealer.seal(plaintext, secret_aad(path, plan.version))
            # Refusals are above this line: nothing is written for a refused put.
            row = {"path": path, "version": plan.version, "oldest": plan.meta.oldest_version, "now": now}
            row["sealed"], row["epoch"] = sealed, epoch  # one dict for both: a statement takes the names it has
            with dialect.pipeline(conn):
                conn.execute(sql.put_current, row)
                conn.execute(sql.put_version, row)
                if plan.pruned:
                    dialect.for_each_version(conn, sql.prune_versions, {"path": path}, plan.pruned)
            return plan.version

        return self._submit(op, path=path, epoch=epoch)

    def delete(self, path: str, versions: list[int]) -> Future[None]:
        return self._mark(path, versions, self._sql.mark_deleted)

    def undelete(self, path: str, versions: list[int]) -> Future[None]:
        return self._mark(path, versions, self._sql.mark_undeleted)

    def destroy(self, path: str, versions: list[int]) -> Future[None]:
        return self._mark(path, versions, self._sql.mark_destroyed)

    def _mark(self, path: str, versions: list[int], statement: str) -> Future[None]:
        dialect, sql = self._dialect, self._sql

        def op(conn: C) -> None:
            row = conn.execute(sql.meta, {"path": path}).fetchone()
            if row is None:
                raise kv.NotFound("no such secret")
            current, oldest, max_versions, cas_required, created, updated = row
            meta = kv.SecretMeta(path, current, oldest, max_versions, bool(cas_required), created, updated)
            params = {"path": path, "now": time.time()}
            dialect.for_each_version(conn, statement, params, kv.targets(meta, versions))
            conn.execute(sql.touch_path, params)

        return self._submit(op, path=path, epoch=None)

    def update_metadata(
        self,
        path: str,
        *,
        max_versions: int | None,
        cas_required: bool | None,
        custom_metadata: dict[str, str] | None,
    ) -> Future[None]:
        sealed_custom = None
        epoch = None
        if custom_metadata is not None:
            sealer, epoch = self._sealing()
            sealed_custom = sealer.seal(_values_encoder.encode(custom_metadata), metadata_aad(path))
        sql = self._sql

        def op(conn: C) -> None:
            params = {
                "path": path,
                "now": time.time(),
                "max_versions": max_versions,
                "cas_required": cas_required,
                "custom": sealed_custom,
            }
            conn.execute(sql.create_path, params)
            conn.execute(sql.update_metadata, params)

        return self._submit(op, path=path, epoch=epoch)

    def delete_all(self, path: str) -> Future[None]:
        """Remove a secret with every version and its metadata."""
        sql = self._sql

        def op(conn: C) -> None:
            if conn.execute(sql.delete_path, {"path": path}).rowcount == 0:
                raise kv.NotFound("no such secret")
            conn.execute(sql.delete_versions, {"path": path})

        return self._submit(op, path=path, epoch=None)

    # ------------------------------------------------------------------ policy writes

    def policy_put(
        self, name: str, seal: Callable[[str], bytes], *, create_only: bool, new_id: Callable[[], str]
    ) -> Future[tuple[str, bool]]:
        epoch = self._epoch  # `seal` seals with this epoch's key
        sql = self._sql

        def op(conn: C) -> tuple[str, bool]:
            now = time.time()
            row = conn.execute(sql.policy_named, {"name": name}).fetchone()
            if row is not None:
                if create_only:
                    raise PolicyNameTaken(f"a policy named {name} exists")
                (policy_id,) = row
                conn.execute(sql.replace_policy, {"id": policy_id, "sealed": seal(policy_id), "now": now})
                conn.execute(sql.bump_policies, {})
                return policy_id, False
            (count,) = conn.execute(sql.policy_count, {}).fetchone()
            if count >= MAX_POLICIES:
                raise kv.InvalidRequest(f"at most {MAX_POLICIES} policies")
            policy_id = new_id()
            conn.execute(sql.insert_policy, {"id": policy_id, "name": name, "sealed": seal(policy_id), "now": now})
            conn.execute(sql.bump_policies, {})
            return policy_id, True

        return self._submit(op, path=None, epoch=epoch)

    def policy_delete(self, id_or_name: str) -> Future[None]:
        sql = self._sql

        def op(conn: C) -> None:
            row = conn.execute(sql.policy, {"x": id_or_name}).fetchone()
            if row is None:
                raise kv.NotFound("no such policy")
            conn.execute(sql.delete_policy, {"id": row[0]})
            conn.execute(sql.bump_policies, {})

        return self._submit(op, path=None, epoch=None)

    def policy_reseal(self, policy_id: str, expected: bytes, sealed: bytes) -> Future[bool]:
        epoch = self._epoch  # `sealed` was sealed with this epoch's key
        sql = self._sql

        def op(conn: C) -> bool:
            changed = conn.execute(
                sql.reseal_policy, {"id": policy_id, "sealed": sealed, "expected": expected}
            ).rowcount
            if changed:
                conn.execute(sql.bump_policies, {})
            return bool(changed)

        return self._submit(op, path=None, epoch=epoch)
