"""Policies: which SPIFFE IDs may do what on which secret paths.

A policy has a name, a SPIFFE ID pattern, a path pattern and permissions
(``read``, ``write``, ``list``, ``execute`` for the cipher, ``super`` for
everything).  Patterns are Python regular expressions matched against the
*whole* string (`re.fullmatch`): ``app/.*`` matches ``app/db`` but not
``myapp/db``, unlike SPIKE's unanchored Go matching, which lets a short
pattern grant far more than it seems to.

Paths whose first segment is ``spike`` are reserved for the system (the
cipher is ``spike/cipher/encrypt`` and ``spike/cipher/decrypt``, policy
administration ``spike/acl/policies``).  A policy reaches them only if its
path pattern itself starts with the literal ``spike/`` (after an optional
``^``): a loose pattern such as ``.*`` never does.

Evaluation reads nothing from the database: policies are decrypted once
(at unlock, and after every change) into compiled patterns, and the
policies that apply to a caller are remembered per SPIFFE ID, so a check
costs one regular-expression match per applicable policy, whatever the
number of secrets.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

from spike.protocol.identity import Role, SpiffeId, TrustDomains

from .kv import InvalidRequest

RESERVED_PREFIX = "spike/"
MAX_POLICIES = 10_000
MAX_NAME = 128
MAX_PATTERN = 1024
_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")


class Permission(StrEnum):
    READ = "read"
    WRITE = "write"
    LIST = "list"
    EXECUTE = "execute"
    SUPER = "super"


def reserved(path: str) -> bool:
    return path == "spike" or path.startswith(RESERVED_PREFIX)


def reaches_reserved(path_pattern: str) -> bool:
    """Whether a path pattern names the reserved paths explicitly (``spike/...``, or ``^spike/...``)."""
    return path_pattern.removeprefix("^").startswith(RESERVED_PREFIX)


def _top_level_alternatives(pattern: str) -> list[str]:
    """Split a regular expression at the ``|`` that are not escaped, grouped or in a class."""
    parts, depth, in_class, escaped, start = [], 0, False, False, 0
    for i, char in enumerate(pattern):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "|" and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
    parts.append(pattern[start:])
    return parts


def reserved_matcher(path_pattern: str) -> re.Pattern[str] | None:
    """The part of a pattern that may match reserved paths: its alternatives written as ``spike/...``.

    ``spike/cipher/.*|.*`` grants the cipher and every ordinary path, but its
    ``.*`` alternative never reaches ``spike/acl/policies``: only alternatives
    that name the reserved prefix literally (``spike/`` or ``^spike/``) do.
    """
    explicit = [a for a in _top_level_alternatives(path_pattern) if reaches_reserved(a)]
    if not explicit:
        return None
    return re.compile("|".join(f"(?:{a})" for a in explicit))


def _compile(pattern: str, what: str) -> re.Pattern[str]:
    if not pattern or len(pattern) > MAX_PATTERN:
        raise InvalidRequest(f"{what} must be 1-{MAX_PATTERN} characters")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise InvalidRequest(f"{what} is not a valid regular expression: {exc}") from None


@dataclass(frozen=True, slots=True)
class Policy:
    id: str
    name: str
    spiffe_id_pattern: str
    path_pattern: str
    permissions: frozenset[Permission]
    created_at: float
    updated_at: float


def check_policy_fields(
    name: str, spiffe_id_pattern: str, path_pattern: str, permissions: Iterable[str]
) -> frozenset[Permission]:
    if not _NAME.fullmatch(name):
        raise InvalidRequest(f"policy names are 1-{MAX_NAME} letters, digits and ._-")
    _compile(spiffe_id_pattern, "the SPIFFE ID pattern")
    _compile(path_pattern, "the path pattern")
    granted: set[Permission] = set()
    for permission in permissions:
        try:
            granted.add(Permission(permission))
        except ValueError:
            raise InvalidRequest(
                f"unknown permission {permission[:32]!r}: use read, write, list, execute or super"
            ) from None
    if not granted:
        raise InvalidRequest("a policy needs at least one permission")
    return frozenset(granted)


@dataclass(frozen=True, slots=True)
class _Compiled:
    name: str
    ids: re.Pattern[str]
    paths: re.Pattern[str]
    permissions: frozenset[Permission]
    reserved_paths: re.Pattern[str] | None  # None: this policy never reaches spike/ paths

    def grants(self, permission: Permission, path: str) -> bool:
        if Permission.SUPER not in self.permissions and permission not in self.permissions:
            return False
        if reserved(path):
            return self.reserved_paths is not None and self.reserved_paths.fullmatch(path) is not None
        return self.paths.fullmatch(path) is not None


class Authorizer:
    """Answers "may this caller do this on this path?" from an in-memory copy of the policies."""

    def __init__(self, trust: TrustDomains, loader: Callable[[], Iterable[Policy]] | None = None) -> None:
        self._trust = trust
        self._loader = loader
        self._stale = loader is not None
        self._compiled: tuple[_Compiled, ...] = ()
        self._per_caller: dict[SpiffeId, tuple[_Compiled, ...]] = {}
        self._lock = threading.Lock()

    def invalidate(self) -> None:
        """The stored policies changed (or were unlocked): reload before the next check.

        Safe from any thread; the reload itself happens on the checking thread.
        """
        self._stale = True

    def load(self, policies: Iterable[Policy]) -> None:
        compiled = tuple(
            _Compiled(
                p.name,
                re.compile(p.spiffe_id_pattern),
                re.compile(p.path_pattern),
                p.permissions,
                reserved_matcher(p.path_pattern),
            )
            for p in policies
        )
        with self._lock:
            self._compiled = compiled
            self._per_caller = {}

    def clear(self) -> None:
        """Forget every policy (the key is gone): nothing is granted until the next unlock."""
        self._stale = False
        self.load(())

    def _reload(self, loader: Callable[[], Iterable[Policy]]) -> None:
        self._stale = False  # first: a change committed while loading marks it stale again
        try:
            policies = list(loader())
        except BaseException:
            # Fail closed: the policies read before may have been changed or deleted since.
            # Nothing is granted until a reload succeeds (tried again on the next check).
            self.load(())
            self._stale = True
            raise
        self.load(policies)

    def _for(self, caller: SpiffeId) -> tuple[_Compiled, ...]:
        if self._stale and self._loader is not None:
            self._reload(self._loader)
        found = self._per_caller.get(caller)
        if found is None:
            text = str(caller)
            with self._lock:
                found = tuple(c for c in self._compiled if c.ids.fullmatch(text))
                if len(self._per_caller) > 10_000:  # bounded: callers are few in practice
                    self._per_caller.clear()
                self._per_caller[caller] = found
        return found

    def is_superuser(self, caller: SpiffeId | None) -> bool:
        return self._trust.role_of(caller) is Role.PILOT_SUPERUSER

    def allows(self, caller: SpiffeId | None, permission: Permission, path: str) -> bool:
        if caller is None:
            return False
        if self.is_superuser(caller):
            return True
        if self._trust.role_of(caller) is not None:
            return False  # spike's own components have no data access through policies
        return any(c.grants(permission, path) for c in self._for(caller))

    def may_ever(self, caller: SpiffeId | None, permission: Permission) -> bool:
        """Whether any policy could grant `permission` to `caller` (a cheap first gate)."""
        if caller is None:
            return False
        if self.is_superuser(caller):
            return True
        if self._trust.role_of(caller) is not None:
            return False
        return any(Permission.SUPER in c.permissions or permission in c.permissions for c in self._for(caller))
