"""Nexus's tables in PostgreSQL, versioned in a table of their own and migrated forward at start.

The same tables and columns as SQLite (sqlite_schema.py), so that both run
the statements of statements.py.  Paths and names compare byte by byte
("C"), as in SQLite: listing by prefix is a range scan.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from spike.app.store.errors import StorageError
from spike.app.store.postgres_sql import LOCK_MIGRATE

log = logging.getLogger("spike.nexus.store")

# Entry i moves the schema from version i to i + 1, in one transaction.  Released entries never change.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE key_record (
            id integer PRIMARY KEY CHECK (id = 1),
            epoch bigint NOT NULL,
            record bytea NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now()
        )""",
        """CREATE TABLE secret (
            path text COLLATE "C" PRIMARY KEY,
            current_version integer NOT NULL,
            oldest_version integer NOT NULL,
            max_versions integer NOT NULL,
            cas_required boolean NOT NULL,
            created_at double precision NOT NULL,
            updated_at double precision NOT NULL,
            custom_metadata bytea
        )""",
        """CREATE TABLE secret_version (
            path text COLLATE "C" NOT NULL,
            version integer NOT NULL,
            sealed bytea,
            created_at double precision NOT NULL,
            deleted_at double precision,
            key_epoch bigint NOT NULL,
            PRIMARY KEY (path, version)
        )""",
        """CREATE TABLE policy (
            id text COLLATE "C" PRIMARY KEY,
            name text COLLATE "C" NOT NULL UNIQUE,
            sealed bytea NOT NULL,
            created_at double precision NOT NULL,
            updated_at double precision NOT NULL
        )""",
        # Bumped by every policy write: other instances reload their policies when it moves.
        "CREATE TABLE policy_version (id integer PRIMARY KEY CHECK (id = 1), version bigint NOT NULL)",
        "INSERT INTO policy_version (id, version) VALUES (1, 0)",
    ),
    # Policies in RE2 and SPIKE's rules (policy dialect 2; old bodies are upgraded when first read with
    # the key, see policy_legacy): an older spike must not open this database and misread them.
    ("COMMENT ON TABLE policy IS 'sealed bodies in policy dialect 2 (RE2, SPIKE matching rules) or 1 (older)'",),
    # Key rotation (docs/key-lifecycle.md): the epochs' high-water mark (a record stored before it is its
    # own mark), the keyring of data keys wrapped under the root key, and the pending rotation.
    (
        "ALTER TABLE key_record ADD COLUMN highest_epoch bigint NOT NULL DEFAULT 0",
        "UPDATE key_record SET highest_epoch = epoch",
        "ALTER TABLE key_record ADD COLUMN keyring bytea",
        """CREATE TABLE pending_rotation (
            id integer PRIMARY KEY CHECK (id = 1),
            from_epoch bigint NOT NULL,
            epoch bigint NOT NULL,
            pending bytea NOT NULL,
            keyring bytea NOT NULL,
            created_at timestamptz NOT NULL
        )""",
    ),  # The keyring of data keys (keyring.py).  A value names its data-key term, also in a column of its
    # row (0: the legacy term, which every value stored before this has); terms are never reused
    # (highest_term), terms below first_term went with a root key replaced by bootstrap --force, and a
    # database stored before this has its values sealed under its record's root key (legacy_epoch: the
    # legacy term is made from it at the first unlock).  rewrap_target: the term a re-wrap of stored
    # values to the newest term is under way to, so that it resumes after a restart.  Columns added
    # with a constant default: no row is rewritten.
    (
        "ALTER TABLE key_record ADD COLUMN highest_term bigint NOT NULL DEFAULT 0",
        "ALTER TABLE key_record ADD COLUMN first_term bigint NOT NULL DEFAULT 0",
        "ALTER TABLE key_record ADD COLUMN legacy_epoch bigint",
        "UPDATE key_record SET legacy_epoch = epoch",
        "ALTER TABLE key_record ADD COLUMN rewrap_target bigint",
        "ALTER TABLE secret_version ADD COLUMN key_term bigint NOT NULL DEFAULT 0",
        "ALTER TABLE secret ADD COLUMN custom_term bigint NOT NULL DEFAULT 0",
        "ALTER TABLE policy ADD COLUMN key_term bigint NOT NULL DEFAULT 0",
    ),
    # The read cache (read_cache.py, postgres_changes.py): every change to a secret's rows, by any writer,
    # announces its path to the instances listening; a TRUNCATE, or a path too long for a notification's
    # payload (8000 bytes), announces '' (everything).  Identical notifications of one transaction are sent
    # once, so a put's two rows cost one.
    (
        """CREATE FUNCTION spike_secret_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            changed text := '';
        BEGIN
            IF TG_LEVEL = 'ROW' THEN
                changed := CASE WHEN TG_OP = 'DELETE' THEN OLD.path ELSE NEW.path END;
                IF octet_length(changed) > 7900 THEN
                    changed := '';
                END IF;
            END IF;
            PERFORM pg_notify('spike_secret_changes', changed);
            RETURN NULL;
        END
        $$""",
        "CREATE TRIGGER secret_changed AFTER INSERT OR UPDATE OR DELETE ON secret "
        "FOR EACH ROW EXECUTE FUNCTION spike_secret_changed()",
        "CREATE TRIGGER secret_version_changed AFTER INSERT OR UPDATE OR DELETE ON secret_version "
        "FOR EACH ROW EXECUTE FUNCTION spike_secret_changed()",
        "CREATE TRIGGER secret_truncated AFTER TRUNCATE ON secret "
        "FOR EACH STATEMENT EXECUTE FUNCTION spike_secret_changed()",
        "CREATE TRIGGER secret_version_truncated AFTER TRUNCATE ON secret_version "
        "FOR EACH STATEMENT EXECUTE FUNCTION spike_secret_changed()",
    ),
)

_CREATE_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS spike_schema (id integer PRIMARY KEY CHECK (id = 1), version integer NOT NULL)"
)
_SET_VERSION = (
    "INSERT INTO spike_schema (id, version) VALUES (1, %s) ON CONFLICT (id) DO UPDATE SET version = excluded.version"
)


def migrate(conn: psycopg.Connection[Any]) -> None:
    """Bring the schema to this spike's version; `StorageError` if it is newer than this spike knows."""
    with conn.transaction():
        # Instances started at once migrate one after the other.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_MIGRATE,))
        conn.execute(_CREATE_VERSION_TABLE)
        row = conn.execute("SELECT version FROM spike_schema WHERE id = 1").fetchone()
        version = 0 if row is None else int(row[0])
        if version > len(MIGRATIONS):
            raise StorageError(
                f"the database has schema version {version}, newer than this spike knows "
                f"({len(MIGRATIONS)}): upgrade spike"
            )
        for step in MIGRATIONS[version:]:
            for statement in step:
                conn.execute(statement)
        conn.execute(_SET_VERSION, (len(MIGRATIONS),))
    if 0 < version < len(MIGRATIONS):  # a new database's first schema is not news
        log.info("database schema upgraded from version %d to %d", version, len(MIGRATIONS))
