"""Nexus's data in PostgreSQL: several Nexus instances on one database.

The same tables as SQLite (storage.py), sealed the same way and changed by
the same KV v2 rules (kv.py); what differs is how writers on different
machines stay exact:

* **Writes** go to one writer thread per instance, which takes every write
  waiting at that moment and commits them in one transaction (group commit,
  one WAL flush).  The transaction first takes PostgreSQL advisory locks:
  shared on the key epoch, then exclusive on every secret path it touches
  (and on the policies, for a policy write), in one global order, so no two
  transactions deadlock.  A write to a path therefore sees every committed
  write to it from every instance (READ COMMITTED takes a new snapshot per
  statement, after the locks): check-and-set is exact across instances.
  A refused write (`kv.KvError`) is refused before it writes anything, so the
  others in the transaction commit without it.
* **The key epoch** is checked in every write transaction: a value sealed
  under a key that was replaced meanwhile (`spike bootstrap --force` through
  another instance) is refused (503), never stored.  Installing or replacing
  the key record takes the epoch lock exclusively; the first install is
  INSERT ... ON CONFLICT DO NOTHING, so two instances bootstrapped at once
  agree on one record.
* **Reads** run on a few threads with connections from a psycopg pool, each
  read one statement (one snapshot); the API awaits them as futures, so a
  slow network never stalls the event loop.  Every statement has a timeout.
* **Outages**: a lost connection is retried once on a fresh one (nothing was
  committed), then the write or read fails with `DatabaseUnavailable` (503).
  The outage is logged once when it starts and once when it ends.  If the
  connection breaks during COMMIT, the transaction's id says afterwards
  whether it committed (`pg_xact_status`): the answer is then exact, or
  `OutcomeUnknown` if the database stays away too long to ask.  Writes that
  arrive while it is away answer 503 at once, not after that wait.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from spike.app.config import mask_url
from spike.app.model import kv
from spike.app.model.policy import MAX_POLICIES
from spike.app.store.backend import MAX_BATCH, ClusterState, PolicyRow, WriteOutcome, WriteQueue, settle
from spike.app.store.errors import DatabaseUnavailable, OutcomeUnknown, StorageError
from spike.app.store.sealing import Sealer, TamperedData, metadata_aad, secret_aad
from spike.app.store.sqlite import PolicyNameTaken
from spike.protocol.record import KeyRecord

log = logging.getLogger("spike.nexus.store")
# The pool would log every failed reconnection attempt; an outage is logged here, once (see `_Health`).
logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)

T = TypeVar("T")
WriteOp = Callable[[psycopg.Connection[Any]], T]
READ_THREADS = 4
STATEMENT_TIMEOUT_MS = 5000
CONNECT_TIMEOUT = 3  # seconds, per attempt (libpq takes whole seconds)
POOL_WAIT = 3.0  # seconds a read waits for a pooled connection
DOUBT_WINDOW = 15.0  # seconds to learn the outcome of a commit whose connection broke

# Advisory lock ids (one 64-bit space per database).  Path locks are hashes, far from these.
LOCK_EPOCH = 0x5350_494B_0001
LOCK_POLICIES = 0x5350_494B_0002
LOCK_MIGRATE = 0x5350_494B_0003

_values_encoder = msgspec.json.Encoder()
_values_decoder = msgspec.json.Decoder(dict[str, str])

# Entry i moves the schema from version i to i + 1, in one transaction.  Released entries never change.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE key_record (
            id integer PRIMARY KEY CHECK (id = 1),
            epoch bigint NOT NULL,
            record bytea NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now()
        )""",
        # Paths and names compare byte by byte ("C"), as in SQLite: listing by prefix is a range scan.
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
)

_SELECT_VALUE = (
    "SELECT v.version, v.sealed, v.deleted_at, v.key_epoch FROM secret AS s "
    "JOIN secret_version AS v ON v.path = s.path "
    "AND v.version = CASE WHEN %(v)s = 0 THEN s.current_version ELSE %(v)s END WHERE s.path = %(p)s"
)
_SELECT_METADATA = (
    "SELECT s.current_version, s.oldest_version, s.max_versions, s.cas_required, s.created_at, s.updated_at, "
    "s.custom_metadata, "
    "ARRAY(SELECT v.version FROM secret_version AS v WHERE v.path = s.path ORDER BY v.version), "
    "ARRAY(SELECT v.created_at FROM secret_version AS v WHERE v.path = s.path ORDER BY v.version), "
    "ARRAY(SELECT v.deleted_at FROM secret_version AS v WHERE v.path = s.path ORDER BY v.version), "
    "ARRAY(SELECT v.sealed IS NULL FROM secret_version AS v WHERE v.path = s.path ORDER BY v.version) "
    "FROM secret AS s WHERE s.path = %s"
)
# For a write: the secret's metadata and stored versions, in one round trip.
_SELECT_FOR_WRITE = (
    "SELECT s.current_version, s.oldest_version, s.max_versions, s.cas_required, s.created_at, s.updated_at, "
    "ARRAY(SELECT v.version FROM secret_version AS v WHERE v.path = s.path ORDER BY v.version) "
    "FROM secret AS s WHERE s.path = %s"
)
_SELECT_POLICY = "SELECT id, name, sealed, created_at, updated_at FROM policy"
_ONE_POLICY = f"{_SELECT_POLICY} WHERE id = %(x)s OR name = %(x)s ORDER BY id = %(x)s DESC LIMIT 1"
_BUMP_POLICIES = "UPDATE policy_version SET version = version + 1 WHERE id = 1"

_UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError)


def path_lock(path: str) -> int:
    """The advisory lock id of a secret path (a hash: two paths may share one, which only serialises them)."""
    digest = hashlib.blake2b(path.encode(), digest_size=8, person=b"spike-path").digest()
    return int.from_bytes(digest, "big", signed=True)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or exc.__class__.__name__


class StaleKey(DatabaseUnavailable):
    """The key record was replaced (through another instance) since this write was sealed."""


class _Health:
    """One log line when the database goes away, one when it is back: never one per request."""

    def __init__(self, where: str) -> None:
        self._where = where
        self._down_since: float | None = None
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def failed(self, exc: BaseException) -> DatabaseUnavailable:
        with self._lock:
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.error(
                    "PostgreSQL at %s is unavailable (%s): data routes answer 503 until it is back",
                    self._where,
                    _one_line(exc),
                    extra={"event": "database_down"},
                )
        return DatabaseUnavailable(f"PostgreSQL is unavailable: {_one_line(exc)}")

    def ok(self) -> None:
        if self._down_since is None:  # the common case, without the lock
            return
        with self._lock:
            if self._down_since is not None:
                log.info(
                    "PostgreSQL at %s is available again after %.1fs",
                    self._where,
                    time.monotonic() - self._down_since,
                    extra={"event": "database_up"},
                )
                self._down_since = None


@dataclass(slots=True)
class _Write:
    keys: tuple[int, ...]  # advisory locks this write needs
    epoch: int | None  # the key epoch it sealed under (None: it seals nothing)
    op: WriteOp[Any]
    future: Future[Any]


class _InDoubt(Exception):
    def __init__(self, xid: str, cause: BaseException, outcomes: list[WriteOutcome]):
        super().__init__(str(cause))
        self.xid = xid
        self.cause = cause
        self.outcomes = outcomes


class PostgresBackend:
    """The storage `Backend` on a PostgreSQL database shared by any number of Nexus instances."""

    shared = True
    inline_reads = False

    def __init__(
        self,
        url: str,
        *,
        default_max_versions: int = kv.DEFAULT_MAX_VERSIONS,
        read_threads: int = READ_THREADS,
        statement_timeout_ms: int = STATEMENT_TIMEOUT_MS,
    ) -> None:
        self._url = url
        self.description = f"PostgreSQL at {mask_url(url)}"
        self.default_max_versions = default_max_versions
        self._health = _Health(mask_url(url))
        try:
            options = conninfo_to_dict(url).get("options") or ""
        except psycopg.ProgrammingError as exc:
            raise StorageError(f"the database URL {mask_url(url)} is not valid: {_one_line(exc)}") from None
        self._connect_kwargs: dict[str, Any] = {
            "connect_timeout": CONNECT_TIMEOUT,
            "application_name": "spike-nexus",
            # Added to the URL's own options (a search_path, for example), never replacing them.
            "options": f"{options} -c statement_timeout={statement_timeout_ms}".strip(),
        }
        try:
            with psycopg.connect(url, autocommit=True, **self._connect_kwargs) as conn:
                self._migrate(conn)
        except _UNAVAILABLE as exc:
            raise DatabaseUnavailable(f"cannot reach {self.description}: {_one_line(exc)}") from None
        except psycopg.Error as exc:
            raise StorageError(f"cannot use {self.description}: {_one_line(exc)}") from None
        self._read_threads = read_threads
        self._pool = self._new_pool()
        self._pool_lock = threading.Lock()
        self._readers = ThreadPoolExecutor(read_threads, thread_name_prefix="spike-pg-read")
        self._sealer: Sealer | None = None
        self._epoch = 0
        self._writer_conn: psycopg.Connection[Any] | None = None
        self._queue: WriteQueue[_Write] = WriteQueue()
        self.batches = 0
        self.writes = 0
        self.on_stale_key: Callable[[], None] = lambda: None  # told when a write finds a newer key record
        self._writer = threading.Thread(target=self._write_loop, name="spike-pg-writer", daemon=True)
        self._writer.start()

    def _new_pool(self) -> ConnectionPool[psycopg.Connection[Any]]:
        pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            self._url,
            min_size=self._read_threads,
            max_size=self._read_threads,
            kwargs={"autocommit": True, **self._connect_kwargs},
            timeout=POOL_WAIT,
            reconnect_timeout=24 * 3600.0,  # keeps trying; after an outage `_query` replaces it anyway
            name="spike-nexus",
            open=False,
        )
        pool.open(wait=False)
        return pool

    # ------------------------------------------------------------------ schema

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            # Instances started at once migrate one after the other.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_MIGRATE,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS spike_schema "
                "(id integer PRIMARY KEY CHECK (id = 1), version integer NOT NULL)"
            )
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
            conn.execute(
                "INSERT INTO spike_schema (id, version) VALUES (1, %s) "
                "ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                (len(MIGRATIONS),),
            )

    # ------------------------------------------------------------------ key

    def unlock(self, sealer: Sealer, epoch: int) -> None:
        self._sealer, self._epoch = sealer, epoch

    def lock(self) -> None:
        self._sealer = None

    def sealer(self) -> Sealer:
        if self._sealer is None:
            raise StorageError("the store is locked: no root key")
        return self._sealer

    def _open(self, sealed: bytes, aad: bytes, epoch: int, what: str) -> bytes:
        if epoch != self._epoch:
            raise TamperedData(f"{what} is sealed under key epoch {epoch}, the current key is {self._epoch}")
        try:
            return self.sealer().open(sealed, aad)
        except TamperedData as exc:
            raise TamperedData(f"{what}: {exc} (tampered with, or moved from another path)") from None

    # ------------------------------------------------------------------ key record

    def load_key_record(self) -> KeyRecord | None:
        row = self._query(lambda c: c.execute("SELECT record FROM key_record WHERE id = 1").fetchone())
        return None if row is None else _decode_record(row[0])

    def install_key_record(self, record: KeyRecord, *, replace: KeyRecord | None) -> KeyRecord:
        def install(conn: psycopg.Connection[Any]) -> KeyRecord:
            with conn.transaction():
                # Exclusive: waits for write transactions under way, which hold it shared.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_EPOCH,))
                row = conn.execute("SELECT record FROM key_record WHERE id = 1").fetchone()
                current = None if row is None else _decode_record(row[0])
                if current is not None and (replace is None or current != replace):
                    return current
                conn.execute(
                    "INSERT INTO key_record (id, epoch, record) VALUES (1, %s, %s) ON CONFLICT (id) DO UPDATE "
                    "SET epoch = excluded.epoch, record = excluded.record, updated_at = now()",
                    (record.epoch, msgspec.json.encode(record)),
                )
                return record

        return self._query(install)

    def cluster_state(self) -> ClusterState:
        row = self._query(
            lambda c: c.execute(
                "SELECT (SELECT record FROM key_record WHERE id = 1), (SELECT version FROM policy_version WHERE id = 1)"
            ).fetchone()
        )
        assert row is not None
        record, version = row
        return ClusterState(None if record is None else _decode_record(record), int(version or 0))

    # ------------------------------------------------------------------ reads

    def read(self, call: Callable[[], T]) -> Future[T]:
        return self._readers.submit(call)

    def _query(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run `work` on a pooled connection; a broken connection is replaced and the work tried once more."""
        if self._health.down:
            return self._query_while_down(work)
        for attempt in (1, 2):
            try:
                with self._pool.connection() as conn:
                    result = work(conn)
            except _UNAVAILABLE as exc:
                if attempt == 1 and not isinstance(exc, psycopg.errors.QueryCanceled):
                    self._pool.check()  # after a server restart every idle connection is stale: drop them all
                    continue
                raise self._health.failed(exc) from None
            except psycopg.Error as exc:
                raise StorageError(f"the database refused a read: {_one_line(exc)}") from None
            return result
        raise AssertionError("unreachable")

    def _query_while_down(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """During an outage every query tries a connection of its own: it fails at once while the database
        is away, and the first one to succeed ends the outage with a fresh pool (the old one backs off)."""
        try:
            with psycopg.connect(self._url, autocommit=True, **self._connect_kwargs) as conn:
                result = work(conn)
        except _UNAVAILABLE as exc:
            raise self._health.failed(exc) from None
        except psycopg.Error as exc:
            raise StorageError(f"the database refused a read: {_one_line(exc)}") from None
        self._back()
        return result

    def _back(self) -> None:
        """The database answered: if that ends an outage, start over with a fresh pool."""
        if not self._health.down:
            return
        with self._pool_lock:
            if self._health.down:
                old, self._pool = self._pool, self._new_pool()
                threading.Thread(target=old.close, name="spike-pg-old-pool", daemon=True).start()
                self._health.ok()

    def get(self, path: str, version: int) -> tuple[int, dict[str, str]]:
        row = self._query(lambda c: c.execute(_SELECT_VALUE, {"p": path, "v": version}).fetchone())
        if row is None:
            raise kv.NotFound("no such secret or version")
        found, sealed, deleted_at, epoch = row
        if sealed is None or deleted_at is not None:
            raise kv.NotFound("this version is deleted or destroyed")
        plaintext = self._open(bytes(sealed), secret_aad(path, found), epoch, f"{path} version {found}")
        return found, _values_decoder.decode(plaintext)

    def metadata(self, path: str) -> tuple[kv.SecretMeta, list[kv.VersionInfo]]:
        row = self._query(lambda c: c.execute(_SELECT_METADATA, (path,)).fetchone())
        if row is None:
            raise kv.NotFound("no such secret")
        current, oldest, max_versions, cas_required, created, updated, custom_sealed, vs, cs, ds, xs = row
        custom: dict[str, str] = {}
        if custom_sealed is not None:
            custom = _values_decoder.decode(
                self._open(bytes(custom_sealed), metadata_aad(path), self._epoch, f"{path} metadata")
            )
        meta = kv.SecretMeta(path, current, oldest, max_versions, cas_required, created, updated, custom)
        return meta, [kv.VersionInfo(v, c, d, bool(x)) for v, c, d, x in zip(vs, cs, ds, xs, strict=True)]

    def list_paths(self, prefix: str, *, limit: int, after: str = "") -> list[str]:
        if after and after >= prefix:
            sql, args = "SELECT path FROM secret WHERE path > %s", [after]
        else:
            sql, args = "SELECT path FROM secret WHERE path >= %s", [prefix]
        if prefix:
            sql += " AND path < %s"
            args.append(prefix[:-1] + chr(ord(prefix[-1]) + 1))
        query = sql + " ORDER BY path LIMIT %s"
        rows = self._query(lambda c: c.execute(query, [*args, limit]).fetchall())
        return [p for (p,) in rows]

    def count(self) -> int:
        row = self._query(lambda c: c.execute("SELECT count(*) FROM secret").fetchone())
        assert row is not None
        return int(row[0])

    def policy_rows(self) -> list[PolicyRow]:
        rows = self._query(lambda c: c.execute(f"{_SELECT_POLICY} ORDER BY name").fetchall())
        return [(i, n, bytes(s), c, u) for i, n, s, c, u in rows]

    def policy_row(self, id_or_name: str) -> PolicyRow | None:
        row = self._query(lambda c: c.execute(_ONE_POLICY, {"x": id_or_name}).fetchone())
        if row is None:
            return None
        i, n, s, c, u = row
        return i, n, bytes(s), c, u

    def policy_names(self) -> list[tuple[str, str]]:
        rows = self._query(lambda c: c.execute("SELECT id, name FROM policy ORDER BY name").fetchall())
        return [(i, n) for i, n in rows]

    # ------------------------------------------------------------------ writes

    def _submit(self, keys: Iterable[int], epoch: int | None, op: WriteOp[T]) -> Future[T]:
        future: Future[T] = Future()
        self._queue.put(_Write(tuple(keys), epoch, op, future))
        return future

    def put(self, path: str, values: dict[str, str], cas: int | None) -> Future[int]:
        plaintext = _values_encoder.encode(values)
        sealer = self.sealer()
        epoch = self._epoch
        default = self.default_max_versions

        def op(conn: psycopg.Connection[Any]) -> int:
            now = time.time()
            row = conn.execute(_SELECT_FOR_WRITE, (path,)).fetchone()
            meta, stored = _meta_and_versions(path, row)
            plan = kv.plan_put(meta, stored, path=path, cas=cas, now=now, default_max_versions=default)
            sealed = sealer.seal(plaintext, secret_aad(path, plan.version))
            # Refusals are above this line: nothing is written for a refused put.
            with conn.pipeline():
                _put_rows(conn, path, plan, sealed, now, epoch)
            return plan.version

        return self._submit((path_lock(path),), epoch, op)

    def delete(self, path: str, versions: list[int]) -> Future[None]:
        return self._mark(path, versions, "deleted_at = %s", lambda: (time.time(),))

    def undelete(self, path: str, versions: list[int]) -> Future[None]:
        return self._mark(path, versions, "deleted_at = NULL", lambda: ())

    def destroy(self, path: str, versions: list[int]) -> Future[None]:
        return self._mark(path, versions, "sealed = NULL", lambda: ())

    def _mark(
        self, path: str, versions: list[int], assignment: str, args: Callable[[], tuple[Any, ...]]
    ) -> Future[None]:
        def op(conn: psycopg.Connection[Any]) -> None:
            row = conn.execute(_SELECT_FOR_WRITE, (path,)).fetchone()
            meta, _ = _meta_and_versions(path, row)
            if meta is None:
                raise kv.NotFound("no such secret")
            conn.execute(
                f"UPDATE secret_version SET {assignment} WHERE path = %s AND version = ANY(%s) AND sealed IS NOT NULL",  # noqa: S608 - fixed strings
                (*args(), path, kv.targets(meta, versions)),
            )
            conn.execute("UPDATE secret SET updated_at = %s WHERE path = %s", (time.time(), path))

        return self._submit((path_lock(path),), None, op)

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
            sealed_custom = self.sealer().seal(_values_encoder.encode(custom_metadata), metadata_aad(path))
            epoch = self._epoch

        def op(conn: psycopg.Connection[Any]) -> None:
            now = time.time()
            # Like Vault, metadata may be written before the first version.
            conn.execute(
                "INSERT INTO secret (path, current_version, oldest_version, max_versions, cas_required, created_at, "
                "updated_at, custom_metadata) VALUES (%(p)s, 0, 0, 0, false, %(t)s, %(t)s, NULL) "
                "ON CONFLICT (path) DO NOTHING",
                {"p": path, "t": now},
            )
            conn.execute(
                "UPDATE secret SET max_versions = COALESCE(%(m)s, max_versions), "
                "cas_required = COALESCE(%(c)s, cas_required), custom_metadata = COALESCE(%(x)s, custom_metadata), "
                "updated_at = %(t)s WHERE path = %(p)s",
                {"m": max_versions, "c": cas_required, "x": sealed_custom, "t": now, "p": path},
            )

        return self._submit((path_lock(path),), epoch, op)

    def delete_all(self, path: str) -> Future[None]:
        def op(conn: psycopg.Connection[Any]) -> None:
            if conn.execute("DELETE FROM secret WHERE path = %s", (path,)).rowcount == 0:
                raise kv.NotFound("no such secret")
            conn.execute("DELETE FROM secret_version WHERE path = %s", (path,))

        return self._submit((path_lock(path),), None, op)

    def policy_put(
        self, name: str, seal: Callable[[str], bytes], *, create_only: bool, new_id: Callable[[], str]
    ) -> Future[tuple[str, bool]]:
        epoch = self._epoch

        def op(conn: psycopg.Connection[Any]) -> tuple[str, bool]:
            now = time.time()
            row = conn.execute("SELECT id FROM policy WHERE name = %s", (name,)).fetchone()
            if row is not None:
                if create_only:
                    raise PolicyNameTaken(f"a policy named {name} exists")
                (policy_id,) = row
                conn.execute(
                    "UPDATE policy SET sealed = %s, updated_at = %s WHERE id = %s", (seal(policy_id), now, policy_id)
                )
                conn.execute(_BUMP_POLICIES)
                return policy_id, False
            count = conn.execute("SELECT count(*) FROM policy").fetchone()
            if count is not None and count[0] >= MAX_POLICIES:
                raise kv.InvalidRequest(f"at most {MAX_POLICIES} policies")
            policy_id = new_id()
            conn.execute(
                "INSERT INTO policy (id, name, sealed, created_at, updated_at) VALUES (%s, %s, %s, %s, %s)",
                (policy_id, name, seal(policy_id), now, now),
            )
            conn.execute(_BUMP_POLICIES)
            return policy_id, True

        return self._submit((LOCK_POLICIES,), epoch, op)

    def policy_delete(self, id_or_name: str) -> Future[None]:
        def op(conn: psycopg.Connection[Any]) -> None:
            row = conn.execute(_ONE_POLICY, {"x": id_or_name}).fetchone()
            if row is None:
                raise kv.NotFound("no such policy")
            conn.execute("DELETE FROM policy WHERE id = %s", (row[0],))
            conn.execute(_BUMP_POLICIES)

        return self._submit((LOCK_POLICIES,), None, op)

    def policy_reseal(self, policy_id: str, expected: bytes, sealed: bytes) -> Future[bool]:
        epoch = self._epoch

        def op(conn: psycopg.Connection[Any]) -> bool:
            changed = conn.execute(
                "UPDATE policy SET sealed = %s WHERE id = %s AND sealed = %s", (sealed, policy_id, expected)
            ).rowcount
            if changed:
                conn.execute(_BUMP_POLICIES)
            return bool(changed)

        return self._submit((LOCK_POLICIES,), epoch, op)

    def policy_version(self) -> int:
        row = self._query(lambda c: c.execute("SELECT version FROM policy_version WHERE id = 1").fetchone())
        return 0 if row is None else int(row[0])

    # ------------------------------------------------------------------ writer thread

    def _write_loop(self) -> None:
        while (batch := self._queue.next_batch()) is not None:
            self._commit(batch)

    def _writer_connection(self) -> psycopg.Connection[Any]:
        if self._writer_conn is None or self._writer_conn.closed:
            self._writer_conn = psycopg.connect(self._url, autocommit=False, **self._connect_kwargs)
        return self._writer_conn

    def _drop_writer(self) -> None:
        conn, self._writer_conn = self._writer_conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):  # already broken
                conn.close()

    def _commit(self, batch: list[_Write]) -> None:
        outcomes: list[WriteOutcome]
        for attempt in (1, 2):
            try:
                outcomes = self._transaction(self._writer_connection(), batch)
            except _InDoubt as doubt:
                self._drop_writer()
                outcomes = self._resolve(doubt, batch)
                break
            except _UNAVAILABLE as exc:
                # Before COMMIT: nothing was written.  A connection broken while idle (a server
                # restart) gets one more try on a fresh one.
                self._drop_writer()
                if attempt == 1 and not isinstance(exc, psycopg.errors.QueryCanceled):
                    continue
                unavailable = self._health.failed(exc)
                for write in batch:
                    write.future.set_exception(unavailable)
                return
            except Exception as exc:
                self._rollback()
                log.error("write of %d operation(s) failed and was rolled back: %s", len(batch), _one_line(exc))  # noqa: TRY400
                error = StorageError(f"the database refused the write: {_one_line(exc)}")
                for write in batch:
                    write.future.set_exception(error)
                return
            else:
                self._back()
                break
        self.batches += 1
        self.writes += len(batch)
        settle(outcomes)
        if any(isinstance(failure, StaleKey) for _, _, failure in outcomes):
            with contextlib.suppress(Exception):  # e.g. the event loop is gone at shutdown
                self.on_stale_key()

    def _rollback(self) -> None:
        conn = self._writer_conn
        if conn is None:
            return
        try:
            conn.rollback()
        except psycopg.Error:
            self._drop_writer()

    def _transaction(self, conn: psycopg.Connection[Any], batch: list[_Write]) -> list[WriteOutcome]:
        keys = sorted({key for write in batch for key in write.keys})
        with conn.pipeline():  # one round trip; the server still runs them one after the other
            conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (LOCK_EPOCH,))
            conn.execute("SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) AS k", (keys,))
            # After the locks (a statement of its own: a new snapshot): the key epoch in force, and this
            # transaction's id.
            cursor = conn.execute("SELECT (SELECT epoch FROM key_record WHERE id = 1), pg_current_xact_id()::text")
        row = cursor.fetchone()
        assert row is not None
        stored_epoch, xid = row
        outcomes: list[WriteOutcome] = []
        for write in batch:
            if write.epoch is not None and stored_epoch is not None and write.epoch != stored_epoch:
                failure = StaleKey(f"the key was replaced (epoch {stored_epoch}) since this write was sealed")
                outcomes.append((write.future, None, failure))
                continue
            try:
                result = write.op(conn)
            except kv.KvError as exc:  # refused before it wrote anything
                outcomes.append((write.future, None, exc))
            else:
                outcomes.append((write.future, result, None))
        try:
            conn.commit()
        except _UNAVAILABLE as exc:
            raise _InDoubt(str(xid), exc, outcomes) from None
        return outcomes

    def _resolve(self, doubt: _InDoubt, batch: list[_Write]) -> list[WriteOutcome]:
        """The connection broke during COMMIT: ask the database (once it answers) whether it happened."""
        error = self._health.failed(doubt.cause)
        deadline = time.monotonic() + DOUBT_WINDOW
        while True:
            status: str | None = "unknown"
            try:
                with psycopg.connect(self._url, autocommit=True, **self._connect_kwargs) as conn:
                    row = conn.execute("SELECT pg_xact_status(%s::xid8)", (doubt.xid,)).fetchone()
                    status = None if row is None else row[0]
            except psycopg.errors.InvalidParameterValue:
                # "transaction ID ... is in the future": the server came back without it, so its
                # commit record never became durable (a crash before the commit was flushed).
                status = "aborted"
            except psycopg.Error:
                pass
            if status == "committed":
                log.warning("the connection broke during a commit of %d write(s); it did commit", len(batch))
                self._back()
                return doubt.outcomes
            if status not in ("unknown", "in progress"):  # aborted: nothing was written
                return [(w.future, None, error) for w in batch]
            if time.monotonic() > deadline:
                log.error("the outcome of a commit of %d write(s) is unknown: the database did not answer", len(batch))
                unknown = OutcomeUnknown("the connection broke during the commit and the database did not answer since")
                return [(w.future, None, unknown) for w in batch]
            if status == "unknown":
                # The database is away: the writes queued behind this batch were not tried, so they are
                # refused now (503) rather than held until the outcome is learnt.
                for write in self._queue.waiting(MAX_BATCH):
                    write.future.set_exception(error)
            time.sleep(0.2)

    def close(self) -> None:
        self._queue.stop()
        self._writer.join(timeout=10)
        self._drop_writer()
        self._readers.shutdown(wait=True)
        self._pool.close()


def _put_rows(
    conn: psycopg.Connection[Any], path: str, plan: kv.PutPlan, sealed: bytes, now: float, epoch: int
) -> None:
    conn.execute(
        "INSERT INTO secret (path, current_version, oldest_version, max_versions, cas_required, created_at, "
        "updated_at, custom_metadata) VALUES (%(p)s, %(v)s, %(o)s, 0, false, %(t)s, %(t)s, NULL) "
        "ON CONFLICT (path) DO UPDATE SET current_version = %(v)s, oldest_version = %(o)s, updated_at = %(t)s",
        {"p": path, "v": plan.version, "o": plan.meta.oldest_version, "t": now},
    )
    conn.execute(
        "INSERT INTO secret_version (path, version, sealed, created_at, deleted_at, key_epoch) "
        "VALUES (%s, %s, %s, %s, NULL, %s)",
        (path, plan.version, sealed, now, epoch),
    )
    if plan.pruned:
        conn.execute("DELETE FROM secret_version WHERE path = %s AND version = ANY(%s)", (path, list(plan.pruned)))


def _decode_record(data: bytes) -> KeyRecord:
    try:
        return msgspec.json.decode(bytes(data), type=KeyRecord).validate()
    except (msgspec.DecodeError, ValueError) as exc:
        raise StorageError(f"the stored key record is damaged: {exc}") from None


def _meta_and_versions(path: str, row: tuple[Any, ...] | None) -> tuple[kv.SecretMeta | None, list[int]]:
    if row is None:
        return None, []
    current, oldest, max_versions, cas_required, created, updated, versions = row
    meta = kv.SecretMeta(path, current, oldest, max_versions, cas_required, created, updated)
    return meta, list(versions)
