"""Reading a SPIKE Go Nexus's SQLite database, with SPIKE's root key, as its Go code stores it.

What is on disk is what spiffe/spike's `app/nexus/internal/state/backend/sqlite` writes (its code, not
its docs, decides):

* three tables (`ddl/statement.go`): ``policies``, ``secrets`` (one row per version) and
  ``secret_metadata`` (one row per path); no schema version (``PRAGMA user_version`` stays 0);
* every sealed column is AES-256-GCM under the raw 32-byte root key (`construct.go`), a 12-byte nonce,
  no associated data (`persist/crypto.go`);
* a version's ``encrypted_data`` is the JSON of its values map, under the row's own nonce;
  ``created_time``/``deleted_time`` are mattn/go-sqlite3's text form of a Go ``time.Time``
  (``2006-01-02 15:04:05.999999999-07:00``), ``deleted_time`` NULL for a live version;
* a metadata row has one nonce, and each field is sealed under it XORed with a 12-byte salt naming the
  field (`persist/field_nonce.go`); the plaintexts are decimal text: versions, Unix seconds;
* a policy's three sealed columns share the row's one nonce (`persist/policy.go`); permissions are one
  comma-separated string; ``created_time``/``updated_time`` are Unix seconds in clear.

A secret whose every version is soft-deleted has ``current_version`` 0 (SPIKE's "deleted secret").  Version
rows stay after SPIKE trims a secret to its ``max_versions`` (its SQLite store upserts, never deletes),
and SPIKE's loader serves them: they are read here too.  Rows of ``secrets`` with no metadata row are
invisible to SPIKE (it lists paths from ``secret_metadata``) and are counted, not read.

The database is opened read-only; nothing here writes anything, and no error names a value.
"""

from __future__ import annotations

import calendar
import json
import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from spike.app.model import kv
from spike.protocol.material import RootKey

NONCE_SIZE = 12
TABLES: dict[str, tuple[str, ...]] = {
    "policies": (
        "name",
        "nonce",
        "encrypted_spiffe_id_pattern",
        "encrypted_path_pattern",
        "encrypted_permissions",
        "created_time",
        "updated_time",
    ),
    "secrets": ("path", "version", "nonce", "encrypted_data", "created_time", "deleted_time"),
    "secret_metadata": (
        "path",
        "nonce",
        "encrypted_current_version",
        "encrypted_oldest_version",
        "encrypted_created_time",
        "encrypted_updated_time",
        "encrypted_max_versions",
    ),
}
# persist/field_nonce.go: each metadata field's nonce is the row's XOR this salt.
FIELD_SALTS: dict[str, bytes] = {
    "current_version": b"current_ver_",
    "oldest_version": b"oldest_ver__",
    "created_time": b"created_tim_",
    "updated_time": b"updated_tim_",
    "max_versions": b"max_versions",
}
# mattn/go-sqlite3's SQLiteTimestampFormats, as one pattern: date, optional time, fraction and zone.
_GO_TIME = re.compile(r"(\d{4})-(\d\d)-(\d\d)(?:[ T](\d\d):(\d\d)(?::(\d\d)(?:\.(\d{1,9}))?)?)?(Z|[+-]\d\d:\d\d)?")


class SpikeDbError(Exception):
    """The database cannot be read as SPIKE's: one line, never a value."""


class WrongKey(SpikeDbError):
    """A sealed column does not open under the rebuilt key: the shards are too few, inconsistent or another's."""


@dataclass(frozen=True, slots=True)
class SpikePolicy:
    name: str
    spiffe_id_pattern: str
    path_pattern: str
    permissions: tuple[str, ...]
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class SpikeData:
    """Everything SPIKE would serve from the database, opened; `orphans` counts version rows it cannot see."""

    secrets: tuple[kv.ImportedSecret, ...]
    policies: tuple[SpikePolicy, ...]
    orphans: int = 0


def field_nonce(nonce: bytes, field: str) -> bytes:
    """SPIKE's `deriveFieldNonce`: the row's nonce XOR the field's 12-byte salt."""
    salt = FIELD_SALTS[field]
    if len(nonce) != len(salt):
        raise SpikeDbError(f"a metadata nonce is {len(nonce)} bytes, not {len(salt)}")
    return bytes(a ^ b for a, b in zip(nonce, salt, strict=True))


def go_time(value: object) -> float:
    """Unix seconds of a time as mattn/go-sqlite3 stores a Go ``time.Time`` (text; or Unix seconds)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        raise SpikeDbError(f"a time column holds {type(value).__name__}, not a time")
    match = _GO_TIME.fullmatch(value.strip())
    if match is None:
        raise SpikeDbError(f"a time column holds {value[:40]!r}, not a time")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    seconds = calendar.timegm(
        (int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0), 0, 0, 0)
    )
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return seconds + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)


class SpikeCipher:
    """SPIKE's sealing: AES-256-GCM under the raw root key, no associated data."""

    def __init__(self, key: RootKey) -> None:
        self._aead = AESGCM(key.secret_bytes())

    def open(self, sealed: object, nonce: object, what: str) -> bytes:
        if not isinstance(sealed, bytes) or not isinstance(nonce, bytes):
            raise SpikeDbError(f"{what}: a sealed column is not a BLOB")
        if len(nonce) != NONCE_SIZE:
            raise SpikeDbError(f"{what}: its nonce is {len(nonce)} bytes, not {NONCE_SIZE}")
        try:
            return self._aead.decrypt(nonce, sealed, None)
        except InvalidTag:
            raise WrongKey(
                f"{what} does not open under the key the shards rebuild: too few shards, shards of another "
                "deployment, or a tampered row"
            ) from None


def open_database(path: Path) -> sqlite3.Connection:
    """`path` opened read-only, its schema checked as SPIKE's; `SpikeDbError` in one line otherwise."""
    if not path.is_file():
        raise SpikeDbError(f"{path} is not a file")
    try:
        with path.open("rb") as probe:
            head = probe.read(16)
    except OSError as exc:
        raise SpikeDbError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head != b"SQLite format 3\x00":
        raise SpikeDbError(f"{path} is not an SQLite database (SPIKE's Nexus keeps one, spike.db)")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise SpikeDbError(f"cannot open {path}: {exc}") from None
    try:
        check_schema(conn, path)
    except sqlite3.Error as exc:
        conn.close()
        raise SpikeDbError(f"cannot read {path}: {exc}") from None
    except SpikeDbError:
        conn.close()
        raise
    return conn


def check_schema(conn: sqlite3.Connection, path: Path) -> None:
    """The tables and columns SPIKE's DDL creates, and no schema version: else this spike does not know it."""
    (user_version,) = conn.execute("PRAGMA user_version").fetchone()
    if user_version != 0:
        raise SpikeDbError(
            f"{path} has schema version {user_version}; SPIKE's Go code sets none (0): written by a "
            "SPIKE this spike does not know"
        )
    for table, columns in TABLES.items():
        found = tuple(row[1] for row in conn.execute(f"PRAGMA table_info({table})"))
        if not found:
            raise SpikeDbError(f"{path} is not a SPIKE database: it has no table {table}")
        if sorted(found) != sorted(columns):
            raise SpikeDbError(
                f"{path} has an unknown SPIKE schema: table {table} has columns {', '.join(found)}, "
                f"this spike reads {', '.join(columns)}"
            )


def read_database(path: Path, key: RootKey) -> SpikeData:
    """Every secret (each version) and policy of a SPIKE database, opened with SPIKE's root key."""
    conn = open_database(path)
    try:
        cipher = SpikeCipher(key)
        return SpikeData(
            tuple(_secrets(conn, cipher)),
            tuple(_policies(conn, cipher)),
            _orphans(conn),
        )
    except sqlite3.Error as exc:
        raise SpikeDbError(f"cannot read {path}: {exc}") from None
    finally:
        conn.close()


def _number(text: bytes, what: str) -> int:
    try:
        return int(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise SpikeDbError(f"{what} is not a decimal number") from None


def _secrets(conn: sqlite3.Connection, cipher: SpikeCipher) -> Iterable[kv.ImportedSecret]:
    rows = conn.execute(
        "SELECT path, nonce, encrypted_current_version, encrypted_oldest_version, encrypted_created_time, "
        "encrypted_updated_time, encrypted_max_versions FROM secret_metadata ORDER BY path"
    ).fetchall()
    for path, nonce, *sealed in rows:
        if not isinstance(path, str):
            raise SpikeDbError("a secret_metadata row has a path that is not text")
        what = f"the metadata of secret {path}"
        if not isinstance(nonce, bytes):
            raise SpikeDbError(f"{what}: its nonce is not a BLOB")
        fields = {}
        for field, blob in zip(FIELD_SALTS, sealed, strict=True):
            plain = cipher.open(blob, field_nonce(nonce, field), what)
            fields[field] = _number(plain, f"{what} ({field})")
        versions = tuple(_versions(conn, cipher, path))
        current = fields["current_version"]
        if not versions:
            raise SpikeDbError(f"secret {path} has metadata but no version (SPIKE's own loader cannot use it)")
        if current and current not in {v.version for v in versions}:
            raise SpikeDbError(f"secret {path}: its current version {current} is missing (SPIKE refuses it too)")
        yield kv.ImportedSecret(
            path,
            versions,
            float(fields["created_time"]),
            float(fields["updated_time"]),
            fields["max_versions"],
        )


def _versions(conn: sqlite3.Connection, cipher: SpikeCipher, path: str) -> Iterable[kv.ImportedVersion]:
    rows = conn.execute(
        "SELECT version, nonce, encrypted_data, created_time, deleted_time FROM secrets "
        "WHERE path = ? ORDER BY version",
        (path,),
    ).fetchall()
    for version, nonce, sealed, created, deleted in rows:
        if not isinstance(version, int):
            raise SpikeDbError(f"secret {path}: a version number is not an integer")
        what = f"secret {path} version {version}"
        plain = cipher.open(sealed, nonce, what)
        try:
            values = json.loads(plain)
        except (UnicodeDecodeError, ValueError):
            raise SpikeDbError(f"{what}: its values are not JSON") from None
        if not isinstance(values, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in values.items()
        ):
            raise SpikeDbError(f"{what}: its values are not a map of strings")
        yield kv.ImportedVersion(version, values, go_time(created), None if deleted is None else go_time(deleted))


def _policies(conn: sqlite3.Connection, cipher: SpikeCipher) -> Iterable[SpikePolicy]:
    rows = conn.execute(
        "SELECT name, nonce, encrypted_spiffe_id_pattern, encrypted_path_pattern, encrypted_permissions, "
        "created_time, updated_time FROM policies ORDER BY name"
    ).fetchall()
    for name, nonce, spiffe_id, path_pattern, permissions, created, updated in rows:
        if not isinstance(name, str):
            raise SpikeDbError("a policy row has a name that is not text")
        what = f"policy {name}"
        opened = [cipher.open(blob, nonce, what) for blob in (spiffe_id, path_pattern, permissions)]
        try:
            spiffe_text, path_text, permission_text = (p.decode("utf-8") for p in opened)
        except UnicodeDecodeError:
            raise SpikeDbError(f"{what}: a pattern is not UTF-8") from None
        # persist/transform.go deserializePermissions: split on commas, trimmed; empty is none.
        granted = tuple(p.strip() for p in permission_text.split(",")) if permission_text else ()
        if not isinstance(created, int) or not isinstance(updated, int):
            raise SpikeDbError(f"{what}: its times are not Unix seconds")
        yield SpikePolicy(name, spiffe_text, path_text, granted, float(created), float(updated))


def _orphans(conn: sqlite3.Connection) -> int:
    (count,) = conn.execute(
        "SELECT count(*) FROM secrets WHERE path NOT IN (SELECT path FROM secret_metadata)"
    ).fetchone()
    return int(count)
