"""Versioned key-value semantics (Vault KV v2), independent of any database.

A storage backend loads a secret's `SecretMeta` and version rows inside its
transaction, asks these functions what to change, and writes the result;
that keeps one definition of check-and-set, soft delete, undelete, destroy
and version pruning for SQLite and PostgreSQL alike, and lets the property
tests compare it with a plain in-memory model.
"""

from __future__ import annotations

import re

import msgspec

DEFAULT_MAX_VERSIONS = 10
MAX_MAX_VERSIONS = 1000
MAX_PATH_BYTES = 512
MAX_KEY_BYTES = 128
MAX_VALUES_BYTES = 64 * 1024  # keys + values of one version, UTF-8
MAX_CUSTOM_METADATA = 64  # entries
MAX_CUSTOM_METADATA_BYTES = 8 * 1024
MAX_VERSION = 2**31 - 1
MAX_VERSIONS_PER_REQUEST = 1000

_SEGMENT = re.compile(r"[A-Za-z0-9._@+=~-]+")
_KEY = re.compile(r"[A-Za-z0-9._-]+")
# What SPIKE's secret paths may also hold (spike-sdk-go validation.validPath: ()?+*|[]{}\), on its routes.
_SPIKE_SEGMENT = re.compile(r"[A-Za-z0-9._@+=~()?*|\[\]{}\\-]+")
# Secret key names: ours, and SPIKE's (validation.ValidateName: letters, digits, -, _ and spaces, up to 250).
MAX_VALUE_KEY_BYTES = 250
_VALUE_KEY = re.compile(r"[A-Za-z0-9._ -]+")


class KvError(Exception):
    """A request that cannot be carried out; `status` and `code` are what the API answers."""

    status = 400
    code = "api_bad_request"


class InvalidRequest(KvError):
    pass


class NotFound(KvError):
    status = 404
    code = "api_not_found"


class CasMismatch(KvError):
    status = 409
    code = "api_conflict"


class CasRequired(InvalidRequest):
    """The secret requires check-and-set and the write sent none (400, as any invalid request)."""


def check_path(path: str) -> str:
    """Secret paths are slash-separated segments, no leading or trailing slash, no `.`/`..`."""
    if not isinstance(path, str) or not path:
        raise InvalidRequest("path is empty")
    if len(path.encode()) > MAX_PATH_BYTES:
        raise InvalidRequest(f"path is longer than {MAX_PATH_BYTES} bytes")
    for segment in path.split("/"):
        if segment in ("", ".", "..") or not _SEGMENT.fullmatch(segment):
            raise InvalidRequest("path must be segments of letters, digits and ._@+=~- separated by single slashes")
    return path


def check_spike_path(path: str) -> str:
    """A secret path on SPIKE's routes: `check_path`'s, or with SPIKE's leading ``/`` and characters.

    A leading ``/`` is part of the path, as in SPIKE (``/app/db`` and ``app/db`` are two secrets); empty
    segments, ``.`` and ``..`` stay refused.  Vault's face keeps `check_path`.
    """
    if not isinstance(path, str) or not path:
        raise InvalidRequest("path is empty")
    if len(path.encode()) > MAX_PATH_BYTES:
        raise InvalidRequest(f"path is longer than {MAX_PATH_BYTES} bytes")
    for segment in path.removeprefix("/").split("/"):
        if segment in ("", ".", "..") or not _SPIKE_SEGMENT.fullmatch(segment):
            raise InvalidRequest(
                "path must be segments of letters, digits and ._@+=~-()?*|[]{}\\ separated by single slashes "
                "(a leading slash is allowed)"
            )
    return path


def check_spike_prefix(prefix: str) -> str:
    """A list prefix on SPIKE's routes: empty, ``/``, or a path optionally ending in a slash."""
    if prefix in ("", "/"):
        return prefix
    check_spike_path(prefix.removesuffix("/"))
    return prefix


def check_prefix(prefix: str) -> str:
    """A list prefix: empty, or a path optionally ending in a slash."""
    if prefix == "":
        return prefix
    check_path(prefix.removesuffix("/"))
    return prefix


def check_values(values: dict[str, str]) -> dict[str, str]:
    if not values:
        raise InvalidRequest("values is empty: a secret needs at least one key")
    size = 0
    for key, value in values.items():
        if len(key.encode()) > MAX_VALUE_KEY_BYTES or not _VALUE_KEY.fullmatch(key):
            raise InvalidRequest(f"key names are 1-{MAX_VALUE_KEY_BYTES} letters, digits, spaces and ._-")
        size += len(key.encode()) + len(value.encode())
    if size > MAX_VALUES_BYTES:
        raise InvalidRequest(f"values exceed {MAX_VALUES_BYTES} bytes")
    return values


def check_custom_metadata(custom: dict[str, str]) -> dict[str, str]:
    if len(custom) > MAX_CUSTOM_METADATA:
        raise InvalidRequest(f"at most {MAX_CUSTOM_METADATA} custom metadata entries")
    size = sum(len(k.encode()) + len(v.encode()) for k, v in custom.items())
    if size > MAX_CUSTOM_METADATA_BYTES:
        raise InvalidRequest(f"custom metadata exceeds {MAX_CUSTOM_METADATA_BYTES} bytes")
    for key in custom:
        if len(key.encode()) > MAX_KEY_BYTES or not _KEY.fullmatch(key):
            raise InvalidRequest(f"custom metadata keys are 1-{MAX_KEY_BYTES} letters, digits and ._-")
    return custom


def check_version(version: int) -> int:
    if not 0 <= version <= MAX_VERSION:
        raise InvalidRequest("version must be between 0 (current) and 2**31-1")
    return version


def check_versions(versions: list[int], *, zero_is_current: bool = False) -> list[int]:
    """Versions named by a delete, undelete or destroy.

    `zero_is_current`: 0 stands for the current version, as in SPIKE's API (its Pilot sends
    ``versions: [0]`` when no version is given); Vault's API has no such version.
    """
    if len(versions) > MAX_VERSIONS_PER_REQUEST:
        raise InvalidRequest(f"at most {MAX_VERSIONS_PER_REQUEST} versions per request")
    lowest = 0 if zero_is_current else 1
    for version in versions:
        if not lowest <= version <= MAX_VERSION:
            raise InvalidRequest(f"versions must be between {lowest} and 2**31-1")
    return versions


def check_max_versions(value: int) -> int:
    if not 0 <= value <= MAX_MAX_VERSIONS:
        raise InvalidRequest(f"max_versions must be between 0 (default) and {MAX_MAX_VERSIONS}")
    return value


class VersionInfo(msgspec.Struct, frozen=True):
    version: int
    created_at: float
    deleted_at: float | None = None
    destroyed: bool = False
    # Sealed under a data key that no longer exists (its root key was replaced by bootstrap --force):
    # stored, but nobody can read it any more.
    unreadable: bool = False

    @property
    def readable(self) -> bool:
        return self.deleted_at is None and not self.destroyed and not self.unreadable


class SecretMeta(msgspec.Struct, frozen=True):
    path: str
    current_version: int
    oldest_version: int
    max_versions: int  # 0: the deployment's default
    cas_required: bool
    created_at: float
    updated_at: float
    custom_metadata: dict[str, str] = msgspec.field(default_factory=dict)
    custom_unreadable: bool = False  # custom metadata sealed under a data key that no longer exists

    def effective_max_versions(self, default: int = DEFAULT_MAX_VERSIONS) -> int:
        return self.max_versions or default


class PutPlan(msgspec.Struct, frozen=True):
    meta: SecretMeta
    version: int
    pruned: tuple[int, ...]  # versions to remove for good


def plan_put(
    meta: SecretMeta | None,
    stored_versions: list[int],
    *,
    path: str,
    cas: int | None,
    now: float,
    default_max_versions: int = DEFAULT_MAX_VERSIONS,
) -> PutPlan:
    """What a write does: the new version number, new metadata, and versions that fall off."""
    if meta is not None and meta.cas_required and cas is None:
        raise CasRequired("this secret requires check-and-set: give the version the write replaces (cas, or --cas N)")
    if cas is not None:
        current = meta.current_version if meta is not None else 0
        if cas != current:
            raise CasMismatch(f"check-and-set expected version {cas}, current is {current}")
    if meta is None:
        meta = SecretMeta(path, 0, 0, 0, False, now, now)
    version = meta.current_version + 1
    if version > MAX_VERSION:
        raise InvalidRequest("this secret has reached the maximum version number")
    keep = meta.effective_max_versions(default_max_versions)
    remaining = sorted([*stored_versions, version])
    pruned = tuple(remaining[: max(0, len(remaining) - keep)])
    kept = remaining[len(pruned) :]
    new_meta = msgspec.structs.replace(meta, current_version=version, oldest_version=kept[0], updated_at=now)
    return PutPlan(new_meta, version, pruned)


def targets(meta: SecretMeta, versions: list[int]) -> list[int]:
    """The versions a delete/undelete/destroy addresses (none given, or 0: the current one)."""
    return sorted({v or meta.current_version for v in versions}) if versions else [meta.current_version]


class ImportConflict(KvError):
    """An import that would overwrite or mix with what is stored (409): nothing of it is written."""

    status = 409
    code = "api_conflict"


class ImportedVersion(msgspec.Struct, frozen=True):
    """A version brought from another store (`spike migrate`), with its number and times kept."""

    version: int
    values: dict[str, str]
    created_at: float
    deleted_at: float | None = None

    def __repr__(self) -> str:  # the values are secrets: their keys only
        return (
            f"ImportedVersion(version={self.version!r}, values=<keys {sorted(self.values)!r}>, "
            f"created_at={self.created_at!r}, deleted_at={self.deleted_at!r})"
        )


class ImportedSecret(msgspec.Struct, frozen=True):
    path: str
    versions: tuple[ImportedVersion, ...]  # at least one, distinct numbers
    created_at: float
    updated_at: float
    max_versions: int = 0

    @property
    def current_version(self) -> int:
        """The newest version: the next write is numbered after it, whether it is live or deleted."""
        return max(v.version for v in self.versions)

    @property
    def oldest_version(self) -> int:
        return min(v.version for v in self.versions)


def check_import(secret: ImportedSecret) -> ImportedSecret:
    """What a write of this secret would be checked for, plus what an import adds: `InvalidRequest` with why.

    Paths may be SPIKE's (a leading ``/``, its characters): imports come from SPIKE.
    """
    check_spike_path(secret.path)
    where = f"secret {secret.path}"
    if not secret.versions:
        raise InvalidRequest(f"{where} has no version")
    try:
        check_max_versions(secret.max_versions)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{where}: {exc}") from None
    seen: set[int] = set()
    for version in secret.versions:
        if not 1 <= version.version <= MAX_VERSION:
            raise InvalidRequest(f"{where}: versions must be between 1 and 2**31-1")
        if version.version in seen:
            raise InvalidRequest(f"{where}: version {version.version} appears twice")
        seen.add(version.version)
        try:
            check_values(version.values)
        except InvalidRequest as exc:
            raise InvalidRequest(f"{where} version {version.version}: {exc}") from None
    return secret
