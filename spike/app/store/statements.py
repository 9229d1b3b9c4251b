"""The SQL both databases run for secrets and policies, written once.

Both schemas have the same tables and columns (sqlite_schema.py, postgres_schema.py), so a statement
differs between them only in how its parameters are written.  Here they are named, `:path`, which is
how sqlite3 takes them; `render` turns them into psycopg's `%(path)s`.  `ANY(:versions)` is a list of
versions: PostgreSQL binds the list once as an array, while SQLite, which has no arrays, runs the
statement once per version (`= :versions`), a primary key search each (tests/store/test_store_scale.py
checks the plans).  What really differs (PostgreSQL reads a secret's versions as an array in the same
round trip) is in each dialect: sqlite_sql.py, postgres_sql.py.
"""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec

_PARAMETER = re.compile(r"(?<![:\w]):(\w+)")
_VERSIONS = re.compile(r"= ANY\(:(\w+)\)")

_POLICY_COLUMNS = "SELECT id, name, sealed, created_at, updated_at FROM policy"


class Statements(msgspec.Struct, frozen=True):
    # reads
    value: str = (
        "SELECT v.version, v.sealed, v.deleted_at, v.key_epoch, v.key_term FROM secret AS s "
        "JOIN secret_version AS v ON v.path = s.path "
        "AND v.version = CASE WHEN :version = 0 THEN s.current_version ELSE :version END WHERE s.path = :path"
    )
    # For a write that needs no version numbers: the secret's metadata, without its custom metadata.
    meta: str = (
        "SELECT current_version, oldest_version, max_versions, cas_required, created_at, updated_at "
        "FROM secret WHERE path = :path"
    )
    count: str = "SELECT count(*) FROM secret"
    # Listing by prefix is a range of the primary key: from the prefix (or after a path), below the
    # prefix's successor when there is a prefix.
    paths_from: str = "SELECT path FROM secret WHERE path >= :prefix ORDER BY path LIMIT :limit"
    paths_from_below: str = "SELECT path FROM secret WHERE path >= :prefix AND path < :end ORDER BY path LIMIT :limit"
    paths_after: str = "SELECT path FROM secret WHERE path > :after ORDER BY path LIMIT :limit"
    paths_after_below: str = "SELECT path FROM secret WHERE path > :after AND path < :end ORDER BY path LIMIT :limit"
    policies: str = f"{_POLICY_COLUMNS} ORDER BY name"
    # One row for an id or a name, the id first (ids are random; names are chosen by people).
    policy: str = f"{_POLICY_COLUMNS} WHERE id = :x OR name = :x ORDER BY id = :x DESC LIMIT 1"
    policy_names: str = "SELECT id, name FROM policy ORDER BY name"
    policy_version: str = "SELECT version FROM policy_version WHERE id = 1"

    # secret writes
    put_current: str = (
        "INSERT INTO secret (path, current_version, oldest_version, max_versions, cas_required, created_at, "
        "updated_at, custom_metadata) VALUES (:path, :version, :oldest, 0, FALSE, :now, :now, NULL) "
        "ON CONFLICT (path) DO UPDATE SET current_version = :version, oldest_version = :oldest, updated_at = :now"
    )
    put_version: str = (
        "INSERT INTO secret_version (path, version, sealed, created_at, deleted_at, key_epoch, key_term) "
        "VALUES (:path, :version, :sealed, :now, NULL, :epoch, :term)"
    )
    prune_versions: str = "DELETE FROM secret_version WHERE path = :path AND version = ANY(:versions)"
    # Marks leave destroyed versions alone.
    mark_deleted: str = (
        "UPDATE secret_version SET deleted_at = :now "
        "WHERE path = :path AND version = ANY(:versions) AND sealed IS NOT NULL"
    )
    mark_undeleted: str = (
        "UPDATE secret_version SET deleted_at = NULL "
        "WHERE path = :path AND version = ANY(:versions) AND sealed IS NOT NULL"
    )
    mark_destroyed: str = (
        "UPDATE secret_version SET sealed = NULL WHERE path = :path AND version = ANY(:versions) AND sealed IS NOT NULL"
    )
    touch_path: str = "UPDATE secret SET updated_at = :now WHERE path = :path"
    # Like Vault, metadata may be written before the first version.
    create_path: str = (
        "INSERT INTO secret (path, current_version, oldest_version, max_versions, cas_required, created_at, "
        "updated_at, custom_metadata) VALUES (:path, 0, 0, 0, FALSE, :now, :now, NULL) ON CONFLICT (path) DO NOTHING"
    )
    # A NULL parameter leaves its column as it is.
    update_metadata: str = (
        "UPDATE secret SET max_versions = COALESCE(:max_versions, max_versions), "
        "cas_required = COALESCE(:cas_required, cas_required), "
        "custom_metadata = COALESCE(:custom, custom_metadata), custom_term = COALESCE(:custom_term, custom_term), "
        "updated_at = :now WHERE path = :path"
    )
    delete_path: str = "DELETE FROM secret WHERE path = :path"
    # An import (`spike migrate`) keeps the source's version numbers and times.
    path_exists: str = "SELECT 1 FROM secret WHERE path = :path"
    import_path: str = (
        "INSERT INTO secret (path, current_version, oldest_version, max_versions, cas_required, created_at, "
        "updated_at, custom_metadata) VALUES (:path, :current, :oldest, :max_versions, FALSE, :created, :updated, NULL)"
    )
    import_version: str = (
        "INSERT INTO secret_version (path, version, sealed, created_at, deleted_at, key_epoch, key_term) "
        "VALUES (:path, :version, :sealed, :created, :deleted, :epoch, :term)"
    )
    delete_versions: str = "DELETE FROM secret_version WHERE path = :path"

    # policy writes
    policy_named: str = "SELECT id FROM policy WHERE name = :name"
    policy_count: str = "SELECT count(*) FROM policy"
    replace_policy: str = "UPDATE policy SET sealed = :sealed, key_term = :term, updated_at = :now WHERE id = :id"
    insert_policy: str = (
        "INSERT INTO policy (id, name, sealed, created_at, updated_at, key_term) "
        "VALUES (:id, :name, :sealed, :now, :now, :term)"
    )
    import_policy: str = (
        "INSERT INTO policy (id, name, sealed, created_at, updated_at, key_term) "
        "VALUES (:id, :name, :sealed, :created, :updated, :term)"
    )
    delete_policy: str = "DELETE FROM policy WHERE id = :id"
    reseal_policy: str = "UPDATE policy SET sealed = :sealed, key_term = :term WHERE id = :id AND sealed = :expected"
    # Bumped in the transaction of every policy write: other instances reload their policies when it moves.
    bump_policies: str = "UPDATE policy_version SET version = version + 1 WHERE id = 1"

    # Re-wrap (data_keys.py): stored values below a data-key term, page by page in key order, and each
    # sealed again only if it is still what was read (a write meanwhile wins).
    rewrap_versions: str = (
        "SELECT path, version, sealed, key_term, key_epoch FROM secret_version "
        "WHERE (path, version) > (:path, :version) AND key_term < :target AND sealed IS NOT NULL "
        "ORDER BY path, version LIMIT :limit"
    )
    rewrap_version: str = (
        "UPDATE secret_version SET sealed = :new, key_term = :term "
        "WHERE path = :path AND version = :version AND sealed = :old"
    )
    rewrap_customs: str = (
        "SELECT path, custom_metadata, custom_term FROM secret "
        "WHERE path > :path AND custom_term < :target AND custom_metadata IS NOT NULL ORDER BY path LIMIT :limit"
    )
    rewrap_custom: str = (
        "UPDATE secret SET custom_metadata = :new, custom_term = :term WHERE path = :path AND custom_metadata = :old"
    )
    rewrap_policies: str = (
        "SELECT id, name, sealed, key_term FROM policy WHERE id > :path AND key_term < :target ORDER BY id LIMIT :limit"
    )
    rewrap_policy: str = "UPDATE policy SET sealed = :new, key_term = :term WHERE id = :path AND sealed = :old"
    # Stored values per data-key term: what a re-wrap has left to do, derived from the rows themselves.
    versions_by_term: str = "SELECT key_term, count(*) FROM secret_version WHERE sealed IS NOT NULL GROUP BY key_term"
    customs_by_term: str = (
        "SELECT custom_term, count(*) FROM secret WHERE custom_metadata IS NOT NULL GROUP BY custom_term"
    )
    policies_by_term: str = "SELECT key_term, count(*) FROM policy GROUP BY key_term"

    def rendered(self, parameter: str, versions: str) -> Statements:
        """These statements with `:name` written as `parameter % name` and `= ANY(:name)` as `versions % name`."""
        return rendered(self, parameter, versions)


S = TypeVar("S", bound=msgspec.Struct)


def render(sql: str, parameter: str, versions: str) -> str:
    """One statement with `:name` written as `parameter % name` and `= ANY(:name)` as `versions % name`."""
    if "%" in sql:  # psycopg would read it as a placeholder
        raise ValueError(f"a statement contains '%': {sql}")
    sql = _VERSIONS.sub(lambda m: versions % m.group(1), sql)
    return _PARAMETER.sub(lambda m: parameter % m.group(1), sql)


def rendered(statements: S, parameter: str, versions: str) -> S:
    """A struct of statements (this module's, key_state.py's) with each one rendered for a driver."""
    fields = {name: render(getattr(statements, name), parameter, versions) for name in statements.__struct_fields__}
    return type(statements)(**fields)


SQL = Statements()
