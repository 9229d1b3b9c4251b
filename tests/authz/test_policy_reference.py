"""Our policy engine against a reference of SPIKE's rules, over generated policies, callers and paths.

`spike_allows` is SPIKE's `CheckPolicyAccess` (app/nexus/internal/state/base/policy.go and reserved.go)
with spike-sdk-go's `ValidatePolicyPermissions`, transcribed line by line and nothing more: it uses
Python's `re` (a different engine from the RE2 the server runs) on patterns generated from syntax
both engines read the same way, so an agreement is not one engine agreeing with itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from spike.app.model.policy import Permission, Policy
from spike.app.nexus.authorizer import Authorizer
from spike.protocol.identity import SpiffeId, TrustDomains

TRUST = TrustDomains.single("spike.test")
RESERVED = ("spike/system/acl", "spike/system/secret", "spike/system/cipher/exec")
PROBE = "spike-arbitrary-probe-value"


@dataclass(frozen=True)
class RefPolicy:
    ids: str
    paths: str
    permissions: frozenset[str]


def _as_full_match(pattern: str) -> re.Pattern[str] | None:  # reserved.go asFullMatch
    try:
        return re.compile("^(?:" + pattern + ")$")
    except re.error:
        return None


def _describes(pattern: str, path: str) -> bool:  # patternDescribesPath
    full = _as_full_match(pattern)
    return full is not None and full.search(path) is not None


def _precise(pattern: str) -> bool:  # patternIsPreciseIdentity
    if pattern.startswith("^") and pattern.endswith("$"):
        return True
    full = _as_full_match(pattern)
    return full is not None and full.search(PROBE) is not None


def spike_allows(policies: list[RefPolicy], peer: str, path: str, wants: list[str]) -> bool:
    for policy in policies:
        if not re.search(policy.ids, peer):
            continue
        if not re.search(policy.paths, path):
            continue
        if path in RESERVED and not (_describes(policy.paths, path) and _precise(policy.ids)):
            continue
        if "super" in policy.permissions or all(w in policy.permissions for w in wants):
            return True
    return False


# Pattern pieces that Python's re and RE2 read identically on ASCII text without newlines.
ATOMS = st.sampled_from(
    ["a", "b", "p", "s", "app", "spike", "system", "acl", "secret", "cipher", "exec", "workload", "w1", "/", r"\.",
     ".", "[a-z]", "[^/]", "[a-z0-9/]", "(?:a|b)", "(?:system|app)", "spiffe://spike\\.test"]
)  # fmt: skip
QUANTIFIERS = st.sampled_from(["", "", "", "*", "+", "?", "{1,2}"])


@st.composite
def patterns(draw: st.DrawFn) -> str:
    pieces = draw(st.lists(st.tuples(ATOMS, QUANTIFIERS), min_size=1, max_size=5))
    body = "".join(f"(?:{atom}){quantifier}" if quantifier else atom for atom, quantifier in pieces)
    if draw(st.booleans()):
        body = f"{body}|{draw(st.sampled_from(['.*', 'x', 'spike/system/acl', 'app/.*', '^z$']))}"
    start = draw(st.sampled_from(["", "", "^"]))
    end = draw(st.sampled_from(["", "", "$"]))
    return f"{start}{body}{end}" if "|" not in body or not (start or end) else f"{start}(?:{body}){end}"


PERMISSIONS = st.frozensets(st.sampled_from([p.value for p in Permission]), min_size=1)
POLICIES = st.lists(st.tuples(st.one_of(patterns(), st.just(".*")), patterns(), PERMISSIONS), max_size=4)
PEERS = st.sampled_from(["/workload/w1", "/workload/w1-attacker", "/workload/app", "/spike-system/acl", "/a/b"])
PATHS = st.one_of(
    st.sampled_from(RESERVED),
    st.from_regex(r"(?:app|spike|system|acl|a|b|p|s)(?:/(?:app|system|acl|secret|exec|a|b|w1)){0,3}", fullmatch=True),
)


@settings(max_examples=400, deadline=None)
@given(POLICIES, PEERS, PATHS, st.sampled_from(list(Permission)))
def test_the_engine_decides_as_spike_does(
    policies: list[tuple[str, str, frozenset[str]]], peer_path: str, path: str, wanted: Permission
) -> None:
    peer = SpiffeId("spike.test", peer_path)
    authorizer = Authorizer(TRUST)
    authorizer.load(
        Policy(str(i), f"p{i}", ids, paths, frozenset(Permission(p) for p in held), 0.0, 0.0)
        for i, (ids, paths, held) in enumerate(policies)
    )
    reference = [RefPolicy(ids, paths, held) for ids, paths, held in policies]
    assert authorizer.allows(peer, wanted, path) is spike_allows(reference, str(peer), path, [wanted.value])


def test_the_reference_says_what_spike_says_on_adr_0033s_examples() -> None:
    """The reference itself, on the cases SPIKE's ADRs spell out (so a wrong reference cannot agree by luck)."""
    admin = "spiffe://example.org/admin"
    for pattern, reaches in [("^spike/system/acl$", True), ("spike/system/acl", True), ("^spike/system/.*$", True),
                             (".*", True), ("acl", False), ("system", False), ("spike", False)]:  # fmt: skip
        policy = RefPolicy(r"^spiffe://example\.org/admin$", pattern, frozenset({"write"}))
        assert spike_allows([policy], admin, "spike/system/acl", ["write"]) is reaches, pattern
    loose_id = RefPolicy(r"spiffe://example\.org/admin", "^spike/system/acl$", frozenset({"write"}))
    assert not spike_allows([loose_id], admin + "-attacker", "spike/system/acl", ["write"])
    assert spike_allows([RefPolicy("admin", "app", frozenset({"read"}))], admin, "myapp/x", ["read"])  # substring
