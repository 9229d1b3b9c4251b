"""Policies stored by spike before RE2 keep their meaning, on SQLite and on PostgreSQL.

The old dialect matched Python regular expressions against the whole string and had other reserved
names (``spike/acl/policies`` with ``super``, ``spike/cipher/encrypt|decrypt`` with ``execute``),
reached only through an alternative written ``spike/...``.  `old_allows` below is that rule, written
from the code before the upgrade; every upgraded policy must decide as it did, for every path and
caller tried, and be stored in today's dialect once (the change counter moves once per policy).
"""

from __future__ import annotations

import re
import time
from typing import Any

import msgspec
import pytest

from spike.app.model.policy import Permission, Policy
from spike.app.nexus.authorizer import Authorizer
from spike.app.store.backend import Backend
from spike.app.store.policies import PolicyStore
from spike.app.store.sealing import policy_aad
from spike.protocol.identity import SpiffeId, TrustDomains

TRUST = TrustDomains.single("spike.test")
WAIT = 10.0
TD = r"spiffe://spike\.test"
OLD_RESERVED = ("spike/acl/policies", "spike/cipher/encrypt", "spike/cipher/decrypt")

# name -> (SPIFFE ID pattern, path pattern, permissions), as an earlier spike stored them.
LEGACY = {
    "web": (rf"{TD}/workload/web", "app/web/.*", ["list", "read"]),
    "admin": (".*", ".*", ["super"]),  # every secret; never the policies or the cipher
    "ops": (rf"{TD}/workload/ops", "spike/acl/policies", ["super"]),  # delegated policy administration
    "crypto": (rf"{TD}/workload/crypto", "spike/cipher/.*|app/.*", ["execute", "read"]),
    "half": (rf"{TD}/workload/half", "^spike/cipher/encrypt$", ["execute"]),  # SPIKE has one path for both
    "posix": (rf"{TD}/workload/posix", "app/[[:alpha:]]", ["read"]),  # RE2 would read a class Python did not
    "sneaky": (rf"{TD}/workload/sneaky", "app/x[]|spike/acl/policies|]", ["super"]),  # the audit's M1 (b)
    "nocase": (rf"{TD}/workload/(web|nocase)", "(?i)APP/[a-z]+", ["read"]),
    "reader": (rf"{TD}/workload/reader", "spike/acl/policies|team/.+", ["read"]),  # read never opened the policies
}
PATHS = ["app/web/a", "app/web", "myapp/web/x", "app/x", "app/xy", "app/x]", "team/a", "team", "ops/y", "a"]
CALLERS = ["/workload/web", "/workload/admin", "/workload/ops", "/workload/crypto", "/workload/half",
           "/workload/posix", "/workload/sneaky", "/workload/nocase", "/workload/reader", "/workload/web2"]  # fmt: skip


def _old_alternatives(pattern: str) -> list[str]:
    """The old engine's split at top-level bars (its definition of "an alternative written spike/...")."""
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


def old_allows(ids: str, paths: str, held: set[str], caller: str, wanted: str, path: str) -> bool:
    """The decision of spike before RE2 (what it should have been: the whole pattern must agree too)."""
    if re.fullmatch(ids, caller) is None or not ("super" in held or wanted in held):
        return False
    if path.startswith("spike/"):
        explicit = [a for a in _old_alternatives(paths) if a.removeprefix("^").startswith("spike/")]
        return re.fullmatch(paths, path) is not None and any(re.fullmatch(a, path) for a in explicit)
    return re.fullmatch(paths, path) is not None


def store_legacy(backend: Backend) -> None:
    sealer = backend.sealer()
    for n, (name, (ids, paths, permissions)) in enumerate(LEGACY.items()):
        old = msgspec.json.encode({"spiffe_id_pattern": ids, "path_pattern": paths, "permissions": permissions})
        backend.policy_put(
            name,
            lambda pid, old=old, name=name: sealer.seal(old, policy_aad(pid, name)),
            create_only=True,
            new_id=lambda n=n: f"legacy-{n}",
        ).result(WAIT)


def dialects(backend: Backend) -> dict[str, Any]:
    sealer = backend.sealer()
    return {
        name: msgspec.json.decode(sealer.open(sealed, policy_aad(pid, name))).get("dialect")
        for pid, name, sealed, _, _ in backend.policy_rows()
    }


def wait_until_upgraded(backend: Backend) -> None:
    deadline = time.monotonic() + WAIT
    while set(dialects(backend).values()) != {2}:
        assert time.monotonic() < deadline, dialects(backend)
        time.sleep(0.02)


def test_old_policies_keep_their_meaning_and_are_stored_upgraded_once(backend: Backend) -> None:
    store_legacy(backend)
    assert set(dialects(backend).values()) == {None}
    before = backend.policy_version()
    policies = {p.name: p for p in PolicyStore(backend).load_all()}  # upgraded in memory at once ...
    wait_until_upgraded(backend)  # ... and in the store, one conditional write each
    assert backend.policy_version() == before + len(LEGACY)
    stored = {p.name: p for p in PolicyStore(backend).load_all()}
    assert stored == policies
    assert backend.policy_version() == before + len(LEGACY)  # read again: nothing left to rewrite

    # The patterns an operator now sees: the old ones, whole-string, plus SPIKE's names where they reached one.
    assert (stored["web"].spiffe_id_pattern, stored["web"].path_pattern) == (
        rf"^(?:{TD}/workload/web)$",
        "^(?:app/web/.*)$",
    )
    assert stored["ops"].path_pattern == "^(?:spike/acl/policies)$|^spike/system/acl$"
    assert stored["crypto"].path_pattern == "^(?:spike/cipher/.*|app/.*)$|^spike/system/cipher/exec$"
    assert stored["admin"].system_paths == frozenset()  # `^(?:.*)$` would describe them all: it is kept off
    assert stored["half"].system_paths is None and stored["half"].path_pattern == "^(?:^spike/cipher/encrypt$)$"
    assert stored["posix"].disabled is not None and "POSIX" in stored["posix"].disabled
    assert stored["sneaky"].path_pattern == "^(?:app/x[]|spike/acl/policies|])$"  # a class: acl not carried over

    authorizer = Authorizer(TRUST)
    authorizer.load(stored.values())
    for caller_path in CALLERS:
        caller = SpiffeId("spike.test", caller_path)
        for path in PATHS:
            for wanted in ("read", "write", "list"):
                expected = any(
                    old_allows(ids, paths, set(held), str(caller), wanted, path)
                    for name, (ids, paths, held) in LEGACY.items()
                    if name != "posix"  # disabled: it grants nothing (it granted a path ending in "]": none exists)
                )
                assert authorizer.allows(caller, Permission(wanted), path) is expected, (caller_path, path, wanted)
        # The reserved functions: policy routes (old: super on spike/acl/policies; new: spike/system/acl) ...
        old_admin = any(
            old_allows(ids, paths, set(held), str(caller), "super", "spike/acl/policies")
            for ids, paths, held in LEGACY.values()
        )
        for wanted in ("read", "write", "list"):
            assert authorizer.allows(caller, Permission(wanted), "spike/system/acl") is old_admin, caller_path
        # ... and the cipher (old: execute on both paths; new: one path for both).
        old_cipher = all(
            any(old_allows(ids, paths, set(held), str(caller), "execute", p) for ids, paths, held in LEGACY.values())
            for p in OLD_RESERVED[1:]
        )
        assert authorizer.allows(caller, Permission.EXECUTE, "spike/system/cipher/exec") is old_cipher, caller_path
        assert not authorizer.allows(caller, Permission.LIST, "spike/system/secret")  # a listing right nobody had
    ops, crypto = SpiffeId("spike.test", "/workload/ops"), SpiffeId("spike.test", "/workload/crypto")
    assert authorizer.allows(ops, Permission.WRITE, "spike/system/acl")  # the cases above are not all "no"
    assert authorizer.allows(crypto, Permission.EXECUTE, "spike/system/cipher/exec")
    assert not authorizer.allows(SpiffeId("spike.test", "/workload/admin"), Permission.WRITE, "spike/system/acl")


def test_a_policy_replaced_before_its_upgrade_is_stored_is_left_as_replaced(backend: Backend) -> None:
    store_legacy(backend)
    store = PolicyStore(backend)
    sealed_before = {name: sealed for _, name, sealed, _, _ in backend.policy_rows()}
    # The upgrade's write is conditional on the body it read: one replaced meanwhile is not overwritten.
    assert not backend.policy_reseal("legacy-0", b"not what is stored", b"x").result(WAIT)
    store.put("web", "^a$", "^b$", frozenset({Permission.READ}), create_only=False).result(WAIT)
    store.load_all()
    wait_until_upgraded(backend)
    assert store.get("web").path_pattern == "^b$"
    assert {name for _, name, sealed, _, _ in backend.policy_rows() if sealed == sealed_before[name]} == set()


@pytest.mark.parametrize("pattern", [r"app/(?=x)", r"(a)\1", r"app/.*\Z", "a{,3}", "(?#note)app"])
def test_an_old_pattern_re2_cannot_read_the_same_way_grants_nothing_and_says_why(
    backend: Backend, pattern: str
) -> None:
    sealer = backend.sealer()
    old = msgspec.json.encode({"spiffe_id_pattern": ".*", "path_pattern": pattern, "permissions": ["read"]})
    backend.policy_put(
        "odd", lambda pid: sealer.seal(old, policy_aad(pid, "odd")), create_only=True, new_id=lambda: "odd-id"
    ).result(WAIT)
    (policy,) = PolicyStore(backend).load_all()
    assert policy.disabled is not None and repr(pattern) in policy.disabled
    authorizer = Authorizer(TRUST)
    authorizer.load([policy])
    assert authorizer.policies.compiled == ()
    wait_until_upgraded(backend)
    assert PolicyStore(backend).get("odd") == Policy(
        policy.id, "odd", "^(?:.*)$", f"^(?:{pattern})$", frozenset({Permission.READ}),
        policy.created_at, policy.updated_at, None, policy.disabled,
    )  # fmt: skip
