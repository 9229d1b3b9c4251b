"""PostgreSQL's SQL: its side of the shared statements, and what only it runs (locks, outcomes).

A put's read is one round trip: a secret's metadata with its version
numbers as an array.  Its writes after that read go in one pipeline (one
round trip; the server still runs them one after the other).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import psycopg

from spike.app.model import kv
from spike.app.store.sql_store import MetaRow, VersionRow
from spike.app.store.statements import SQL

# Advisory lock ids (one 64-bit space per database).  Path locks are hashes, far from these.
LOCK_EPOCH = 0x5350_494B_0001
LOCK_POLICIES = 0x5350_494B_0002
LOCK_MIGRATE = 0x5350_494B_0003
LOCK_REWRAP = 0x5350_494B_0004  # a session lock: the instance holding it runs the re-wrap (data_keys.py)

# For a write: the secret's metadata and stored versions, in one round trip.
SELECT_FOR_WRITE = (
    "SELECT s.current_version, s.oldest_version, s.max_versions, s.cas_required, s.created_at, s.updated_at, "
    "ARRAY(SELECT v.version FROM secret_version AS v WHERE v.path = s.path ORDER BY v.version) "
    "FROM secret AS s WHERE s.path = %s"
)
SELECT_METADATA = (
    "SELECT s.current_version, s.oldest_version, s.max_versions, s.cas_required, s.created_at, s.updated_at, "
    "s.custom_metadata, s.custom_term, "
    "ARRAY(SELECT v.version FROM secret_version AS v WHERE v.path = s.path ORDER BY v.version), "
    "ARRAY(SELECT v.created_at FROM secret_version AS v WHERE v.path = s.path ORDER BY v.version), "
    "ARRAY(SELECT v.deleted_at FROM secret_version AS v WHERE v.path = s.path ORDER BY v.version), "
    "ARRAY(SELECT v.sealed IS NULL FROM secret_version AS v WHERE v.path = s.path ORDER BY v.version), "
    "ARRAY(SELECT v.key_term FROM secret_version AS v WHERE v.path = s.path ORDER BY v.version), "
    "ARRAY(SELECT v.key_epoch FROM secret_version AS v WHERE v.path = s.path ORDER BY v.version) "
    "FROM secret AS s WHERE s.path = %s"
)

# The writer's transaction: shared on the key epoch, then exclusive on every path (or the policies) it
# writes, in one global order; then, a statement of its own after the locks (a new snapshot), the first
# data-key term still in force (terms below it went with a root key replaced by bootstrap --force) and the
# transaction's id.
LOCK_EPOCH_SHARED = "SELECT pg_advisory_xact_lock_shared(%s)"
LOCK_KEYS = "SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) AS k"
FIRST_TERM_AND_XID = "SELECT (SELECT first_term FROM key_record WHERE id = 1), pg_current_xact_id()::text"
XACT_STATUS = "SELECT pg_xact_status(%s::xid8)"

LOCK = "SELECT pg_advisory_xact_lock(%s)"
TRY_LOCK = "SELECT pg_try_advisory_lock(%s)"


def path_lock(path: str) -> int:
    """The advisory lock id of a secret path (a hash: two paths may share one, which only serialises them)."""
    digest = hashlib.blake2b(path.encode(), digest_size=8, person=b"spike-path").digest()
    return int.from_bytes(digest, "big", signed=True)


Conn = psycopg.Connection[Any]


class PostgresDialect:
    sql = SQL.rendered("%%(%s)s", "= ANY(:%s)")  # psycopg's named parameters; lists bound as arrays

    def for_each_version(self, conn: Conn, statement: str, params: dict[str, Any], versions: Sequence[int]) -> None:
        conn.execute(statement, {**params, "versions": list(versions)})

    def read_for_write(self, conn: Conn, path: str) -> tuple[kv.SecretMeta | None, list[int]]:
        row = conn.execute(SELECT_FOR_WRITE, (path,)).fetchone()
        if row is None:
            return None, []
        current, oldest, max_versions, cas_required, created, updated, versions = row
        return kv.SecretMeta(path, current, oldest, max_versions, cas_required, created, updated), list(versions)

    def read_metadata(self, conn: Conn, path: str) -> tuple[MetaRow | None, list[VersionRow]]:
        row = conn.execute(SELECT_METADATA, (path,)).fetchone()
        if row is None:
            return None, []
        current, oldest, max_versions, cas_required, created, updated, custom, custom_term, *columns = row
        meta: MetaRow = (current, oldest, max_versions, cas_required, created, updated, custom, custom_term)
        return meta, [(v, c, d, bool(x), t, e) for v, c, d, x, t, e in zip(*columns, strict=True)]

    def pipeline(self, conn: Conn) -> AbstractContextManager[Any]:
        return conn.pipeline()
