"""The policy model: what a policy is and what the store keeps (names, patterns, permissions).

A policy has a name, a SPIFFE ID pattern, a path pattern and permissions
(``read``, ``write``, ``list``, ``execute`` for the cipher, ``super`` for
everything).  Patterns are RE2 regular expressions, the syntax of SPIKE's Go
``regexp``, and they match as SPIKE's do (ADR-0025): anywhere in the string,
unless the pattern anchors itself with ``^`` and ``$``.  ``app/`` therefore
matches ``myapp/x``; ``^app/.*$`` does not.

Three reserved system paths gate spike's own functions (SPIKE's ADR-0033):
``spike/system/acl`` (the policy routes), ``spike/system/secret`` (listing
every secret path) and ``spike/system/cipher/exec`` (the cipher).  A policy
reaches one only if it *describes* it -- its pattern, read whole as
``^(?:pattern)$``, matches it -- and its SPIFFE ID pattern is precise
(anchored, or a catch-all such as ``.*``).  ``acl`` or ``system`` match
``spike/system/acl`` only as a substring and reach nothing there.

This module is the model: validation at write time and the rules that say
what a pattern means.  Matching requests against the policies in force (the
engine) is `policy_engine`; the dialect of policies stored by earlier
versions of spike and its upgrade is `policy_legacy`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol, cast

import msgspec

from spike.app.model.kv import InvalidRequest

if TYPE_CHECKING:
    import re2

MAX_POLICIES = 10_000
MAX_NAME = 250  # SPIKE's (spike-sdk-go validation.ValidateName)
MAX_PATTERN = 1024
# Ours (letters, digits, ._-) and SPIKE's (letters, digits, -_ and spaces).
_NAME = re.compile(r"[A-Za-z0-9._ -]{1,250}")

# SPIKE's reserved system paths (spike-sdk-go config/auth), in the order SPIKE checks them.
SYSTEM_ACL = "spike/system/acl"
SYSTEM_SECRET = "spike/system/secret"  # noqa: S105 - a path, not a password
SYSTEM_CIPHER = "spike/system/cipher/exec"
SYSTEM_PATHS = (SYSTEM_ACL, SYSTEM_SECRET, SYSTEM_CIPHER)

# A value no SPIFFE ID equals: an identity pattern that fully matches it is a catch-all (ADR-0033).
CATCH_ALL_PROBE = "spike-arbitrary-probe-value"

# Secret paths whose first segment is `spike` belong to the system: no secret is stored there.
RESERVED_PREFIX = "spike/"


def reserved(path: str) -> bool:
    """Whether no secret may be stored at `path` (SPIKE's leading ``/`` does not make a path another's)."""
    path = path.lstrip("/")
    return path == "spike" or path.startswith(RESERVED_PREFIX)


class Permission(StrEnum):
    READ = "read"
    WRITE = "write"
    LIST = "list"
    EXECUTE = "execute"
    SUPER = "super"


def grants(held: frozenset[Permission], wanted: Permission) -> bool:
    """SPIKE's `ValidatePolicyPermissions` for one wanted permission: `super` grants every one."""
    return Permission.SUPER in held or wanted in held


class PatternError(InvalidRequest):
    """A pattern RE2 cannot compile (or too long); the message says why."""


class Regexp(Protocol):
    """A compiled RE2 pattern, as far as policies use it."""

    def search(self, text: str) -> object | None: ...


@functools.cache
def re2_options() -> re2.Options:
    """RE2's options for every policy pattern.

    re2 is imported at the first pattern compiled, not at start: it was ~2 ms of each
    Nexus start (issue 20), and a Nexus with no policy stored compiles none.
    """
    import re2

    options = re2.Options()
    options.log_errors = False  # RE2 would print every refused pattern on stderr
    options.never_capture = True  # only "does it match" is ever asked
    return options


def compile_pattern(pattern: str, what: str = "pattern") -> Regexp:
    """Compile with RE2 as SPIKE compiles with Go's regexp; `PatternError` saying why it cannot."""
    if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN:
        raise PatternError(f"the {what} must be 1-{MAX_PATTERN} characters")
    import re2

    try:
        return cast(Regexp, re2.compile(pattern, re2_options()))
    except re2.error as exc:
        raise PatternError(f"the {what} {pattern[:80]!r} is not an RE2 regular expression: {_reason(exc)}") from None
    except UnicodeEncodeError:
        raise PatternError(f"the {what} is not valid Unicode") from None


def _reason(exc: BaseException) -> str:
    detail = exc.args[0] if exc.args else ""
    text = detail.decode("utf-8", "replace") if isinstance(detail, bytes) else str(detail)
    return text[:200] or exc.__class__.__name__


def _full_match_form(pattern: str) -> Regexp | None:
    """SPIKE's `asFullMatch`: the pattern wrapped in ``^(?:...)$``; None if that does not compile."""
    import re2

    try:
        return cast(Regexp, re2.compile(f"^(?:{pattern})$", re2_options()))
    except (re2.error, UnicodeEncodeError):
        return None


def anchored(pattern: str) -> bool:
    """SPIKE's `patternIsAnchored`: written with ``^`` first and ``$`` last."""
    return pattern.startswith("^") and pattern.endswith("$")


def describes(pattern: str, path: str) -> bool:
    """SPIKE's `patternDescribesPath`: the pattern read whole matches `path`, not merely a part of it."""
    full = _full_match_form(pattern)
    return full is not None and full.search(path) is not None


def precise_identity(pattern: str) -> bool:
    """SPIKE's `patternIsPreciseIdentity`: anchored, or a deliberate catch-all such as ``.*``."""
    return anchored(pattern) or describes(pattern, CATCH_ALL_PROBE)


def system_paths_reached(spiffe_id_pattern: str, path_pattern: str) -> frozenset[str]:
    """The reserved system paths a policy with these patterns reaches under ADR-0033's rule."""
    if not precise_identity(spiffe_id_pattern):
        return frozenset()
    return frozenset(p for p in SYSTEM_PATHS if describes(path_pattern, p))


def check_reserved_guard(name: str, spiffe_id_pattern: str, path_pattern: str) -> None:
    """SPIKE's `guardReservedSystemPaths`: refuse a policy that reaches a reserved path only by substring.

    As in SPIKE, only the first reserved path the pattern matches is judged;
    the check at request time (`policy_engine`) covers every one anyway.
    """
    paths = compile_pattern(path_pattern, "path pattern")
    reached = next((p for p in SYSTEM_PATHS if paths.search(p) is not None), None)
    if reached is None:
        return
    if describes(path_pattern, reached) and precise_identity(spiffe_id_pattern):
        return
    raise InvalidRequest(
        f"policy {name} reaches the reserved system path {reached} only by substring match; "
        f"anchor both patterns with ^ and $ to grant access there deliberately"
    )


class Policy(msgspec.Struct, frozen=True):
    id: str
    name: str
    spiffe_id_pattern: str
    path_pattern: str
    permissions: frozenset[Permission]
    created_at: float
    updated_at: float
    # Set only on policies upgraded from an earlier spike (`policy_legacy`), to keep what they meant:
    # the reserved system paths the policy reaches at most (None: ADR-0033's rule alone decides) ...
    system_paths: frozenset[str] | None = None
    # ... and why it grants nothing at all (a pattern RE2 would read differently), or None.
    disabled: str | None = None


def check_permissions(permissions: Iterable[str]) -> frozenset[Permission]:
    granted: set[Permission] = set()
    for permission in permissions:
        try:
            granted.add(Permission(permission))
        except ValueError:
            raise InvalidRequest(
                f"unknown permission {str(permission)[:32]!r}: use read, write, list, execute or super"
            ) from None
    if not granted:
        raise InvalidRequest("a policy needs at least one permission")
    return frozenset(granted)


def check_policy_fields(
    name: str, spiffe_id_pattern: str, path_pattern: str, permissions: Iterable[str]
) -> frozenset[Permission]:
    """Everything a policy write is checked for; `InvalidRequest` (400) with the reason."""
    if not _NAME.fullmatch(name):
        raise InvalidRequest(f"policy names are 1-{MAX_NAME} letters, digits, spaces and ._-")
    compile_pattern(spiffe_id_pattern, "SPIFFE ID pattern")
    compile_pattern(path_pattern, "path pattern")
    granted = check_permissions(permissions)
    check_reserved_guard(name, spiffe_id_pattern, path_pattern)
    return granted


def unanchored_warnings(spiffe_id_pattern: str, path_pattern: str) -> list[str]:
    """What `spike policy create/apply` warns about: patterns that match anywhere in the string."""
    warnings = []
    for what, pattern, example in (
        ("SPIFFE ID pattern", spiffe_id_pattern, "SPIFFE ID"),
        ("path pattern", path_pattern, "path"),
    ):
        if not anchored(pattern) and pattern not in (".*", "^.*", ".*$"):
            warnings.append(
                f"the {what} {pattern!r} is not anchored: it matches any {example} that contains a match "
                f"anywhere (write ^...$ to match the whole {example})"
            )
    return warnings
