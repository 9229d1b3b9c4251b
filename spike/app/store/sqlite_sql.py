"""SQLite's SQL: its side of the shared statements (statements.py), and the reads only it words this way.

A local file: a round trip costs nothing, so a write reads a secret's metadata and versions in one
statement only because it is cheaper to run, and nothing is pipelined.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from spike.app.model import kv
from spike.app.store.sql_store import MetaRow, VersionRow
from spike.app.store.statements import SQL

_SELECT_META = (
    "SELECT current_version, oldest_version, max_versions, cas_required, created_at, updated_at, "
    "custom_metadata, custom_term FROM secret WHERE path = ?"
)
# For a write: the secret's metadata and stored versions ("1,2,3"), in one statement.
_SELECT_FOR_WRITE = (
    "SELECT s.current_version, s.oldest_version, s.max_versions, s.cas_required, s.created_at, s.updated_at, "
    "(SELECT group_concat(v.version) FROM secret_version AS v WHERE v.path = s.path) "
    "FROM secret AS s WHERE s.path = ?"
)
_SELECT_VERSION_INFO = (
    "SELECT version, created_at, deleted_at, sealed IS NULL, key_term, key_epoch FROM secret_version "
    "WHERE path = ? ORDER BY version"
)


_NO_PIPELINE = nullcontext()  # reusable: it holds nothing


class SqliteDialect:
    """SQLite's way with the shared statements."""

    sql = SQL.rendered(":%s", "= :%s")  # sqlite3 takes named parameters as they are written

    def for_each_version(
        self, conn: sqlite3.Connection, statement: str, params: dict[str, Any], versions: Sequence[int]
    ) -> None:
        conn.executemany(statement, [{**params, "versions": v} for v in versions])

    def read_for_write(self, conn: sqlite3.Connection, path: str) -> tuple[kv.SecretMeta | None, list[int]]:
        row = conn.execute(_SELECT_FOR_WRITE, (path,)).fetchone()
        if row is None:
            return None, []
        current, oldest, max_versions, cas_required, created, updated, versions = row
        meta = kv.SecretMeta(path, current, oldest, max_versions, bool(cas_required), created, updated)
        return meta, [int(v) for v in versions.split(",")] if versions else []

    def read_metadata(self, conn: sqlite3.Connection, path: str) -> tuple[MetaRow | None, list[VersionRow]]:
        row = conn.execute(_SELECT_META, (path,)).fetchone()
        if row is None:
            return None, []
        versions = conn.execute(_SELECT_VERSION_INFO, (path,)).fetchall()
        return row, [(v, c, d, bool(x), t, e) for v, c, d, x, t, e in versions]

    def pipeline(self, conn: sqlite3.Connection) -> AbstractContextManager[Any]:
        return _NO_PIPELINE
