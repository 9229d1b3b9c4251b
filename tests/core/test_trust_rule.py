"""Trust per domain, the pure rule: which CA serves which trust domain, and whose chain ends where.

The inputs are what Python's ssl module gives (`get_ca_certs()` dicts and DER
bytes); the rule only compares bytes, so any bytes stand in for certificates
here.  The transport tests (tests/transport/test_trust_domains.py) run the
same rule on real chains.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spike.protocol import SpiffeId, TrustBundleError, TrustBundles, chain_refusal
from spike.protocol.trust import CaCertificate, trust_domains_named


def ca(der: bytes, *uris: str, cn: str = "") -> CaCertificate:
    info: dict[str, Any] = {"subject": ((("commonName", cn or der.decode()),),)}
    if uris:
        info["subjectAltName"] = tuple(("URI", uri) for uri in uris)
    return info, der


OURS, THEIRS = "spike.test", "other.test"
NEXUS = SpiffeId(OURS, "/spike/nexus")


def test_a_ca_names_the_trust_domains_of_its_spiffe_uri_sans_only() -> None:
    info, _ = ca(b"x", "spiffe://a.test", "spiffe://b.test/some/path", "https://c.test", "spiffe://BAD", "urn:x")
    assert trust_domains_named(info) == {"a.test", "b.test"}
    assert trust_domains_named({"subjectAltName": (("DNS", "spiffe://d.test"),)}) == frozenset()
    assert trust_domains_named({"subjectAltName": "garbage"}) == frozenset()
    assert trust_domains_named({}) == frozenset()


def test_a_labelled_bundle_assigns_each_ca_to_the_domain_it_names() -> None:
    bundles = TrustBundles.labelled(OURS, [ca(b"ours", f"spiffe://{OURS}"), ca(b"theirs", f"spiffe://{THEIRS}")])
    assert bundles.domains == (THEIRS, OURS)
    assert bundles.authorities(OURS) == {b"ours"}
    assert bundles.authorities(THEIRS) == {b"theirs"}
    assert bundles.serving(b"theirs") == (THEIRS,)
    assert bundles.name(b"theirs") == "CN=theirs"


def test_unlabelled_cas_serve_the_own_domain_only_while_the_bundle_holds_no_other() -> None:
    alone = TrustBundles.labelled(OURS, [ca(b"plain"), ca(b"ours", f"spiffe://{OURS}")])
    assert alone.authorities(OURS) == {b"plain", b"ours"}
    with pytest.raises(TrustBundleError) as caught:
        TrustBundles.labelled(OURS, [ca(b"plain", cn="Plain CA"), ca(b"theirs", f"spiffe://{THEIRS}")])
    assert str(caught.value) == (
        "CA certificate 'CN=Plain CA' has no spiffe://<trust domain> URI SAN, and the bundle holds CAs of "
        f"several trust domains ({THEIRS}, {OURS}): nothing says which one it serves (give each trust domain "
        "a bundle of its own)"
    )


def test_a_ca_naming_two_domains_is_refused() -> None:
    with pytest.raises(TrustBundleError, match=r"names several trust domains \(a\.test, b\.test\)"):
        TrustBundles.labelled(OURS, [ca(b"both", "spiffe://a.test", "spiffe://b.test")])


def test_a_bundle_given_for_a_domain_serves_it_and_checks_labels_unless_told_not_to() -> None:
    given_ = TrustBundles.for_domain(THEIRS, [ca(b"plain"), ca(b"theirs", f"spiffe://{THEIRS}")])
    assert given_.authorities(THEIRS) == {b"plain", b"theirs"}
    with pytest.raises(TrustBundleError) as caught:
        TrustBundles.for_domain(THEIRS, [ca(b"impostor", f"spiffe://{OURS}", cn="Impostor")])
    assert str(caught.value) == (
        f"CA certificate 'CN=Impostor' in the bundle of {THEIRS} names trust domain {OURS} (URI SAN)"
    )
    taken = TrustBundles.for_domain(THEIRS, [ca(b"impostor", f"spiffe://{OURS}")], check_labels=False)
    assert taken.authorities(THEIRS) == {b"impostor"}
    assert taken.authorities(OURS) == frozenset()  # the label gives it nothing


def test_bundles_combine_per_domain() -> None:
    shared = TrustBundles.for_domain(OURS, [ca(b"a"), ca(b"shared")]) | TrustBundles.for_domain(
        THEIRS, [ca(b"shared"), ca(b"b")]
    )
    assert shared.authorities(OURS) == {b"a", b"shared"}
    assert shared.authorities(THEIRS) == {b"b", b"shared"}
    assert shared.serving(b"shared") == (THEIRS, OURS)
    assert shared.all_authorities() == (b"a", b"b", b"shared")
    assert shared == TrustBundles({OURS: [b"shared", b"a"], THEIRS: [b"b", b"shared"]})
    assert shared != TrustBundles({OURS: [b"a"]})
    assert TrustBundles({OURS: []}).domains == ()


# ---------------------------------------------------------------------- chain_refusal


BUNDLES = TrustBundles.labelled(
    OURS, [ca(b"our-root", f"spiffe://{OURS}", cn="Our CA"), ca(b"their-root", f"spiffe://{THEIRS}", cn="Their CA")]
)


def test_a_chain_ending_at_a_ca_of_the_peers_own_domain_is_the_peer() -> None:
    assert chain_refusal(NEXUS, [b"leaf", b"our-root"], BUNDLES) is None
    assert chain_refusal(NEXUS, [b"leaf", b"intermediate", b"our-root"], BUNDLES) is None
    assert chain_refusal(SpiffeId(THEIRS, "/pilot"), [b"leaf", b"their-root"], BUNDLES) is None


def test_a_chain_ending_at_another_domains_ca_is_refused_with_the_reason() -> None:
    assert chain_refusal(NEXUS, [b"leaf", b"their-root"], BUNDLES) == (
        f"its certificate chain ends at 'CN=Their CA', a CA of {THEIRS}, which is not in the trust bundle of {OURS}"
    )
    # Passing through our CA does not help: the anchor decides.
    assert chain_refusal(NEXUS, [b"leaf", b"our-root", b"their-root"], BUNDLES) is not None
    assert chain_refusal(SpiffeId(THEIRS, "/pilot"), [b"leaf", b"our-root"], BUNDLES) == (
        f"its certificate chain ends at 'CN=Our CA', a CA of {OURS}, which is not in the trust bundle of {THEIRS}"
    )


def test_no_chain_or_no_bundle_for_the_peers_domain_is_refused() -> None:
    assert chain_refusal(NEXUS, None, BUNDLES) == (
        "no verified certificate chain to check it against its trust domain's bundle"
    )
    assert chain_refusal(NEXUS, [], BUNDLES) is not None
    assert chain_refusal(SpiffeId("third.test", "/x"), [b"leaf", b"our-root"], BUNDLES) == (
        "there is no trust bundle for its trust domain third.test"
    )
    assert "a CA of no configured trust domain" in (chain_refusal(NEXUS, [b"leaf", b"stranger"], BUNDLES) or "")


# ---------------------------------------------------------------------- against a reference model


DOMAINS = st.sampled_from(["a.test", "b.test", "c.test"])
LABELS = st.lists(DOMAINS, max_size=2, unique=True)


@given(own=DOMAINS, labels=st.lists(LABELS, min_size=1, max_size=6), peer=DOMAINS, anchor=st.integers(0, 6))
def test_labelled_bundles_and_chain_refusal_match_a_reference(
    own: str, labels: list[list[str]], peer: str, anchor: int
) -> None:
    """The rules, stated once more without the code's structure: a CA naming one domain serves it; an
    unlabelled CA serves the own domain if no CA names another one, else the bundle is refused; a CA
    naming two is refused.  A peer is accepted iff its chain's anchor serves the peer's own domain."""
    cas = [ca(f"ca{i}".encode(), *(f"spiffe://{d}" for d in named)) for i, named in enumerate(labels)]
    others = {d for named in labels for d in named} - {own}
    expect_error = any(len(named) > 1 for named in labels) or (bool(others) and any(not n for n in labels))
    if expect_error:
        with pytest.raises(TrustBundleError):
            TrustBundles.labelled(own, cas)
        return
    bundles = TrustBundles.labelled(own, cas)
    serves = {f"ca{i}".encode(): (named[0] if named else own) for i, named in enumerate(labels)}
    for der, domain in serves.items():
        assert bundles.serving(der) == (domain,)
    anchor_der = f"ca{anchor}".encode()
    verdict = chain_refusal(SpiffeId(peer, "/w"), [b"leaf", anchor_der], bundles)
    assert (verdict is None) == (serves.get(anchor_der) == peer)
