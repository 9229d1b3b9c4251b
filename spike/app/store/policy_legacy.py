"""Policies stored by spike before 0.x used another dialect; `upgrade` gives each the same meaning in today's.

The old dialect (stored bodies without a ``dialect`` field) read patterns as
Python regular expressions matched against the *whole* SPIFFE ID or path
(`re.fullmatch`), and had other reserved names: the policy routes were
``spike/acl/policies`` (granted by ``super`` only), the cipher
``spike/cipher/encrypt`` and ``spike/cipher/decrypt`` (``execute``).  Such a
path was reached only through an alternative of the pattern written with the
literal prefix ``spike/``: a loose ``.*`` never reached one.

The upgrade keeps what each stored policy granted:

* a pattern ``p`` becomes ``^(?:p)$``: under RE2's search it matches exactly
  the strings ``p`` matched whole, for SPIFFE IDs and for secret paths;
* a policy that reached the old policy routes (with ``super``) or both old
  cipher paths (with ``execute`` or ``super``) gets SPIKE's name for them as
  one more alternative (``|^spike/system/acl$``), so it reaches it under
  SPIKE's rule;
* a policy whose wrapped pattern would now reach a reserved system path it
  never reached (``^(?:.*)$`` describes ``spike/system/acl``) keeps a limit in
  the store: it reaches only the system paths it reached before (`Policy.system_paths`);
* a pattern RE2 cannot read with the same meaning is kept, and the policy
  grants nothing (`Policy.disabled`), said once at the upgrade and at every
  reload: RE2 lacks look-arounds, back-references and ``\\Z``, and reads
  POSIX classes (``[[:alpha:]]``) and ``{,n}`` differently from Python.

What the old code decided for a reserved path is reproduced with its own
rule, kept here verbatim as the definition of the old dialect and used for
nothing else, and only where the whole pattern also matched the path: the
old hand-made split at ``|`` misread patterns such as ``app/x[]|spike/acl/policies|]``
(a character class, not three alternatives), and that grant is not carried over.
"""

from __future__ import annotations

import re

import msgspec

from spike.app.model.policy import (
    SYSTEM_ACL,
    SYSTEM_CIPHER,
    SYSTEM_PATHS,
    PatternError,
    Permission,
    compile_pattern,
    describes,
    system_paths_reached,
)

LEGACY_DIALECT = 1
DIALECT = 2  # RE2, SPIKE's matching rules and reserved names

OLD_POLICY_PATH = "spike/acl/policies"
OLD_CIPHER_PATHS = ("spike/cipher/encrypt", "spike/cipher/decrypt")

# What a permission does on each reserved system path: a policy reaching one without these grants nothing there.
_USES = {
    "spike/system/acl": frozenset({Permission.READ, Permission.WRITE, Permission.LIST, Permission.SUPER}),
    "spike/system/secret": frozenset({Permission.LIST, Permission.SUPER}),
    "spike/system/cipher/exec": frozenset({Permission.EXECUTE, Permission.SUPER}),
}


class Upgraded(msgspec.Struct, frozen=True):
    spiffe_id_pattern: str
    path_pattern: str
    system_paths: frozenset[str] | None
    disabled: str | None
    notes: tuple[str, ...]  # what an operator should know, one sentence each


def _old_alternatives(pattern: str) -> list[str]:
    """The old dialect's own reading of a pattern's top-level alternatives (see the module docstring)."""
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


def old_reached(path_pattern: str, reserved_path: str) -> bool:
    """Whether the old dialect let this path pattern reach `reserved_path`, where the whole pattern agrees."""
    try:
        if re.fullmatch(path_pattern, reserved_path) is None:
            return False
        explicit = [a for a in _old_alternatives(path_pattern) if a.removeprefix("^").startswith("spike/")]
        return any(re.fullmatch(a, reserved_path) is not None for a in explicit)
    except re.error:
        return False  # the old code failed on this pattern (the audit's M1): it granted nothing reliably


def _different_in_re2(pattern: str) -> str | None:
    """Why RE2 would read this old pattern differently from Python, or None if it reads it the same.

    Secret paths and SPIFFE IDs are ASCII without newlines, where Python's and
    RE2's classes, anchors and case folding agree; what remains is syntax.
    """
    if "[:" in pattern:
        return "it may hold a POSIX class such as [[:alpha:]], which RE2 reads as a class and Python did not"
    if "{," in pattern:
        return "it may hold a repetition such as {,3}, which RE2 reads as literal text and Python did not"
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"it did not compile in the old dialect either ({exc})"
    try:
        compile_pattern(pattern)
    except PatternError as exc:
        return str(exc)
    return None


def upgrade(spiffe_id_pattern: str, path_pattern: str, permissions: frozenset[Permission]) -> Upgraded:
    notes: list[str] = []
    disabled = None
    for what, pattern in (("SPIFFE ID pattern", spiffe_id_pattern), ("path pattern", path_pattern)):
        why = _different_in_re2(pattern)
        if why is not None:
            disabled = f"its {what} {pattern!r} from an earlier spike cannot be kept with the same meaning: {why}"
            break
    ids = f"^(?:{spiffe_id_pattern})$"
    paths = f"^(?:{path_pattern})$"
    if disabled is not None:
        notes.append(f"it grants nothing until it is replaced: {disabled}")
        return Upgraded(ids, paths, None, disabled, tuple(notes))

    held = permissions
    needed: set[str] = set()
    if Permission.SUPER in held and old_reached(path_pattern, OLD_POLICY_PATH):
        needed.add(SYSTEM_ACL)
    cipher = [old_reached(path_pattern, p) for p in OLD_CIPHER_PATHS]
    if held & {Permission.EXECUTE, Permission.SUPER}:
        if all(cipher):
            needed.add(SYSTEM_CIPHER)
        elif any(cipher):
            notes.append(
                f"it reached only {OLD_CIPHER_PATHS[cipher.index(True)]}; SPIKE has one path for encrypting and "
                f"decrypting ({SYSTEM_CIPHER}), so it no longer reaches the cipher: grant it explicitly if meant"
            )
    for system_path in SYSTEM_PATHS:  # SPIKE's order, so the pattern reads the same on every upgrade
        if system_path in needed and not describes(paths, system_path):
            paths += f"|^{system_path}$"
    reached = {p for p in system_paths_reached(ids, paths) if held & _USES[p]}
    limit = None
    if not reached <= needed:
        limit = frozenset(needed)
        notes.append(
            f"its pattern now also describes {', '.join(sorted(reached - needed))}, which it did not reach before: "
            "it is kept from reaching them (re-apply the policy to use SPIKE's rule alone)"
        )
    return Upgraded(ids, paths, limit, None, tuple(notes))
