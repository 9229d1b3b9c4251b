"""SPIFFE ID parsing (per the SPIFFE ID spec) and role decisions by exact ID."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spike.protocol import InvalidSpiffeId, LocalProtocolError, Role, SpiffeId, TrustDomains


@pytest.mark.parametrize(
    ("text", "domain", "path"),
    [
        ("spiffe://spike.ist", "spike.ist", ""),
        ("spiffe://spike.ist/spike/nexus", "spike.ist", "/spike/nexus"),
        ("spiffe://example.org/ns/default/sa/web", "example.org", "/ns/default/sa/web"),
        ("spiffe://a-b_c.d9/x", "a-b_c.d9", "/x"),
        ("spiffe://td/Mixed_Case-Path.v2", "td", "/Mixed_Case-Path.v2"),
        ("spiffe://td/...", "td", "/..."),  # only "." and ".." are special
        ("spiffe://td/.hidden", "td", "/.hidden"),
        ("spiffe://1.2.3.4/x", "1.2.3.4", "/x"),
        ("spiffe://" + "a" * 255 + "/x", "a" * 255, "/x"),
    ],
)
def test_valid_ids_parse_and_print_back(text: str, domain: str, path: str) -> None:
    parsed = SpiffeId.parse(text)
    assert (parsed.trust_domain, parsed.path) == (domain, path)
    assert str(parsed) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "spiffe://",
        "spiffe:///path",
        "spiffe:/td/x",
        "http://td/x",
        "SPIFFE://td/x",
        "Spiffe://td/x",
        "spiffe://TD/x",
        "spiffe://Spike.ist/spike/nexus",
        "spiffe://td/",
        "spiffe://td//x",
        "spiffe://td/x/",
        "spiffe://td/./x",
        "spiffe://td/../x",
        "spiffe://td/x/.",
        "spiffe://td/x/..",
        "spiffe://td:8443/x",
        "spiffe://user@td/x",
        "spiffe://user:pw@td/x",
        "spiffe://td/x?query=1",
        "spiffe://td?x",
        "spiffe://td/x#frag",
        "spiffe://td/x%2Fy",
        "spiffe://td/caf\u00e9",
        "spiffe://td/with space",
        "spiffe://t\u00e9d/x",
        "spiffe://td/x\n",
        " spiffe://td/x",
        "spiffe://[::1]/x",
        "spiffe://" + "a" * 256 + "/x",
        "spiffe://td/" + "x" * 2048,
    ],
)
def test_invalid_ids_are_refused(text: str) -> None:
    with pytest.raises(InvalidSpiffeId):
        SpiffeId.parse(text)


def test_invalid_id_errors_are_local_protocol_and_value_errors() -> None:
    with pytest.raises(LocalProtocolError):
        SpiffeId.parse("nope")
    with pytest.raises(ValueError, match="spiffe"):
        SpiffeId.parse("nope")


def test_the_length_limit_is_2048_characters() -> None:
    prefix = "spiffe://td/"
    SpiffeId.parse(prefix + "x" * (2048 - len(prefix)))
    with pytest.raises(InvalidSpiffeId, match="too long"):
        SpiffeId.parse(prefix + "x" * (2049 - len(prefix)))


segments = st.text(alphabet="abcXYZ019._-", min_size=1, max_size=8).filter(lambda s: s not in (".", ".."))


@settings(max_examples=150, deadline=None)
@given(
    domain=st.text(alphabet="abcz09.-_", min_size=1, max_size=20),
    path=st.lists(segments, max_size=5),
)
def test_any_spec_conforming_id_round_trips(domain: str, path: list[str]) -> None:
    text = "spiffe://" + domain + "".join("/" + s for s in path)
    parsed = SpiffeId.parse(text)
    assert str(parsed) == text
    assert parsed.trust_domain == domain


# ---------------------------------------------------------------- roles

TRUST = TrustDomains.single("spike.ist")


@pytest.mark.parametrize(
    ("text", "role"),
    [
        ("spiffe://spike.ist/spike/nexus", Role.NEXUS),
        ("spiffe://spike.ist/spike/bootstrap", Role.BOOTSTRAP),
        ("spiffe://spike.ist/spike/pilot/role/superuser", Role.PILOT_SUPERUSER),
        ("spiffe://spike.ist/spike/pilot/role/recover", Role.PILOT_RECOVER),
        ("spiffe://spike.ist/spike/pilot/role/restore", Role.PILOT_RESTORE),
        ("spiffe://spike.ist/spike/keeper/1", Role.KEEPER),
        ("spiffe://spike.ist/spike/keeper/255", Role.KEEPER),
    ],
)
def test_exact_ids_get_their_role(text: str, role: Role) -> None:
    assert TRUST.role_of(SpiffeId.parse(text)) is role


@pytest.mark.parametrize(
    "text",
    [
        "spiffe://spike.ist",
        "spiffe://spike.ist/spike",
        "spiffe://spike.ist/spike/nexusX",
        "spiffe://spike.ist/spike/nexus/extra",
        "spiffe://spike.ist/spike/Nexus",
        "spiffe://spike.ist/nexus",
        "spiffe://spike.ist/x/spike/nexus",
        "spiffe://spike.ist.evil/spike/nexus",
        "spiffe://evil.spike.ist/spike/nexus",
        "spiffe://other.org/spike/nexus",
        "spiffe://other.org/spike/bootstrap",
        "spiffe://other.org/spike/keeper/1",
        "spiffe://spike.ist/spike/bootstrap2",
        "spiffe://spike.ist/spike/pilot",
        "spiffe://spike.ist/spike/pilot/role",
        "spiffe://spike.ist/spike/pilot/role/superuser/x",
        "spiffe://spike.ist/spike/pilot/role/Superuser",
        "spiffe://spike.ist/spike/keeper",
        "spiffe://spike.ist/spike/keeper/01",
        "spiffe://spike.ist/spike/keeper/0",
        "spiffe://spike.ist/spike/keeper/abc",
        "spiffe://spike.ist/spike/keeper/1a",
        "spiffe://spike.ist/spike/keeper/-1",
        "spiffe://spike.ist/spike/keeper/1.0",
        "spiffe://spike.ist/spike/keeper/1/x",
        "spiffe://spike.ist/spike/keepers/1",
    ],
)
def test_look_alike_ids_get_no_role(text: str) -> None:
    assert TRUST.role_of(SpiffeId.parse(text)) is None


def test_no_peer_has_no_role() -> None:
    assert TRUST.role_of(None) is None


def test_roles_are_bound_to_their_own_trust_domain() -> None:
    trust = TrustDomains(nexus="servers.td", keeper="servers.td", bootstrap="ops.td", pilot="people.td")
    assert trust.role_of(SpiffeId.parse("spiffe://servers.td/spike/nexus")) is Role.NEXUS
    assert trust.role_of(SpiffeId.parse("spiffe://people.td/spike/nexus")) is None
    assert trust.role_of(SpiffeId.parse("spiffe://people.td/spike/pilot/role/superuser")) is Role.PILOT_SUPERUSER
    assert trust.role_of(SpiffeId.parse("spiffe://servers.td/spike/pilot/role/superuser")) is None
    assert trust.role_of(SpiffeId.parse("spiffe://ops.td/spike/bootstrap")) is Role.BOOTSTRAP
    assert trust.role_of(SpiffeId.parse("spiffe://servers.td/spike/bootstrap")) is None
    assert trust.role_of(SpiffeId.parse("spiffe://ops.td/spike/keeper/2")) is None


@pytest.mark.parametrize("role", list(Role))
def test_id_of_and_role_of_agree(role: Role) -> None:
    trust = TrustDomains(nexus="a.td", keeper="b.td", bootstrap="c.td", pilot="d.td")
    spiffe_id = trust.id_of(role, 7 if role is Role.KEEPER else None)
    assert trust.role_of(SpiffeId.parse(str(spiffe_id))) is role


def test_a_keeper_id_needs_its_number() -> None:
    with pytest.raises(LocalProtocolError, match="keeper id"):
        TRUST.id_of(Role.KEEPER)


def test_is_keeper_matches_one_exact_keeper() -> None:
    assert TRUST.is_keeper(SpiffeId.parse("spiffe://spike.ist/spike/keeper/3"), 3)
    assert not TRUST.is_keeper(SpiffeId.parse("spiffe://spike.ist/spike/keeper/3"), 4)
    assert not TRUST.is_keeper(SpiffeId.parse("spiffe://spike.ist/spike/keeper/03"), 3)
    assert not TRUST.is_keeper(None, 3)


@pytest.mark.parametrize("domain", ["", "UPPER.td", "spiffe://x", "td/x", "td:1", "t d"])
def test_trust_domains_are_checked(domain: str) -> None:
    with pytest.raises(InvalidSpiffeId):
        TrustDomains.single(domain)
    with pytest.raises(InvalidSpiffeId):
        TrustDomains(nexus=domain)
