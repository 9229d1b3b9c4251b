"""Secrets and policies on SQL, once for both databases: the data key, the reads and the writes.

`SqlStore` is what SQLite and PostgreSQL share: every key/value and policy
operation, written once against the statements of statements.py and the
decisions of model/kv.py.  A backend adds how it runs them:

* `_read(work, what)`: run one read on a connection (SQLite: its reader
  connection, on the caller's thread; PostgreSQL: a pooled connection, with
  outage handling);
* `_submit(op, path=..., term=...)`: queue one write for its writer thread,
  which runs `op` inside a group-committed transaction (sqlite.py,
  postgres_writer.py) and settles the future after the commit;
* its `Dialect`: what the SQL cannot say the same way in both (how a list of
  versions is bound, how a write reads a secret's versions, whether a write's
  statements go in one round trip).

A write's operation first reads what it needs and asks model/kv.py what to
do; a refusal (`kv.KvError`) is raised before the operation writes anything.

Sealing goes through one place, here: the keyring of data keys (keyring.py),
loaded (or made, the first time) by `unlock` with the root key, and read
again when a value names a term it has not seen (another instance rotated
the data key).  `_sealing()` gives what a write seals with and the term its
row is labelled with; `_open` opens a stored value after checking that its
label and its blob name the same term; `seal_value`/`open_value` are the same
for what is sealed outside the tables' rows here (policy bodies, list cursors).
The key record and the rotation state are `KeyState`'s (key_state.py).
"""

from __future__ import annotations

import logging
import time
from abc import ABC
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar

import msgspec

from spike.app.model import kv
from spike.app.model.policy import MAX_POLICIES
from spike.app.store.backend import PolicyRow
from spike.app.store.data_keys import DataKeys, label
from spike.app.store.key_state import C, Connection
from spike.app.store.read_cache import ReadCache
from spike.app.store.sealing import DataKeyGone, metadata_aad, secret_aad
from spike.app.store.statements import Statements

log = logging.getLogger("spike.nexus.store")

T = TypeVar("T")

_values_encoder = msgspec.json.Encoder()
_values_decoder = msgspec.json.Decoder(dict[str, str])


C_contra = TypeVar("C_contra", bound=Connection, contravariant=True)

# How a stored value is opened: (sealed, aad, data-key term, what it is for messages, key epoch) -> plaintext.
Opener = Callable[[bytes, bytes, int, str, int], bytes]

# current_version, oldest_version, max_versions, cas_required, created_at, updated_at, sealed custom metadata,
# its data-key term
MetaRow = tuple[int, int, int, Any, float, float, bytes | None, int]
# version, created_at, deleted_at, destroyed, data-key term, key epoch
VersionRow = tuple[int, float, float | None, bool, int, int]


class Dialect(Protocol[C_contra]):
    """What the two databases do differently, for statements that are otherwise the same."""

    sql: Statements  # statements.py's, rendered for this driver

    def for_each_version(self, conn: C_contra, statement: str, params: dict[str, Any], versions: Sequence[int]) -> None:
        """Run a statement with `= ANY(:versions)` for these versions."""
        ...

    def read_for_write(self, conn: C_contra, path: str) -> tuple[kv.SecretMeta | None, list[int]]:
        """A secret's metadata (without its custom metadata) and stored version numbers, or (None, [])."""
        ...

    def read_metadata(self, conn: C_contra, path: str) -> tuple[MetaRow | None, list[VersionRow]]:
        """A secret's metadata row and its versions' rows, in order."""
        ...

    def pipeline(self, conn: C_contra) -> AbstractContextManager[Any]:
        """The statements run inside go to the database in one round trip (a put's writes).

        Only for three statements or more: on loopback, psycopg's pipeline costs more than one round
        trip saves, so the two-statement writes do without it."""
        ...


def _first_few(paths: list[str], names: list[str], most: int = 5) -> str:
    """The clashes an import refusal names (paths and policy names, never a value), at most `most` of each."""
    parts = []
    for what, items in (("secret path", paths), ("policy", names)):
        if items:
            more = f" and {len(items) - most} more" if len(items) > most else ""
            parts.append(f"{what}(s) {', '.join(repr(i) for i in items[:most])}{more}")
    return "; ".join(parts)


class PolicyNameTaken(kv.InvalidRequest):
    status = 409
    code = "api_conflict"


class SqlStore(DataKeys[C], ABC):
    """Secrets and policies on a SQL database; a backend provides `_read`, `_submit`, the key state's
    `_key_read`/`_key_change` and its `Dialect`."""

    read_cache: ReadCache | None = None  # PostgreSQL's, when it keeps one

    def __init__(self, dialect: Dialect[C], *, default_max_versions: int) -> None:
        super().__init__()
        self._dialect = dialect
        self._sql = dialect.sql
        self.default_max_versions = default_max_versions

    # ------------------------------------------------------------------ secret reads
    # sqlite3 and psycopg both give BLOB/bytea columns as bytes: rows are used as they come.

    def get(self, path: str, version: int) -> tuple[int, dict[str, str]]:
        return self._value(path, self._value_row(path, version), self._open)

    def cached_get(self, path: str, version: int) -> tuple[int, dict[str, str]] | None:
        """What `get` would answer, if it can be answered at once from memory (no I/O); None: call `get`."""
        return None

    def _value_row(self, path: str, version: int) -> Any:
        statement = self._sql.value
        return self._read(lambda c: c.execute(statement, {"path": path, "version": version}).fetchone(), path)

    @staticmethod
    def _value(path: str, row: Any, opener: Opener) -> tuple[int, dict[str, str]]:
        """`get`'s answer from the value statement's row (None: there was none)."""
        if row is None:
            raise kv.NotFound("no such secret or version")
        found, sealed, deleted_at, epoch, term = row
        if sealed is None or deleted_at is not None:
            raise kv.NotFound("this version is deleted or destroyed")
        plaintext = opener(sealed, secret_aad(path, found), term, f"{path} version {found}", epoch)
        return found, _values_decoder.decode(plaintext)

    def metadata(self, path: str) -> tuple[kv.SecretMeta, list[kv.VersionInfo]]:
        """A secret's metadata and versions; a version (or custom metadata) sealed under a data key that no
        longer exists is shown as unreadable, never as live."""
        read_metadata = self._dialect.read_metadata
        row, rows = self._read(lambda c: read_metadata(c, path), f"the metadata of {path}")
        if row is None:
            raise kv.NotFound("no such secret")
        current, oldest, max_versions, cas_required, created, updated, custom_sealed, custom_term = row
        custom: dict[str, str] = {}
        custom_gone = False
        if custom_sealed is not None:
            try:
                custom = _values_decoder.decode(
                    self._open(custom_sealed, metadata_aad(path), custom_term, f"{path} metadata")
                )
            except DataKeyGone as exc:
                log.warning("%s", exc)
                custom_gone = True
        meta = kv.SecretMeta(
            path, current, oldest, max_versions, bool(cas_required), created, updated, custom, custom_gone
        )
        keyring = self.keyring()
        first, legacy = keyring.first, keyring.legacy_epoch
        # Unreadable: a value (not destroyed) under a term older than every term held, or of the legacy term
        # when it is gone or the value was another root key's (inline: this runs once per version).
        versions = [
            kv.VersionInfo(v, c, d, x, not x and (t < first if t else legacy is None or e != legacy))
            for v, c, d, x, t, e in rows
        ]
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
        sealer, term, epoch = self._sealing()
        default = self.default_max_versions
        dialect, sql = self._dialect, self._sql

        def op(conn: C) -> int:
            now = time.time()
            meta, stored = dialect.read_for_write(conn, path)
            plan = kv.plan_put(meta, stored, path=path, cas=cas, now=now, default_max_versions=default)
            sealed = sealer.seal(plaintext, secret_aad(path, plan.version))
            # Refusals are above this line: nothing is written for a refused put.
            row = {"path": path, "version": plan.version, "oldest": plan.meta.oldest_version, "now": now}
            # One dict for both statements: each takes the names it has.
            row["sealed"], row["epoch"], row["term"] = sealed, epoch, term
            with dialect.pipeline(conn):
                conn.execute(sql.put_current, row)
                conn.execute(sql.put_version, row)
                if plan.pruned:
                    dialect.for_each_version(conn, sql.prune_versions, {"path": path}, plan.pruned)
            return plan.version

        return self._submit(op, path=path, term=term)

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

        return self._submit(op, path=path, term=None)

    def update_metadata(
        self,
        path: str,
        *,
        max_versions: int | None,
        cas_required: bool | None,
        custom_metadata: dict[str, str] | None,
    ) -> Future[None]:
        sealed_custom = None
        term = None
        if custom_metadata is not None:
            sealer, term, _ = self._sealing()
            sealed_custom = sealer.seal(_values_encoder.encode(custom_metadata), metadata_aad(path))
        sql = self._sql

        def op(conn: C) -> None:
            params = {
                "path": path,
                "now": time.time(),
                "max_versions": max_versions,
                "cas_required": cas_required,
                "custom": sealed_custom,
                "custom_term": term,
            }
            conn.execute(sql.create_path, params)
            conn.execute(sql.update_metadata, params)

        return self._submit(op, path=path, term=term)

    def delete_all(self, path: str) -> Future[None]:
        """Remove a secret with every version and its metadata."""
        sql = self._sql

        def op(conn: C) -> None:
            if conn.execute(sql.delete_path, {"path": path}).rowcount == 0:
                raise kv.NotFound("no such secret")
            conn.execute(sql.delete_versions, {"path": path})

        return self._submit(op, path=path, term=None)

    # ------------------------------------------------------------------ imports (`spike migrate`)

    def import_batch(
        self, secrets: Sequence[kv.ImportedSecret], policies: Sequence[PolicyRow], *, merge: bool
    ) -> Future[None]:
        """Every secret (each version sealed here) and policy row (sealed by the caller) in one write, or none.

        Refused (`kv.ImportConflict`, before anything is written) unless the store holds no secret and no
        policy, or with `merge`, unless no path and no policy name is already there.  Version numbers and
        times are kept; the secret's current version is its newest one.
        """
        sealer, term, epoch = self._sealing()
        sealed = [
            [sealer.seal(_values_encoder.encode(v.values), secret_aad(secret.path, v.version)) for v in secret.versions]
            for secret in secrets
        ]
        terms = {label(row[2]) for row in policies}
        sql = self._sql

        def op(conn: C) -> None:
            (stored_policies,) = conn.execute(sql.policy_count, {}).fetchone()
            if not merge:
                (stored_secrets,) = conn.execute(sql.count, {}).fetchone()
                if stored_secrets or stored_policies:
                    raise kv.ImportConflict(
                        f"Nexus already holds {stored_secrets} secret(s) and {stored_policies} policy(ies): "
                        "nothing was imported (merge to add to them)"
                    )
            else:
                paths = [s.path for s in secrets if conn.execute(sql.path_exists, {"path": s.path}).fetchone()]
                names = [r[1] for r in policies if conn.execute(sql.policy_named, {"name": r[1]}).fetchone()]
                if paths or names:
                    raise kv.ImportConflict(f"already in Nexus, nothing was imported: {_first_few(paths, names)}")
            if stored_policies + len(policies) > MAX_POLICIES:
                raise kv.InvalidRequest(f"at most {MAX_POLICIES} policies")
            # Refusals are above this line: an import is written whole or not at all.
            for secret, blobs in zip(secrets, sealed, strict=True):
                conn.execute(
                    sql.import_path,
                    {
                        "path": secret.path,
                        "current": secret.current_version,
                        "oldest": secret.oldest_version,
                        "max_versions": secret.max_versions,
                        "created": secret.created_at,
                        "updated": secret.updated_at,
                    },
                )
                for version, blob in zip(secret.versions, blobs, strict=True):
                    row = {"path": secret.path, "version": version.version, "sealed": blob}
                    row |= {"created": version.created_at, "deleted": version.deleted_at}
                    row |= {"epoch": epoch, "term": term}
                    conn.execute(sql.import_version, row)
            for policy_id, name, body, created, updated in policies:
                row = {"id": policy_id, "name": name, "sealed": body, "created": created, "updated": updated}
                conn.execute(sql.import_policy, row | {"term": label(body)})
            if policies:
                conn.execute(sql.bump_policies, {})

        # The oldest term sealed under: a keyring replaced meanwhile refuses the whole import (PostgreSQL).
        return self._submit_import(op, [s.path for s in secrets], min({term, *terms}))

    def _submit_import(self, op: Callable[[C], None], paths: list[str], term: int) -> Future[None]:
        """Queue an import: one database serialises every write already (SQLite); PostgreSQL locks its paths."""
        return self._submit(op, path=None, term=term)

    # ------------------------------------------------------------------ policy writes

    def policy_put(
        self, name: str, seal: Callable[[str], bytes], *, create_only: bool, new_id: Callable[[], str]
    ) -> Future[tuple[str, bool]]:
        term = self.keyring().active  # what `seal` seals under
        sql = self._sql

        def op(conn: C) -> tuple[str, bool]:
            now = time.time()
            row = conn.execute(sql.policy_named, {"name": name}).fetchone()
            if row is not None:
                if create_only:
                    raise PolicyNameTaken(f"a policy named {name} exists")
                (policy_id,) = row
                sealed = seal(policy_id)
                params = {"id": policy_id, "sealed": sealed, "now": now, "term": label(sealed)}
                conn.execute(sql.replace_policy, params)
                conn.execute(sql.bump_policies, {})
                return policy_id, False
            (count,) = conn.execute(sql.policy_count, {}).fetchone()
            if count >= MAX_POLICIES:
                raise kv.InvalidRequest(f"at most {MAX_POLICIES} policies")
            policy_id = new_id()
            sealed = seal(policy_id)
            row = {"id": policy_id, "name": name, "sealed": sealed, "now": now, "term": label(sealed)}
            conn.execute(sql.insert_policy, row)
            conn.execute(sql.bump_policies, {})
            return policy_id, True

        return self._submit(op, path=None, term=term)

    def policy_delete(self, id_or_name: str) -> Future[None]:
        sql = self._sql

        def op(conn: C) -> None:
            row = conn.execute(sql.policy, {"x": id_or_name}).fetchone()
            if row is None:
                raise kv.NotFound("no such policy")
            conn.execute(sql.delete_policy, {"id": row[0]})
            conn.execute(sql.bump_policies, {})

        return self._submit(op, path=None, term=None)

    def policy_reseal(self, policy_id: str, expected: bytes, sealed: bytes) -> Future[bool]:
        term = label(sealed)
        sql = self._sql

        def op(conn: C) -> bool:
            params = {"id": policy_id, "sealed": sealed, "expected": expected, "term": term}
            changed = conn.execute(sql.reseal_policy, params).rowcount
            if changed:
                conn.execute(sql.bump_policies, {})
            return bool(changed)

        return self._submit(op, path=None, term=term)
