"""The keyring in the store, on SQLite and PostgreSQL: rotations re-wrap it only, bootstrap --force loses it (never
taken for tampering), databases written before it upgrade in place and keep every value readable."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from store_helpers import BACKENDS, EPOCH, OTHER_KEY, RECORD, ROOT_KEY, WAIT

from spike.app.model.policy import Permission
from spike.app.store.backend import Backend
from spike.app.store.errors import StorageError
from spike.app.store.keyring import LEGACY_TERM
from spike.app.store.policies import PolicyStore
from spike.app.store.sealing import DataKeyGone, Sealer, metadata_aad, policy_aad, secret_aad
from spike.app.store.sqlite_schema import DB_NAME
from spike.protocol.material import RootKey
from spike.protocol.pending import PendingRotation
from spike.protocol.record import KeyRecord, seal_key

THIRD_KEY = RootKey(bytes(range(3, 35)))


def rows(backend: Backend) -> list[Any]:
    """Every stored value and its label, in order: equal lists mean no value was written."""

    def read(conn: Any) -> list[Any]:
        versions = conn.execute("SELECT path, version, sealed, key_term FROM secret_version ORDER BY path, version")
        secrets = conn.execute("SELECT path, custom_metadata, custom_term FROM secret ORDER BY path")
        policies = conn.execute("SELECT id, sealed, key_term FROM policy ORDER BY id")
        return [[tuple(r) for r in c.fetchall()] for c in (versions, secrets, policies)]

    return getattr(backend, "_read")(read, "every row")  # noqa: B009


def rotate_root(backend: Backend, old_key: RootKey, new_key: RootKey) -> KeyRecord:
    """A root key rotation as Nexus drives it through the store: persisted, committed, the new key in use."""
    old = backend.load_key_record()
    assert old is not None
    new, _ = seal_key(new_key, epoch=old.epoch + 1, threshold=old.threshold, keeper_ids=list(old.keeper_ids))
    pending = PendingRotation.seal(old_key, old, new_key, new)
    assert backend.persist_rotation(pending, backend.keyring().wrap(new_key, new.epoch)) is True
    assert backend.commit_rotation(pending) is True
    backend.unlock(new_key, new.epoch)
    return pending.record


class WriteCount:
    """Counts the statements that change rows, on every connection the backend writes the key state through."""

    def __init__(self, backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.changes: list[str] = []
        real = backend._key_change

        def counted(work: Callable[[Any], Any]) -> Any:
            return real(lambda conn: work(_Counting(conn, self.changes)))

        monkeypatch.setattr(backend, "_key_change", counted)


class _Counting:
    def __init__(self, conn: Any, changes: list[str]) -> None:
        self._conn, self._changes = conn, changes

    def execute(self, statement: str, params: Any = None) -> Any:
        words = statement.split()
        if words[0].upper() in ("INSERT", "UPDATE", "DELETE"):
            self._changes.append(f"{words[0]} {words[2] if words[1] in ('INTO', 'FROM') else words[1]}")
        return self._conn.execute(statement, params)


@pytest.mark.parametrize("secrets", [10, 300])
def test_a_root_key_rotation_re_wraps_the_keyring_and_writes_nothing_else(
    backend: Any, monkeypatch: pytest.MonkeyPatch, secrets: int
) -> None:
    """Issue 16: the cost of a rotation does not depend on the number of secrets.  The same two writes of the
    key state with 10 or 300 secrets stored, no write through the secrets' writer, no value touched."""
    futures = [backend.put(f"s/{i:04d}", {"v": str(i)}, None) for i in range(secrets)]
    futures.append(backend.update_metadata("s/0000", max_versions=None, cas_required=None, custom_metadata={"o": "p"}))
    for future in futures:
        future.result(WAIT)
    PolicyStore(backend).put("p", "spiffe://x/.*", "s/.*", frozenset({Permission.READ}), create_only=True).result(WAIT)
    before, writes = rows(backend), backend.writes
    count = WriteCount(backend, monkeypatch)
    rotate_root(backend, ROOT_KEY, OTHER_KEY)
    assert count.changes == ["INSERT pending_rotation", "UPDATE key_record", "DELETE pending_rotation"]
    assert backend.writes == writes
    assert rows(backend) == before
    # Under the new root key: every value reads, and new ones are sealed under the same term.
    assert backend.get(f"s/{secrets - 1:04d}", 0) == (1, {"v": str(secrets - 1)})
    assert backend.metadata("s/0000")[0].custom_metadata == {"o": "p"}
    assert [p.name for p in PolicyStore(backend).load_all()] == ["p"]
    term = backend.keyring().active
    backend.put("after", {"k": "v"}, None).result(WAIT)
    assert rows(backend)[0][-1][3] == term


def test_bootstrap_force_leaves_values_unreadable_never_tampered_and_never_reuses_a_term(backend: Any) -> None:
    backend.put("app/db", {"pw": "1"}, None).result(WAIT)
    backend.put("app/db", {"pw": "2"}, None).result(WAIT)
    backend.update_metadata("app/db", max_versions=None, cas_required=None, custom_metadata={"o": "p"}).result(WAIT)
    policies = PolicyStore(backend)
    policies.put("old", "spiffe://x/.*", "app/.*", frozenset({Permission.READ}), create_only=True).result(WAIT)
    old_term = backend.keyring().active
    forced, _ = seal_key(THIRD_KEY, epoch=EPOCH + 1, threshold=2, keeper_ids=[1, 2, 3])
    forced = forced.succeeding(RECORD)
    assert backend.install_key_record(forced, replace=RECORD) == forced
    backend.unlock(THIRD_KEY, forced.epoch)
    assert backend.keyring().active == old_term + 1  # a new keyring, never an old term number again
    with pytest.raises(DataKeyGone, match=r"app/db version 2 was sealed under data-key term \d+, which no longer"):
        backend.get("app/db", 0)
    meta, versions = backend.metadata("app/db")
    assert (meta.custom_metadata, meta.custom_unreadable) == ({}, True)
    assert [(v.version, v.unreadable, v.readable) for v in versions] == [(1, True, False), (2, True, False)]
    assert policies.load_all() == []  # grants nothing, and is not taken for tampering
    with pytest.raises(DataKeyGone, match="policy old was sealed under"):
        policies.get("old")
    # Writing again is the way out: a new version, under the new keyring; the old one stays unreadable.
    assert backend.put("app/db", {"pw": "3"}, None).result(WAIT) == 3
    assert backend.get("app/db", 0) == (3, {"pw": "3"})
    assert [v.unreadable for v in backend.metadata("app/db")[1]] == [True, True, False]
    backend.destroy("app/db", [1]).result(WAIT)
    assert [v.unreadable for v in backend.metadata("app/db")[1]] == [False, True, False]  # destroyed: no value


def test_a_keyring_that_does_not_open_opens_nothing(backend: Any) -> None:
    backend.put("app/db", {"pw": "1"}, None).result(WAIT)

    def damage(conn: Any) -> None:
        (blob,) = conn.execute(backend._key_sql.keyring, {}).fetchone()[1:]
        damaged = bytes(blob[:-1]) + bytes([blob[-1] ^ 1])
        statement = "UPDATE key_record SET keyring = %(k)s" if backend.shared else "UPDATE key_record SET keyring = :k"
        conn.execute(statement, {"k": damaged})

    backend._key_change(damage)
    backend.unlock(ROOT_KEY, EPOCH)
    with pytest.raises(StorageError, match="keyring does not open"):
        backend.get("app/db", 0)
    with pytest.raises(StorageError, match="keyring does not open"):
        backend.put("app/db", {"pw": "2"}, None)


# ---------------------------------------------------------------------- databases written before the keyring

LEGACY_EPOCH = 3
LEGACY_BODY = b'{"spiffe_id_pattern":"^spiffe://x/.*$","path_pattern":"^old/.*$","permissions":["read"],"dialect":2}'


def _legacy_rows(sealer: Sealer) -> dict[str, Any]:
    """What spike wrote before the keyring: values sealed in format 1 under HKDF(root key of epoch 3)."""
    return {
        "record": seal_key(ROOT_KEY, epoch=LEGACY_EPOCH, threshold=2, keeper_ids=[1, 2, 3])[0],
        "versions": [
            ("old/db", v, sealer.seal(msgspec.json.encode({"pw": f"v{v}"}), secret_aad("old/db", v))) for v in (1, 2)
        ],
        "custom": sealer.seal(msgspec.json.encode({"owner": "ops"}), metadata_aad("old/db")),
        "policy": sealer.seal(LEGACY_BODY, policy_aad("pid", "old-policy")),
        # Sealed under the root key of epoch 2, replaced (bootstrap --force) before the upgrade: unreadable before it.
        "replaced": Sealer(OTHER_KEY).seal(msgspec.json.encode({"pw": "gone"}), secret_aad("older/db", 1)),
    }


def _fill_legacy(conn: Any, rows: dict[str, Any], placeholder: str) -> None:
    p = placeholder
    conn.execute(
        f"INSERT INTO key_record (id, epoch, record, updated_at) VALUES (1, {p}, {p}, '2025-01-01T00:00:00+00:00')",
        (LEGACY_EPOCH, msgspec.json.encode(rows["record"])),
    )
    for path, current, custom in (("old/db", 2, rows["custom"]), ("older/db", 1, None)):
        conn.execute(
            f"INSERT INTO secret VALUES ({p}, {p}, 1, 0, FALSE, 1.0, 1.0, {p})",
            (path, current, custom),
        )
    for path, version, sealed in rows["versions"]:
        conn.execute(
            f"INSERT INTO secret_version VALUES ({p}, {p}, {p}, 1.0, NULL, {p})", (path, version, sealed, LEGACY_EPOCH)
        )
    conn.execute(f"INSERT INTO secret_version VALUES ('older/db', 1, {p}, 1.0, NULL, 2)", (rows["replaced"],))
    conn.execute(f"INSERT INTO policy VALUES ('pid', 'old-policy', {p}, 1.0, 1.0)", (rows["policy"],))


@pytest.fixture(params=BACKENDS)
def legacy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A database at the last schema before the keyring, with values in it, opened (upgraded) by this spike."""
    content = _legacy_rows(Sealer(ROOT_KEY))
    if request.param == "sqlite":
        from spike.app.store.sqlite import SqliteBackend
        from spike.app.store.sqlite_schema import MIGRATIONS

        data_dir = tmp_path / "data"
        data_dir.mkdir()
        with sqlite3.connect(data_dir / DB_NAME, isolation_level=None) as db:
            for step in MIGRATIONS[:4]:
                for statement in step:
                    db.execute(statement)
            db.execute("PRAGMA user_version = 4")
            _fill_legacy(db, content, "?")
        backend: Any = SqliteBackend(data_dir)
    else:
        import pg_server
        import psycopg

        from spike.app.store.postgres import PostgresBackend
        from spike.app.store.postgres_schema import MIGRATIONS as PG_MIGRATIONS

        url = pg_server.server().database()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE spike_schema (id integer PRIMARY KEY CHECK (id = 1), version integer NOT NULL)")
            for step in PG_MIGRATIONS[:2]:
                for statement in step:
                    conn.execute(statement)
            conn.execute("INSERT INTO spike_schema VALUES (1, 2)")
            _fill_legacy(conn, content, "%s")
        backend = PostgresBackend(url, read_threads=2)
    try:
        yield backend
    finally:
        backend.close()


def test_values_stored_before_the_keyring_stay_readable_through_rotations(legacy: Any) -> None:
    backend = legacy
    assert backend.load_rotation_state() == (None, None, LEGACY_EPOCH)
    assert rows(backend)[0][0][3] == LEGACY_TERM  # labelled with the legacy term by the upgrade, no row rewritten
    backend.unlock(ROOT_KEY, LEGACY_EPOCH)
    keyring = backend.keyring()
    assert (keyring.legacy_epoch, [t.term for t in keyring.terms]) == (LEGACY_EPOCH, [LEGACY_TERM, 1])

    def everything_reads() -> None:
        assert backend.get("old/db", 2) == (2, {"pw": "v2"})
        assert backend.get("old/db", 1) == (1, {"pw": "v1"})
        meta, versions = backend.metadata("old/db")
        assert meta.custom_metadata == {"owner": "ops"} and not any(v.unreadable for v in versions)
        assert [p.name for p in PolicyStore(backend).load_all()] == ["old-policy"]
        # Sealed under a root key replaced before the upgrade: unreadable as it was, now said so.
        with pytest.raises(DataKeyGone, match="older/db version 1 was sealed under the root key of epoch 2"):
            backend.get("older/db", 0)
        assert [v.unreadable for v in backend.metadata("older/db")[1]] == [True]

    everything_reads()
    assert backend.put("old/db", {"pw": "v3"}, None).result(WAIT) == 3  # a new value: under term 1
    rotate_root(backend, ROOT_KEY, OTHER_KEY)  # the legacy term's root key is gone from now on
    everything_reads()
    assert backend.get("old/db", 0) == (3, {"pw": "v3"})
