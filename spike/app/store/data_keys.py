"""The keyring in use: sealing and opening stored values, data-key rotation, and the re-wrap of stored values.

`DataKeys` is what both databases' stores share between the key state
(key_state.py: what is stored) and the key/value operations (sql_store.py):

* **The keyring in use**, opened by `unlock` with the verified root key (a
  copy, wiped by `lock`), read again when a value names a term it has not
  seen or `cluster_state` shows a newer term (another instance rotated the
  data key: every instance picks the new term up within its next look at the
  store, without a restart).
* **Data-key rotation** (`rotate_data_key`): one write adds a term; new
  values are sealed under it, older terms stay readable.
* **Re-wrap** (`rewrap_batch`, run in the background by `Rewrapper`): stored
  values below the newest term are opened and sealed again under it, a page
  at a time in key order, each page one transaction of compare-and-set
  updates (a value written, destroyed or pruned since it was read is left as
  the write made it: the write wins, nothing is lost).  Whether a re-wrap is
  under way is stored (`rewrap_target`), and what it has left is derived from
  the rows (values per term), so it resumes after a restart from the rows
  themselves.  With several instances, one runs it at a time
  (`_rewrap_claim`: a PostgreSQL session lock); another takes over if it stops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import msgspec

from spike.app.store.backend import ClusterState, KeyringStatus
from spike.app.store.errors import StorageError
from spike.app.store.key_state import C, KeyState
from spike.app.store.keyring import LEGACY_TERM, Keyring, NewerTerm, term_of
from spike.app.store.sealing import DataKeyGone, TamperedData, metadata_aad, policy_aad, secret_aad
from spike.app.store.statements import Statements
from spike.protocol.material import RootKey

log = logging.getLogger("spike.nexus.store")

T = TypeVar("T")

# One write, run by the writer thread inside its transaction.
WriteOp = Callable[[C], T]

# After a keyring failed to load (the database away), how long uses answer at once before one tries again.
KEYRING_RETRY = 1.0
REWRAP_BATCH = 256  # values sealed again per transaction
REWRAP_PAUSE = 0.005  # seconds between two batches: other writes go first
REWRAP_RETRY = 5.0  # seconds before a re-wrap tries again after a failure, or to take over another instance's
COUNTS_TTL = 5.0  # seconds the values-per-term counts are reused (each count reads every row)

# Where a re-wrap pass is: which kind of stored value, and the last key it handled.
VERSIONS, CUSTOMS, POLICIES = 0, 1, 2


def label(sealed: bytes) -> int:
    """The data-key term a row holding `sealed` is labelled with (a blob of no known format: the legacy term's
    label, and it is refused as tampered with when read)."""
    try:
        return term_of(sealed)
    except TamperedData:
        return LEGACY_TERM


def _fetch_all(statement: str, params: dict[str, Any]) -> Callable[[Any], list[Any]]:
    def work(conn: Any) -> list[Any]:
        return list(conn.execute(statement, params).fetchall())

    return work


class _Unlocked(msgspec.Struct, frozen=True):
    key: RootKey  # a copy, wiped when the store is locked or unlocked again
    epoch: int


class RewrapCursor(msgspec.Struct, frozen=True):
    """Where a re-wrap pass is: the kind of value (`VERSIONS`, `CUSTOMS`, `POLICIES`) and the last key done."""

    kind: int = VERSIONS
    key: str = ""  # path (versions, custom metadata) or policy id
    version: int = 0


class RewrapBatch(msgspec.Struct, frozen=True):
    """What one re-wrap transaction did."""

    rewrapped: int  # values sealed again under the target term
    changed: int  # values a write changed since they were read: left as the write made them
    unreadable: int  # sealed under a data key that no longer exists, or tampered with: left as they are
    next: RewrapCursor | None  # None: this pass went through every stored value


class DataKeys(KeyState[C], ABC):
    """The keyring in use, data-key rotation and re-wrap; a store provides `_read`, `_submit` and `_sql`."""

    _sql: Statements

    def __init__(self) -> None:
        self._unlocked: _Unlocked | None = None
        self._keyring: Keyring | None = None
        self._keyring_lock = threading.Lock()
        self._keyring_failed_at = -float("inf")
        self._keyring_failure: StorageError | None = None
        self._counts: tuple[float, dict[int, int]] | None = None
        self._rewrapper: Rewrapper | None = None
        self.rewrapped = 0
        self.rewrap_batch_size = REWRAP_BATCH
        self.rewrap_pause = REWRAP_PAUSE
        self.random_bytes: Callable[[int], bytes] = os.urandom

    # ------------------------------------------------------------------ what a store provides

    @abstractmethod
    def _read(self, work: Callable[[C], T], what: str) -> T:
        """Run `work` on a connection for reads; `what` names what is read, for an error message."""

    @abstractmethod
    def _submit(self, op: WriteOp[C, T], *, path: str | None, term: int | None) -> Future[T]:
        """Queue `op` for the writer; `path`: the secret it changes (None: the policies); `term`: the
        data-key term it sealed under (None: it seals nothing)."""

    @contextlib.contextmanager
    def _rewrap_claim(self) -> Iterator[bool]:
        """Whether this instance may run the re-wrap now, for as long as the block lasts (one process: yes)."""
        yield True

    # ------------------------------------------------------------------ the keyring in use

    def unlock(self, root_key: RootKey, epoch: int) -> None:
        """Seal and open with the keyring under `root_key`, the verified root key of the stored record (`epoch`).

        Loads the stored keyring, or makes it the first time (key_state.py),
        and resumes a re-wrap that was under way.  Call it again after a root
        key rotation is committed (this instance's or another's), with the
        new key and epoch: the keyring is the same, read again under the new
        key.  If it cannot be loaded now (the database is away, the record is
        not stored yet) the store says so at its next use, and tries again then.
        """
        unlocked = _Unlocked(RootKey(root_key.secret_bytes()), epoch)
        with self._keyring_lock:
            self._forget_key()
            self._unlocked = unlocked
            self._keyring_failure = None
        try:
            self._load_keyring(unlocked)
            target = KeyState.cluster_state(self).rewrap_target
        except StorageError as exc:
            log.warning("the keyring could not be loaded yet (%s): tried again at its next use", exc)
            return
        if target is not None:
            self.start_rewrap()

    def lock(self) -> None:
        with self._keyring_lock:
            self._forget_key()
        self._stop_rewrap(wait=False)  # called on the event loop: a batch under way ends on its own

    def _forget_key(self) -> None:
        if self._unlocked is not None:
            self._unlocked.key.wipe()
        self._unlocked = None
        self._keyring = None

    def keyring(self) -> Keyring:
        """The keyring in use; `StorageError` while locked (or while it cannot be loaded)."""
        keyring = self._keyring
        if keyring is not None:
            return keyring
        unlocked = self._unlocked
        if unlocked is None:
            raise StorageError("the store is locked: no root key")
        failure = self._keyring_failure
        if failure is not None and time.monotonic() - self._keyring_failed_at < KEYRING_RETRY:
            raise type(failure)(str(failure))  # as a moment ago, without asking the database again
        return self._load_keyring(unlocked)

    def _load_keyring(self, unlocked: _Unlocked) -> Keyring:
        try:
            keyring = self.open_keyring(unlocked.key, unlocked.epoch, now=time.time(), random_bytes=self.random_bytes)
        except StorageError as exc:
            self._keyring_failure, self._keyring_failed_at = exc, time.monotonic()
            raise
        self._keyring_failure = None
        return self._use_keyring(unlocked, keyring)

    def _use_keyring(self, unlocked: _Unlocked, keyring: Keyring) -> Keyring:
        with self._keyring_lock:
            if self._unlocked is not unlocked:  # locked or unlocked again meanwhile
                raise StorageError("the store is locked: no root key")
            current = self._keyring
            if current is None or keyring.active >= current.active:
                self._keyring = current = keyring
            return current

    def reload_keyring(self) -> Keyring:
        """Read the stored keyring again (another instance may have added a term); the keyring in use."""
        unlocked = self._unlocked
        if unlocked is None:
            raise StorageError("the store is locked: no root key")
        return self._load_keyring(unlocked)

    def sealer(self) -> Keyring:
        """What values are sealed and opened with (the keyring); `StorageError` while locked."""
        return self.keyring()

    def seal_value(self, plaintext: bytes, aad: bytes) -> bytes:
        """`plaintext` sealed under the newest data-key term, bound to `aad`."""
        return self.keyring().seal(plaintext, aad)

    def open_value(self, sealed: bytes, aad: bytes, label: int | None = None) -> bytes:
        """A sealed value's plaintext (with `label`, the term its row names, which must be the blob's);
        `TamperedData`, `DataKeyGone`, or `StorageError` while locked."""
        try:
            return self.keyring().open(sealed, aad, label)
        except NewerTerm:
            pass
        try:  # another instance rotated the data key: its keyring is stored
            return self.reload_keyring().open(sealed, aad, label)
        except NewerTerm as exc:
            raise TamperedData(f"{exc}, which the stored keyring does not hold either") from None

    def _sealing(self) -> tuple[Keyring, int, int]:
        """What a write seals with now, the data-key term its row is labelled with, and the root key epoch."""
        keyring = self.keyring()
        unlocked = self._unlocked
        return keyring, keyring.active, 0 if unlocked is None else unlocked.epoch

    def _open(self, sealed: bytes, aad: bytes, term: int, what: str, key_epoch: int | None = None) -> bytes:
        """A stored value's plaintext, after checking that its row's term (and key epoch) match its blob."""
        try:
            if term == LEGACY_TERM and key_epoch is not None:
                self._check_legacy(key_epoch)
            return self.open_value(sealed, aad, term)
        except TamperedData as exc:
            raise TamperedData(f"{what}: {exc} (tampered with, or moved from another path)") from None
        except DataKeyGone as exc:
            raise DataKeyGone(f"{what} was {exc}; write it again") from None

    def _check_legacy(self, key_epoch: int) -> None:
        """A value of the legacy term written under another root key than the legacy term's is gone with it."""
        legacy = self.keyring().legacy_epoch
        if legacy is not None and key_epoch != legacy:
            raise DataKeyGone(
                f"sealed under the root key of epoch {key_epoch}, which no longer exists: it was replaced "
                "(bootstrap --force)"
            )

    # ------------------------------------------------------------------ several instances

    def cluster_state(self) -> ClusterState:
        """The key state as stored now (key_state.py); a newer data-key term stored by another instance is
        taken up at once, and a re-wrap it asked for is watched (run here if that instance stops)."""
        state = super().cluster_state()
        unlocked = self._unlocked
        if unlocked is None or state.record is None or state.record.epoch != unlocked.epoch:
            # The record was replaced (bootstrap --force through another instance): its keyring does not open
            # with the key in hand.  The caller adopts the new record and unlocks the store with its key.
            return state
        keyring = self._keyring
        if keyring is not None and state.data_term > keyring.active:
            keyring = self.reload_keyring()
            log.info("data-key term %d, added through another Nexus instance, now seals new values", keyring.active)
        if state.rewrap_target is not None and keyring is not None:
            self.start_rewrap()
        return state

    # ------------------------------------------------------------------ data-key rotation and re-wrap

    def rotate_data_key(self, *, rewrap: bool = False) -> int:
        """Add a data-key term for new values, in one write; the new term.  Older terms stay readable.

        With `rewrap`, stored values are then sealed again under it, in the
        background, in batches; the re-wrap resumes after a restart until it
        is done.  `RotationUnderWay` (409) while a root key rotation is stored.
        """
        unlocked = self._unlocked
        if unlocked is None:
            raise StorageError("the store is locked: no root key")
        keyring = self.add_data_term(
            unlocked.key, unlocked.epoch, now=time.time(), rewrap=rewrap, random_bytes=self.random_bytes
        )
        term = self._use_keyring(unlocked, keyring).active
        log.info("data key rotated: term %d seals new values%s", term, "; re-wrap started" if rewrap else "")
        if rewrap:
            self.start_rewrap()
        return term

    def rewrap(self) -> int:
        """Start a re-wrap of stored values to the newest term (without a new term); the term."""
        term = self.keyring().active
        self.set_rewrap_target(term)
        self.start_rewrap()
        return term

    def rewrap_batch(
        self,
        target: int,
        cursor: RewrapCursor,
        *,
        limit: int = REWRAP_BATCH,
        before_write: Callable[[], Any] | None = None,
    ) -> RewrapBatch:
        """Seal again under term `target` (the keyring's newest, or above) up to `limit` values after `cursor`.

        One transaction of compare-and-set updates: a value changed since it
        was read is left as the write made it.  `before_write` runs between
        the read and the write (tests use it to write in between).
        """
        keyring = self.keyring()
        if keyring.active < target:
            keyring = self.reload_keyring()
        if keyring.active != target:
            raise StorageError(f"the newest data-key term is {keyring.active}, not {target}")
        page, next_cursor = self._rewrap_page(target, cursor, limit)
        updates: list[tuple[str, dict[str, Any]]] = []
        unreadable = 0
        for statement, params, aad, what, key_epoch, term in page:
            try:
                plain = self._open(params["old"], aad, term, what, key_epoch)
            except (TamperedData, DataKeyGone) as exc:
                log.warning("re-wrap leaves %s", exc)
                unreadable += 1
                continue
            updates.append((statement, {**params, "new": keyring.seal(plain, aad), "term": target}))
        if before_write is not None:
            before_write()
        done = 0
        if updates:

            def op(conn: C) -> int:
                return sum(conn.execute(statement, params).rowcount for statement, params in updates)

            done = self._submit(op, path=None, term=target).result()
        self.rewrapped += done
        self._counts = None
        return RewrapBatch(done, len(updates) - done, unreadable, next_cursor)

    def _rewrap_page(
        self, target: int, cursor: RewrapCursor, limit: int
    ) -> tuple[list[tuple[str, dict[str, Any], bytes, str, int | None, int]], RewrapCursor | None]:
        """Up to `limit` values below `target` after `cursor`, each with its update; where the next page starts."""
        sql = self._sql
        kind, key, version = cursor.kind, cursor.key, cursor.version
        while kind <= POLICIES:
            params = {"target": target, "path": key, "version": version, "limit": limit}
            statement = (sql.rewrap_versions, sql.rewrap_customs, sql.rewrap_policies)[kind]
            # The key state's connection: SQLite's reader is the event loop's.
            rows = self._key_read(_fetch_all(statement, params))
            if rows:
                page = [self._rewrap_item(kind, row) for row in rows]
                last = rows[-1]
                if len(rows) < limit:
                    return page, RewrapCursor(kind + 1) if kind < POLICIES else None
                return page, RewrapCursor(kind, str(last[0]), int(last[1]) if kind == VERSIONS else 0)
            kind, key, version = kind + 1, "", 0
        return [], None

    def _rewrap_item(self, kind: int, row: Any) -> tuple[str, dict[str, Any], bytes, str, int | None, int]:
        sql = self._sql
        if kind == VERSIONS:
            path, version, sealed, term, key_epoch = row
            params = {"path": path, "version": version, "old": bytes(sealed)}
            return sql.rewrap_version, params, secret_aad(path, version), f"{path} version {version}", key_epoch, term
        if kind == CUSTOMS:
            path, sealed, term = row
            params = {"path": path, "old": bytes(sealed)}
            return sql.rewrap_custom, params, metadata_aad(path), f"{path} metadata", None, term
        policy_id, name, sealed, term = row
        params = {"path": policy_id, "old": bytes(sealed)}
        return sql.rewrap_policy, params, policy_aad(policy_id, name), f"policy {name}", None, term

    def values_by_term(self, *, fresh: bool = False) -> dict[int, int]:
        """Stored values (secret versions, custom metadata, policies) per data-key term, counted from the rows.

        Each count reads every row: it is reused for `COUNTS_TTL` seconds
        unless `fresh`, and read afresh after each re-wrap batch.
        """
        cached = self._counts
        if cached is not None and not fresh and time.monotonic() - cached[0] < COUNTS_TTL:
            return dict(cached[1])
        sql = self._sql
        counts: dict[int, int] = {}
        for statement in (sql.versions_by_term, sql.customs_by_term, sql.policies_by_term):
            for term, n in self._key_read(_fetch_all(statement, {})):
                counts[int(term)] = counts.get(int(term), 0) + int(n)
        self._counts = (time.monotonic(), counts)
        return dict(counts)

    def keyring_status(self, *, fresh: bool = False) -> KeyringStatus:
        """The data keys and the re-wrap's progress (`StorageError` while locked): blocking, it reads the rows."""
        keyring = self.keyring()
        target = KeyState.cluster_state(self).rewrap_target
        return KeyringStatus(
            keyring.active,
            tuple((t.term, t.created) for t in keyring.terms),
            self.values_by_term(fresh=fresh),
            target,
            self.rewrap_running,
            self.rewrapped,
        )

    @property
    def rewrap_running(self) -> bool:
        """True while this instance runs a re-wrap (it holds the claim and has work)."""
        rewrapper = self._rewrapper
        return rewrapper is not None and rewrapper.running

    def start_rewrap(self) -> None:
        """Run the stored re-wrap in the background, unless this instance already does."""
        with self._keyring_lock:
            if self._rewrapper is not None and self._rewrapper.alive:
                self._rewrapper.wake()
                return
            self._rewrapper = Rewrapper(self)

    def _stop_rewrap(self, *, wait: bool = True) -> None:
        rewrapper, self._rewrapper = self._rewrapper, None
        if rewrapper is not None:
            rewrapper.stop(wait=wait)


class Rewrapper:
    """The background re-wrap of one instance: passes over every stored value until none is left to do.

    It runs while the store is unlocked and a re-wrap is stored
    (`rewrap_target`), and only while it holds the store's claim (with
    several instances: one at a time).  A pass goes through every value below
    the newest term once, in key order; passes repeat until one seals nothing
    again (values written under an older term meanwhile, by an instance that
    had not seen the new term yet, are caught by the next pass), then the
    stored re-wrap is ended.  Values that cannot be opened are left as they
    are, and counted.
    """

    def __init__(self, store: DataKeys[Any]) -> None:
        self._store = store
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.running = False
        self._thread = threading.Thread(target=self._run, name="spike-rewrap", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, *, wait: bool) -> None:
        self._stop.set()
        self._wake.set()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._store._rewrap_claim() as claimed:
                    if claimed and self._work():
                        return
            except StorageError as exc:
                log.warning("re-wrap paused (%s): tried again in %gs", exc, REWRAP_RETRY)
            except Exception:  # a bug: said with its traceback, and the server goes on
                log.exception("re-wrap failed: tried again in %gs", REWRAP_RETRY)
            self.running = False
            self._wake.wait(REWRAP_RETRY)
            self._wake.clear()

    def _work(self) -> bool:
        """Re-wrap until the stored re-wrap is done (True) or this instance must stop (False)."""
        store = self._store
        while not self._stop.is_set():
            target = KeyState.cluster_state(store).rewrap_target
            if target is None:
                return True
            self.running = True
            term = store.keyring().active
            if term < target:
                term = store.reload_keyring().active
            started = time.monotonic()
            done = unreadable = 0
            cursor: RewrapCursor | None = RewrapCursor()
            while cursor is not None:
                if self._stop.is_set():
                    return False
                batch = store.rewrap_batch(term, cursor, limit=store.rewrap_batch_size)
                done, unreadable, cursor = done + batch.rewrapped, unreadable + batch.unreadable, batch.next
                if store.rewrap_pause:
                    self._stop.wait(store.rewrap_pause)
            log.info(
                "re-wrap pass to data-key term %d: %d value(s) sealed again in %.1fs, %d left unreadable",
                term,
                done,
                time.monotonic() - started,
                unreadable,
            )
            if done == 0 and store.end_rewrap(target):
                self.running = False
                log.info("re-wrap to data-key term %d done", term)
                return True
        return False
