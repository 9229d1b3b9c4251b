"""The policy engine: "may this caller do this on this path?", as SPIKE's `CheckPolicyAccess` answers it.

A policy applies to a caller when its SPIFFE ID pattern matches the caller's
ID, and to a path when its path pattern matches the path -- both RE2
searches, anywhere in the string, as Go's `MatchString` (ADR-0025).  The
three reserved system paths need more (ADR-0033, `policy_model`): a policy
reaches one only if it describes it and names its identities precisely.  A
policy grants a permission when it holds that permission or `super`.

Patterns are compiled once per reload, never per check: the policies are
decrypted (at unlock, and after every change) into an immutable `PolicySet`
that also remembers which policies apply to each caller, so a check costs
one RE2 search per applicable policy, whatever the number of secrets, and
RE2 matches in time linear in the path whatever the pattern (no ReDoS).

A reload fails closed: if the policies cannot be read, the set in force is
kept only when the stored policies are provably the ones it was built from
(their change counter has not moved); otherwise nothing is granted through a
policy until a reload succeeds, and the log says why.  A single stored
policy that cannot be compiled (or that an upgrade disabled) grants nothing
and is logged; the others stay in force, since policies only ever grant.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

import msgspec

from spike.app.model.policy import (
    SYSTEM_CIPHER,
    SYSTEM_PATHS,
    SYSTEM_SECRET,
    PatternError,
    Permission,
    Policy,
    Regexp,
    compile_pattern,
    grants,
    re2_options,
    system_paths_reached,
)
from spike.app.store.errors import DatabaseUnavailable, StorageError
from spike.protocol.identity import Role, SpiffeId, TrustDomains

if TYPE_CHECKING:
    import re2

log = logging.getLogger("spike.nexus.policy")

_SYSTEM = frozenset(SYSTEM_PATHS)
#: SPIKE's lite workload role's SPIFFE ID path (spike-sdk-go spiffeid.LiteWorkload).
LITE_WORKLOAD_PATH = "/spike/workload/role/lite"
MAX_CACHED_CALLERS = 10_000


class PoliciesUnavailable(StorageError):
    """The policies could not be read: nothing is granted through a policy until they can."""


class PoliciesDatabaseUnavailable(PoliciesUnavailable, DatabaseUnavailable):
    """As `PoliciesUnavailable`, because the database is away (503: try again)."""


class PolicySource(Protocol):
    def snapshot(self) -> tuple[int, list[Policy]]:
        """The policies' change counter, read before them, and every stored policy."""
        ...

    def version(self) -> int:
        """The policies' change counter as stored now (bumped by every policy write)."""
        ...


class CompiledPolicy(msgspec.Struct, frozen=True):
    name: str
    ids: Regexp
    paths: Regexp
    path_pattern: str
    permissions: frozenset[Permission]
    system: frozenset[str]  # the reserved system paths this policy reaches (described, precise identity)


def compile_policy(policy: Policy) -> CompiledPolicy:
    """The engine's form of a stored policy; `PatternError` if it grants nothing (the reason)."""
    if policy.disabled is not None:
        raise PatternError(policy.disabled)
    ids = compile_pattern(policy.spiffe_id_pattern, "SPIFFE ID pattern")
    paths = compile_pattern(policy.path_pattern, "path pattern")
    system = system_paths_reached(policy.spiffe_id_pattern, policy.path_pattern)
    if policy.system_paths is not None:
        system &= policy.system_paths
    return CompiledPolicy(policy.name, ids, paths, policy.path_pattern, policy.permissions, system)


class Applicable:
    """The policies that apply to one caller, with their path patterns in one RE2 set.

    One scan of the path answers for every policy (`matching`), instead of one
    search each.  A set that finds nothing is confirmed pattern by pattern: RE2's
    set also answers "nothing" when it runs out of memory, and a grant must
    never be missed on that account (nor given: a set only ever names patterns
    that match).
    """

    __slots__ = ("_set", "policies")

    def __init__(self, policies: tuple[CompiledPolicy, ...]) -> None:
        self.policies = policies
        self._set: re2.Set | None = None
        if policies:
            import re2  # imported already: the policies were compiled with it (see re2_options)

            try:
                paths = re2.Set.SearchSet(re2_options())
                for policy in policies:
                    paths.Add(policy.path_pattern)
                paths.Compile()
                self._set = paths
            except re2.error:  # each pattern compiled alone: searched one by one instead
                self._set = None

    def matching(self, path: str) -> list[CompiledPolicy]:
        if self._set is not None:
            hits = self._set.Match(path)
            if hits:
                return [self.policies[i] for i in hits]
        return [c for c in self.policies if c.paths.search(path) is not None]

    def allows(self, permission: Permission, path: str) -> bool:
        if path in _SYSTEM:
            return any(grants(c.permissions, permission) and path in c.system for c in self.policies)
        if not any(grants(c.permissions, permission) for c in self.policies):
            return False
        return any(grants(c.permissions, permission) for c in self.matching(path))


class PolicySet(msgspec.Struct):
    """The policies in force, compiled; `version` is the stored change counter they were read at."""

    compiled: tuple[CompiledPolicy, ...]
    version: int | None
    _per_caller: dict[SpiffeId, Applicable] = msgspec.field(default_factory=dict)
    _lock: threading.Lock = msgspec.field(default_factory=threading.Lock)

    def applicable(self, caller: SpiffeId) -> Applicable:
        found = self._per_caller.get(caller)
        if found is None:
            text = str(caller)
            found = Applicable(tuple(c for c in self.compiled if c.ids.search(text) is not None))
            with self._lock:
                if len(self._per_caller) >= MAX_CACHED_CALLERS:  # bounded: callers are few in practice
                    self._per_caller.clear()
                self._per_caller[caller] = found
        return found


def build(policies: Iterable[Policy], version: int | None) -> PolicySet:
    compiled = []
    for policy in policies:
        try:
            compiled.append(compile_policy(policy))
        except PatternError as exc:
            # One line, loud, at every reload until an operator replaces or deletes the policy.
            log.error("policy %s grants nothing: %s", policy.name, exc, extra={"event": "policy_unusable"})  # noqa: TRY400
    return PolicySet(tuple(compiled), version)


_EMPTY = PolicySet((), None)


class Listing(msgspec.Struct, frozen=True):
    """Which secret paths a caller may see in a listing: every one, or those its policies give `list` on."""

    everything: bool
    applicable: Applicable | None = None

    def __call__(self, path: str) -> bool:
        if self.everything:
            return True
        return self.applicable is not None and self.applicable.allows(Permission.LIST, path)


_EVERYTHING = Listing(everything=True)
_NOTHING = Listing(everything=False)


class Authorizer:
    """Answers "may this caller do this on this path?" from the compiled policies in force."""

    def __init__(
        self, trust: TrustDomains, source: PolicySource | None = None, *, lite_workloads: Iterable[str] = ()
    ) -> None:
        self._trust = trust
        # SPIKE's lite workload role: spiffe://<td>/spike/workload/role/lite (or below it) may use the
        # cipher without a policy, for each trust domain <td> here (SPIKE_TRUST_ROOT_LITE_WORKLOAD).
        self._lite = tuple(f"spiffe://{domain}{LITE_WORKLOAD_PATH}" for domain in lite_workloads)
        self._source = source
        self._stale = source is not None
        self._set = _EMPTY
        self._reload_lock = threading.Lock()
        self._failing = False  # a reload failed and none has succeeded since (logged once)

    def invalidate(self) -> None:
        """The stored policies changed (or were unlocked): reload before the next check.

        Safe from any thread; the reload itself happens on the checking thread.
        """
        self._stale = True

    def load(self, policies: Iterable[Policy], version: int | None = None) -> None:
        self._set = build(policies, version)

    def clear(self) -> None:
        """Forget every policy (the key is gone): nothing is granted until the next unlock."""
        self._stale = False
        self._set = _EMPTY

    @property
    def policies(self) -> PolicySet:
        """The set in force, reloaded first if the stored policies changed."""
        if self._stale and self._source is not None:
            with self._reload_lock:
                if self._stale:
                    self._reload(self._source)
        return self._set

    def _reload(self, source: PolicySource) -> None:
        self._stale = False  # first: a change committed while loading marks it stale again
        try:
            version, policies = source.snapshot()
            fresh = build(policies, version)
        except Exception as exc:
            self._stale = True  # tried again at the next check
            self._failed(source, exc)
            return
        self._set = fresh
        if self._failing:
            self._failing = False
            log.warning("the policies could be read again: %d in force", len(fresh.compiled))

    def _failed(self, source: PolicySource, exc: Exception) -> None:
        why = " ".join(str(exc).split())[:300] or exc.__class__.__name__
        kept = self._set
        try:
            provably_current = kept.version is not None and source.version() == kept.version
        except Exception:
            provably_current = False
        if provably_current:
            if not self._failing:
                log.warning(
                    "cannot reload the policies (%s); the stored ones have not changed since they were read "
                    "(change counter %s): the %d in force stay",
                    why,
                    kept.version,
                    len(kept.compiled),
                    extra={"event": "policy_reload_failed"},
                )
            self._failing = True
            return
        self._set = _EMPTY
        if not self._failing:
            log.error(
                "POLICY-BASED ACCESS DENIED: cannot read the policies (%s) and the ones read before may have "
                "changed since; nothing is granted through a policy until they can be read",
                why,
                extra={"event": "policy_reload_failed"},
            )
        self._failing = True
        kind = PoliciesDatabaseUnavailable if isinstance(exc, DatabaseUnavailable) else PoliciesUnavailable
        raise kind(f"cannot read the policies: {why}") from None

    def _for(self, caller: SpiffeId) -> Applicable:
        return self.policies.applicable(caller)

    def is_superuser(self, caller: SpiffeId | None) -> bool:
        return self._trust.role_of(caller) is Role.PILOT_SUPERUSER

    def _policy_caller(self, caller: SpiffeId | None) -> bool:
        """Whether policies decide for this caller: not nobody, not the superuser, not one of spike's own."""
        return caller is not None and self._trust.role_of(caller) is None

    def is_lite_workload(self, caller: SpiffeId | None) -> bool:
        text = str(caller) if caller is not None else ""
        return any(text == base or text.startswith(base + "/") for base in self._lite)

    def allows(self, caller: SpiffeId | None, permission: Permission, path: str) -> bool:
        if self.is_superuser(caller):
            return True
        if permission is Permission.EXECUTE and path == SYSTEM_CIPHER and self.is_lite_workload(caller):
            return True
        if caller is None or not self._policy_caller(caller):
            return False  # spike's own components have no data access through policies
        return self._for(caller).allows(permission, path)

    def may_ever(self, caller: SpiffeId | None, permission: Permission) -> bool:
        """Whether any policy could grant `permission` to `caller` (a cheap first gate)."""
        if self.is_superuser(caller):
            return True
        if permission is Permission.EXECUTE and self.is_lite_workload(caller):
            return True
        if caller is None or not self._policy_caller(caller):
            return False
        return any(grants(c.permissions, permission) for c in self._for(caller).policies)

    def lister(self, caller: SpiffeId | None) -> Listing:
        """Which secret paths `caller` may see in a listing, as a predicate bound to the policies in force.

        The superuser and a caller with `list` on ``spike/system/secret`` (SPIKE's
        permission to list) see every path; any other caller sees the paths a
        policy gives it `list` on.  Safe to call from any thread.
        """
        if self.is_superuser(caller):
            return _EVERYTHING
        if caller is None or not self._policy_caller(caller):
            return _NOTHING
        applicable = self._for(caller)
        listing = [c for c in applicable.policies if grants(c.permissions, Permission.LIST)]
        if any(SYSTEM_SECRET in c.system for c in listing):
            return _EVERYTHING
        if not listing:
            return _NOTHING
        return Listing(everything=False, applicable=applicable)
