"""The key state both databases keep, written once: the key record, the epochs' high-water mark, the pending rotation.

Nothing here is secret in clear (docs/key-lifecycle.md section 4):

* ``key_record`` (one row): the record in force (`KeyRecord`), `highest_epoch`
  (the highest key epoch the deployment ever used, abandoned rotations
  included: a new epoch must be above it) and `keyring` (the keyring of data
  keys, wrapped under a key derived from the record's root key; keyring.py);
* ``pending_rotation`` (at most one row): a rotation stored but not committed
  (`PendingRotation`, which holds the new record and each root key wrapped under
  the other) and the keyring wrapped under the *new* root key, which becomes
  the record's keyring at the commit.

Every change is one transaction that excludes every other change of the key
state (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: the key epoch's advisory lock,
exclusive, which also waits for the write transactions under way) and is a
compare-and-set on what it reads first.  Every change is idempotent: run again
after it committed (PostgreSQL retries a statement whose connection broke,
which may be one whose COMMIT went through), it answers as the first run did,
so a caller never takes a change that happened for one that was refused.

A backend provides `_key_read(work)` (one read) and `_key_change(work)` (one
exclusive transaction); the statements are written once with named
parameters and rendered for each driver (statements.py).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from spike.app.store.backend import ClusterState
from spike.app.store.errors import EpochUsed, RotationUnderWay, StorageError
from spike.app.store.keyring import Keyring, wrapped_header
from spike.app.store.statements import rendered
from spike.protocol.material import RootKey
from spike.protocol.pending import PendingRotation
from spike.protocol.record import KeyRecord

T = TypeVar("T")


class Connection(Protocol):
    """What an operation uses of a connection: sqlite3's and psycopg's both have it."""

    def execute(self, query: str, params: dict[str, Any], /) -> Any: ...


C = TypeVar("C", bound=Connection)


class KeyStatements(msgspec.Struct, frozen=True):
    record: str = "SELECT record FROM key_record WHERE id = 1"
    keyring: str = "SELECT epoch, keyring FROM key_record WHERE id = 1"
    # The whole key state in one statement (one snapshot), whatever is stored.
    state: str = (
        "SELECT k.record, k.highest_epoch, k.keyring, k.highest_term, k.first_term, k.legacy_epoch, "
        "k.rewrap_target, p.pending, p.keyring FROM (SELECT 1 AS one) AS o "
        "LEFT JOIN key_record AS k ON k.id = 1 LEFT JOIN pending_rotation AS p ON p.id = 1"
    )
    # What other instances may have changed: the key state and the policies' change counter.
    cluster_state: str = (
        "SELECT (SELECT record FROM key_record WHERE id = 1), (SELECT version FROM policy_version WHERE id = 1), "
        "(SELECT pending FROM pending_rotation WHERE id = 1), (SELECT highest_epoch FROM key_record WHERE id = 1), "
        "(SELECT highest_term FROM key_record WHERE id = 1), (SELECT rewrap_target FROM key_record WHERE id = 1)"
    )
    insert_record: str = (
        "INSERT INTO key_record (id, epoch, record, updated_at, highest_epoch, keyring, highest_term, first_term, "
        "legacy_epoch, rewrap_target) VALUES (1, :epoch, :record, CURRENT_TIMESTAMP, :epoch, NULL, 0, 0, NULL, NULL)"
    )
    # bootstrap --force: the keyring goes with the root key it was wrapped under, and every term it had is
    # gone; the high-water marks never go down.
    force_record: str = (
        "UPDATE key_record SET epoch = :epoch, record = :record, updated_at = CURRENT_TIMESTAMP, "
        "highest_epoch = CASE WHEN highest_epoch > :epoch THEN highest_epoch ELSE :epoch END, "
        "keyring = NULL, first_term = highest_term + 1, legacy_epoch = NULL, rewrap_target = NULL WHERE id = 1"
    )
    # A rotation's commit: the same keyring, wrapped under the new root key.
    commit_record: str = (
        "UPDATE key_record SET epoch = :epoch, record = :record, updated_at = CURRENT_TIMESTAMP, "
        "highest_epoch = CASE WHEN highest_epoch > :epoch THEN highest_epoch ELSE :epoch END, "
        "keyring = :keyring WHERE id = 1"
    )
    raise_highest: str = (
        "UPDATE key_record SET highest_epoch = CASE WHEN highest_epoch > :epoch THEN highest_epoch ELSE :epoch END "
        "WHERE id = 1"
    )
    # A keyring made (its legacy term, if any, is in it now) or given a new term.
    store_keyring: str = (
        "UPDATE key_record SET keyring = :keyring, highest_term = :term, legacy_epoch = NULL, "
        "rewrap_target = CASE WHEN :rewrap THEN :term ELSE rewrap_target END WHERE id = 1 AND epoch = :epoch"
    )
    set_rewrap: str = "UPDATE key_record SET rewrap_target = :target WHERE id = 1"
    end_rewrap: str = "UPDATE key_record SET rewrap_target = NULL WHERE id = 1 AND rewrap_target = :target"
    insert_pending: str = (
        "INSERT INTO pending_rotation (id, from_epoch, epoch, pending, keyring, created_at) "
        "VALUES (1, :from_epoch, :epoch, :pending, :keyring, CURRENT_TIMESTAMP)"
    )
    delete_pending: str = "DELETE FROM pending_rotation WHERE id = 1"


KEY_SQL = KeyStatements()


class _State(msgspec.Struct, frozen=True):
    """The key state as one change reads it."""

    record: KeyRecord | None
    highest_epoch: int
    keyring: bytes | None  # wrapped under the record's root key
    highest_term: int  # the highest data-key term the database ever had
    first_term: int  # terms below it went with a replaced root key
    legacy_epoch: int | None  # values were sealed before the keyring under this epoch's root key
    rewrap_target: int | None
    pending: bytes | None  # as stored: compared byte for byte with an encoded `PendingRotation`
    pending_keyring: bytes | None


def encode_pending(pending: PendingRotation) -> bytes:
    return msgspec.json.encode(pending)


def decode_record(data: bytes) -> KeyRecord:
    try:
        return msgspec.json.decode(bytes(data), type=KeyRecord).validate()
    except (msgspec.DecodeError, ValueError) as exc:
        raise StorageError(f"the stored key record is damaged: {exc}") from None


def decode_pending(data: bytes) -> PendingRotation:
    try:
        return msgspec.json.decode(bytes(data), type=PendingRotation).validate()
    except (msgspec.DecodeError, ValueError) as exc:
        raise StorageError(f"the stored pending rotation is damaged: {exc}") from None


def _blob(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def _number(value: Any) -> int | None:
    return None if value is None else int(value)


class KeyState(ABC, Generic[C]):
    """The key record and the rotation state on a SQL database; a backend provides `_key_read` and `_key_change`."""

    _key_sql: KeyStatements  # KEY_SQL, rendered for the driver

    @abstractmethod
    def _key_read(self, work: Callable[[C], T]) -> T:
        """Run one read of the key state."""

    @abstractmethod
    def _key_change(self, work: Callable[[C], T]) -> T:
        """Run `work` in one transaction that excludes every other change of the key state, and commit it."""

    def _state(self, conn: C) -> _State:
        row = conn.execute(self._key_sql.state, {}).fetchone()
        record, highest, keyring, highest_term, first_term, legacy, rewrap, pending, pending_keyring = row
        return _State(
            None if record is None else decode_record(record),
            int(highest or 0),
            _blob(keyring),
            int(highest_term or 0),
            int(first_term or 0),
            _number(legacy),
            _number(rewrap),
            _blob(pending),
            _blob(pending_keyring),
        )

    # ------------------------------------------------------------------ the key record

    def load_key_record(self) -> KeyRecord | None:
        """The stored key record, or None before the first bootstrap."""
        statement = self._key_sql.record
        row = self._key_read(lambda c: c.execute(statement, {}).fetchone())
        return None if row is None else decode_record(row[0])

    def load_keyring(self) -> tuple[int, bytes | None] | None:
        """(the record's epoch, the keyring stored wrapped under its root key, or None), or None before a bootstrap."""
        statement = self._key_sql.keyring
        row = self._key_read(lambda c: c.execute(statement, {}).fetchone())
        return None if row is None else (int(row[0]), None if row[1] is None else bytes(row[1]))

    def install_key_record(self, record: KeyRecord, *, replace: KeyRecord | None) -> KeyRecord:
        """Store `record` and return the record now in force.

        With `replace` None, only if no record is stored yet; otherwise only if
        the stored record is still `replace` (or none is stored).  When the
        answer is not `record`, another record was there first: use it instead.
        A replacement (`spike bootstrap --force`) deletes any pending rotation
        and the keyring (the new root key cannot open it: every value sealed
        under it is gone), and keeps the high-water marks of epochs and terms:
        `EpochUsed` (nothing changes) unless `record`'s epoch is above every
        epoch used.
        """
        sql = self._key_sql

        def change(conn: C) -> KeyRecord:
            state = self._state(conn)
            current = state.record
            if current is None:
                conn.execute(sql.insert_record, {"epoch": record.epoch, "record": msgspec.json.encode(record)})
                conn.execute(sql.delete_pending, {})
                return record
            if replace is None or current != replace:
                return current
            if record.epoch <= state.highest_epoch:
                raise EpochUsed(
                    f"key epoch {record.epoch} is not above {state.highest_epoch}, the highest epoch this "
                    "deployment has used (epochs are never reused): bootstrap again with a higher epoch"
                )
            conn.execute(sql.force_record, {"epoch": record.epoch, "record": msgspec.json.encode(record)})
            conn.execute(sql.delete_pending, {})
            return record

        return self._key_change(change)

    # ------------------------------------------------------------------ rotations

    def load_rotation_state(self) -> tuple[PendingRotation | None, bytes | None, int]:
        """(the pending rotation or None, the keyring stored with it or None, the epochs' high-water mark).

        The high-water mark is 0 before the first bootstrap, and never below the
        stored record's epoch.
        """
        state = self._key_read(self._state)
        pending = None if state.pending is None else decode_pending(state.pending)
        epoch = 0 if state.record is None else state.record.epoch
        return pending, state.pending_keyring, max(state.highest_epoch, epoch)

    def persist_rotation(self, pending: PendingRotation, keyring_blob: bytes) -> bool:
        """Store `pending` and the keyring wrapped under its new key; False (nothing changes) if refused.

        `keyring_blob` is ``keyring.wrap(new_key, pending.record.epoch)``
        (keyring.py).  Refused unless the stored record is still the one it
        starts from (`pending.from_epoch` and its key check value), no pending
        rotation is stored, its new epoch is above the high-water mark (another
        instance may have abandoned a rotation to that epoch), and the keyring
        is the one stored, up to its newest term (no data-key rotation since it
        was wrapped).  True if this very rotation is stored already.
        `ValueError` if `keyring_blob` is no wrapped keyring of the new epoch.
        """
        sql = self._key_sql
        encoded = encode_pending(pending)
        wrapped_epoch, newest_term = wrapped_header(keyring_blob)
        if wrapped_epoch != pending.record.epoch:
            raise ValueError(f"the keyring is wrapped for epoch {wrapped_epoch}, not {pending.record.epoch}")

        def change(conn: C) -> bool:
            state = self._state(conn)
            if state.pending is not None:
                return state.pending == encoded
            if state.record is None or not pending.starts_from(state.record):
                return False
            if pending.record.epoch <= state.highest_epoch:
                return False
            if state.keyring is None or newest_term != state.highest_term:
                return False
            params = {
                "from_epoch": pending.from_epoch,
                "epoch": pending.record.epoch,
                "pending": encoded,
                "keyring": keyring_blob,
            }
            conn.execute(sql.insert_pending, params)
            return True

        return self._key_change(change)

    def commit_rotation(self, pending: PendingRotation) -> bool:
        """In one write: record := `pending.record`, keyring := the keyring stored with it, pending deleted,
        high-water mark raised to the new epoch.

        False (nothing changes) unless `pending` is the stored pending rotation
        and the record is still the one it starts from.  True if it is
        committed already (record in force is `pending.record`, none pending).
        """
        sql = self._key_sql
        encoded = encode_pending(pending)

        def change(conn: C) -> bool:
            state = self._state(conn)
            if state.pending is None:
                return state.record == pending.record
            if state.pending != encoded or state.record is None or not pending.starts_from(state.record):
                return False
            record = pending.record
            params = {"epoch": record.epoch, "record": msgspec.json.encode(record), "keyring": state.pending_keyring}
            conn.execute(sql.commit_record, params)
            conn.execute(sql.delete_pending, {})
            return True

        return self._key_change(change)

    def abandon_rotation(self, pending: PendingRotation) -> bool:
        """Delete `pending` and raise the high-water mark to its epoch, which is never used again.

        False (nothing changes) if another pending rotation is stored, or this
        one was committed.  True if none is stored and this one's epoch is not
        in force (it was abandoned already, or never stored): the mark is
        raised all the same.
        """
        sql = self._key_sql
        encoded = encode_pending(pending)

        def change(conn: C) -> bool:
            state = self._state(conn)
            if state.pending is not None and state.pending != encoded:
                return False
            if state.pending is None and state.record == pending.record:
                return False
            conn.execute(sql.delete_pending, {})
            conn.execute(sql.raise_highest, {"epoch": pending.record.epoch})
            return True

        return self._key_change(change)

    # ------------------------------------------------------------------ the keyring (keyring.py)

    def open_keyring(
        self, root_key: RootKey, epoch: int, *, now: float, random_bytes: Callable[[int], bytes] = os.urandom
    ) -> Keyring:
        """The stored keyring, opened with `root_key` (the stored record's, of `epoch`); made if there is none.

        A keyring is made the first time the record's key is used: one new
        term, above every term the database ever had, and, in a database
        stored before the keyring, the legacy term its values were sealed
        under.  Of instances making it at once, one wins and all use it.
        `StorageError` if the stored record is not of `epoch` (the key is
        another's), or the stored keyring does not open with `root_key`.
        """
        sql = self._key_sql

        def usable(state: _State) -> bytes | None:
            if state.record is None:
                raise StorageError("no key record is stored: the store has no keyring before a bootstrap")
            if state.record.epoch != epoch:
                raise StorageError(f"the stored key record is of epoch {state.record.epoch}, not {epoch}")
            return state.keyring

        def opened(state: _State, stored: bytes) -> Keyring:
            keyring = Keyring.unwrap(stored, root_key, epoch, random_bytes)
            if keyring.active != state.highest_term:
                # Terms are only added, in the write that stores the keyring holding them: a keyring without
                # the newest is an older copy put back.
                raise StorageError(
                    f"the stored keyring's newest data-key term is {keyring.active}, but term "
                    f"{state.highest_term} was made: it was replaced with an older copy"
                )
            return keyring

        state = self._key_read(self._state)
        stored = usable(state)
        if stored is not None:
            return opened(state, stored)

        def make(conn: C) -> Keyring:
            state = self._state(conn)
            stored = usable(state)
            if stored is not None:  # another instance made it meanwhile
                return opened(state, stored)
            legacy = state.legacy_epoch if state.legacy_epoch == epoch else None
            keyring = Keyring.create(
                root_key, term=state.highest_term + 1, legacy_epoch=legacy, now=now, random_bytes=random_bytes
            )
            params = {"keyring": keyring.wrap(root_key, epoch), "term": keyring.active, "rewrap": False, "epoch": epoch}
            conn.execute(sql.store_keyring, params)
            return keyring

        return self._key_change(make)

    def add_data_term(
        self,
        root_key: RootKey,
        epoch: int,
        *,
        now: float,
        rewrap: bool,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> Keyring:
        """The stored keyring with one new term, for new values, stored in one write; the new keyring.

        With `rewrap`, a re-wrap of stored values to the new term is recorded
        as under way (it resumes after a restart).  `RotationUnderWay` while a
        root key rotation is stored (its keyring is wrapped under the new key
        already: the new term would be lost at its commit); `StorageError` if
        the stored record is not of `epoch`.
        """
        sql = self._key_sql

        def change(conn: C) -> Keyring:
            state = self._state(conn)
            if state.pending is not None:
                raise RotationUnderWay(
                    "a root key rotation is under way: rotate the data key once it is committed or abandoned"
                )
            if state.record is None or state.record.epoch != epoch or state.keyring is None:
                raise StorageError("the stored key record or keyring changed: try again once this Nexus follows it")
            keyring = Keyring.unwrap(state.keyring, root_key, epoch, random_bytes)
            keyring = keyring.with_term(max(state.highest_term, keyring.active) + 1, now)
            params = {
                "keyring": keyring.wrap(root_key, epoch),
                "term": keyring.active,
                "rewrap": rewrap,
                "epoch": epoch,
            }
            conn.execute(sql.store_keyring, params)
            return keyring

        return self._key_change(change)

    def set_rewrap_target(self, target: int | None) -> None:
        """Record a re-wrap of stored values to term `target` as under way (None: none)."""
        statement = self._key_sql.set_rewrap
        self._key_change(lambda conn: conn.execute(statement, {"target": target}))

    def end_rewrap(self, target: int) -> bool:
        """The re-wrap to `target` is done: forget it, unless another was asked for meanwhile; whether it was."""
        statement = self._key_sql.end_rewrap
        return bool(self._key_change(lambda conn: conn.execute(statement, {"target": target}).rowcount))

    # ------------------------------------------------------------------ several instances

    def cluster_state(self) -> ClusterState:
        """The key record, the policies' change counter and the rotation state as stored now, in one read."""
        statement = self._key_sql.cluster_state

        def read(conn: C) -> ClusterState:
            record, version, pending, highest, term, rewrap = conn.execute(statement, {}).fetchone()
            return ClusterState(
                None if record is None else decode_record(record),
                int(version or 0),
                None if pending is None else decode_pending(pending),
                int(highest or 0),
                int(term or 0),
                _number(rewrap),
            )

        return self._key_read(read)


def rendered_key_sql(parameter: str) -> KeyStatements:
    return rendered(KEY_SQL, parameter, "= ANY(:%s)")
