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

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import msgspec

from spike.app.store.backend import ClusterState
from spike.app.store.errors import EpochUsed, StorageError
from spike.app.store.sql_store import C
from spike.app.store.statements import rendered
from spike.protocol.pending import PendingRotation
from spike.protocol.record import KeyRecord

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class KeyStatements:
    record: str = "SELECT record FROM key_record WHERE id = 1"
    keyring: str = "SELECT epoch, keyring FROM key_record WHERE id = 1"
    # The whole key state in one statement (one snapshot): record, high-water mark, pending rotation, its keyring.
    state: str = (
        "SELECT (SELECT record FROM key_record WHERE id = 1), (SELECT highest_epoch FROM key_record WHERE id = 1), "
        "(SELECT pending FROM pending_rotation WHERE id = 1), (SELECT keyring FROM pending_rotation WHERE id = 1)"
    )
    # What other instances may have changed: the key state and the policies' change counter.
    cluster_state: str = (
        "SELECT (SELECT record FROM key_record WHERE id = 1), (SELECT version FROM policy_version WHERE id = 1), "
        "(SELECT pending FROM pending_rotation WHERE id = 1), (SELECT highest_epoch FROM key_record WHERE id = 1)"
    )
    insert_record: str = (
        "INSERT INTO key_record (id, epoch, record, updated_at, highest_epoch, keyring) "
        "VALUES (1, :epoch, :record, CURRENT_TIMESTAMP, :epoch, NULL)"
    )
    # The high-water mark never goes down.
    replace_record: str = (
        "UPDATE key_record SET epoch = :epoch, record = :record, updated_at = CURRENT_TIMESTAMP, "
        "highest_epoch = CASE WHEN highest_epoch > :epoch THEN highest_epoch ELSE :epoch END, "
        "keyring = :keyring WHERE id = 1"
    )
    raise_highest: str = (
        "UPDATE key_record SET highest_epoch = CASE WHEN highest_epoch > :epoch THEN highest_epoch ELSE :epoch END "
        "WHERE id = 1"
    )
    insert_pending: str = (
        "INSERT INTO pending_rotation (id, from_epoch, epoch, pending, keyring, created_at) "
        "VALUES (1, :from_epoch, :epoch, :pending, :keyring, CURRENT_TIMESTAMP)"
    )
    delete_pending: str = "DELETE FROM pending_rotation WHERE id = 1"


KEY_SQL = KeyStatements()


@dataclass(frozen=True, slots=True)
class _State:
    """The key state as one change reads it."""

    record: KeyRecord | None
    highest_epoch: int
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
        record, highest, pending, keyring = conn.execute(self._key_sql.state, {}).fetchone()
        return _State(
            None if record is None else decode_record(record),
            int(highest or 0),
            None if pending is None else bytes(pending),
            None if keyring is None else bytes(keyring),
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
        and the keyring (the new root key cannot open it), and keeps the
        high-water mark: `EpochUsed` (nothing changes) unless `record`'s epoch
        is above it.
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
            params = {"epoch": record.epoch, "record": msgspec.json.encode(record), "keyring": None}
            conn.execute(sql.replace_record, params)
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

        Refused unless the stored record is still the one it starts from
        (`pending.from_epoch` and its key check value), no pending rotation is
        stored, and its new epoch is above the high-water mark (another
        instance may have abandoned a rotation to that epoch).  True if this
        very rotation is stored already.
        """
        sql = self._key_sql
        encoded = encode_pending(pending)

        def change(conn: C) -> bool:
            state = self._state(conn)
            if state.pending is not None:
                return state.pending == encoded
            if state.record is None or not pending.starts_from(state.record):
                return False
            if pending.record.epoch <= state.highest_epoch:
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
            conn.execute(sql.replace_record, params)
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

    # ------------------------------------------------------------------ several instances

    def cluster_state(self) -> ClusterState:
        """The key record, the policies' change counter and the rotation state as stored now, in one read."""
        statement = self._key_sql.cluster_state

        def read(conn: C) -> ClusterState:
            record, version, pending, highest = conn.execute(statement, {}).fetchone()
            return ClusterState(
                None if record is None else decode_record(record),
                int(version or 0),
                None if pending is None else decode_pending(pending),
                int(highest or 0),
            )

        return self._key_read(read)


def rendered_key_sql(parameter: str) -> KeyStatements:
    return rendered(KEY_SQL, parameter, "= ANY(:%s)")
