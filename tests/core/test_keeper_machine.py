"""The keeper machine against the wire table of docs/design.md section 3, plus wire-format details."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spike.protocol import (
    KEEPER_CONTRIBUTE_PATH,
    KEEPER_SHARD_PATH,
    ApiRequest,
    ApiResponse,
    Keeper,
    KeeperChange,
    Role,
    ShardContribution,
    SpiffeId,
    TrustDomains,
    share_for,
)
from spike.protocol.wire import encode
from tests.core.core_helpers import SAMPLE_KEY_INT, key_from_int

TRUST = TrustDomains.single("spike.ist")
NEXUS = TRUST.id_of(Role.NEXUS)
BOOTSTRAP = TRUST.id_of(Role.BOOTSTRAP)
KEEPER_1 = TRUST.id_of(Role.KEEPER, 1)
PILOT = TRUST.id_of(Role.PILOT_SUPERUSER)
RECOVER = TRUST.id_of(Role.PILOT_RECOVER)
FOREIGN_NEXUS = SpiffeId.parse("spiffe://evil.example/spike/nexus")
LOOKALIKE = SpiffeId.parse("spiffe://spike.ist/spike/nexus/extra")

SHARE = share_for(key_from_int(SAMPLE_KEY_INT), epoch=7, threshold=2, id=3)
SHARD = list(SHARE.secret_bytes())
GO_BODY = msgspec.json.encode({"shard": SHARD})

NOT_FOUND = b'{"err":"api_not_found"}'
BAD_REQUEST = b'{"err":"api_bad_request"}'
UNAUTHORIZED = b'{"err":"access_unauthorized"}'


def contribute(keeper: Keeper, body: bytes, peer: SpiffeId | None = NEXUS) -> ApiResponse:
    return keeper.handle(ApiRequest("POST", KEEPER_CONTRIBUTE_PATH, peer, body)).response


def read(keeper: Keeper, peer: SpiffeId | None = NEXUS) -> ApiResponse:
    return keeper.handle(ApiRequest("POST", KEEPER_SHARD_PATH, peer, b"{}")).response


@dataclass(frozen=True)
class Snapshot:
    holds: bool
    answer: tuple[int, bytes]


def snapshot(keeper: Keeper) -> Snapshot:
    response = read(keeper)
    return Snapshot(keeper.holds_shard, (response.status, response.body))


@pytest.fixture
def empty() -> Keeper:
    return Keeper(TRUST)


@pytest.fixture
def holding() -> Keeper:
    keeper = Keeper(TRUST)
    assert contribute(keeper, encode(ShardContribution.of(SHARE))).status == 200
    return keeper


# ---------------------------------------------------------------- the request table


def test_an_empty_keeper_answers_404_api_not_found(empty: Keeper) -> None:
    response = read(empty)
    assert (response.status, response.body) == (404, NOT_FOUND)
    assert not empty.holds_shard


@pytest.mark.parametrize("peer", [NEXUS, BOOTSTRAP], ids=["nexus", "bootstrap"])
def test_nexus_and_bootstrap_may_contribute(empty: Keeper, peer: SpiffeId) -> None:
    outcome = empty.handle(ApiRequest("POST", KEEPER_CONTRIBUTE_PATH, peer, GO_BODY))
    assert (outcome.response.status, outcome.response.body) == (200, b"{}")
    assert outcome.change is KeeperChange.STORED
    assert read(empty).status == 200


@pytest.mark.parametrize(
    "peer",
    [KEEPER_1, PILOT, RECOVER, FOREIGN_NEXUS, LOOKALIKE, None],
    ids=["keeper", "pilot", "pilot-recover", "other-domain-nexus", "lookalike", "no-peer"],
)
def test_anyone_else_contributing_gets_401_and_changes_nothing(
    holding: Keeper, empty: Keeper, peer: SpiffeId | None
) -> None:
    other = list(share_for(key_from_int(SAMPLE_KEY_INT), epoch=8, threshold=2, id=3).secret_bytes())
    for keeper in (holding, empty):
        before = snapshot(keeper)
        outcome = keeper.handle(ApiRequest("POST", KEEPER_CONTRIBUTE_PATH, peer, msgspec.json.encode({"shard": other})))
        assert (outcome.response.status, outcome.response.body) == (401, UNAUTHORIZED)
        assert outcome.change is KeeperChange.NONE
        assert outcome.refused
        assert snapshot(keeper) == before


@pytest.mark.parametrize(
    "peer",
    [BOOTSTRAP, KEEPER_1, PILOT, RECOVER, FOREIGN_NEXUS, LOOKALIKE, None],
    ids=["bootstrap", "keeper", "pilot", "pilot-recover", "other-domain-nexus", "lookalike", "no-peer"],
)
def test_only_nexus_may_read_the_shard(holding: Keeper, empty: Keeper, peer: SpiffeId | None) -> None:
    for keeper in (holding, empty):
        response = read(keeper, peer)
        assert (response.status, response.body) == (401, UNAUTHORIZED)


def test_an_unauthorised_peer_is_refused_before_its_body_is_parsed(empty: Keeper) -> None:
    response = contribute(empty, b"\xff not json", peer=PILOT)
    assert response.status == 401


def test_nexus_reads_back_exactly_what_it_gave_with_extension_fields(holding: Keeper) -> None:
    response = read(holding)
    assert response.status == 200
    assert msgspec.json.decode(response.body) == {"shard": SHARD, "id": 3, "epoch": 7}


def test_a_go_style_contribution_is_answered_in_go_shape(empty: Keeper) -> None:
    assert contribute(empty, GO_BODY).status == 200
    response = read(empty)
    assert response.body == GO_BODY  # no id/epoch fields invented
    assert response.content_type == "application/json"


def test_unknown_fields_are_ignored(empty: Keeper) -> None:
    body = msgspec.json.encode({"shard": SHARD, "version": 2, "nested": {"a": [1, 2]}, "id": 3})
    assert contribute(empty, body).status == 200
    assert msgspec.json.decode(read(empty).body) == {"shard": SHARD, "id": 3}


def _body(**fields: object) -> bytes:
    return msgspec.json.encode(fields)


BAD_BODIES = {
    "not-json": b"shard please",
    "truncated": GO_BODY[:-1],
    "empty": b"",
    "invalid-utf8": b'{"shard": "\xff"}',
    "top-level-array": msgspec.json.encode([SHARD]),
    "null": b"null",
    "no-shard": b"{}",
    "shard-null": _body(shard=None),
    "shard-string": _body(shard="01" * 32),
    "shard-base64": _body(shard="AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="),
    "31-bytes": _body(shard=SHARD[:31]),
    "33-bytes": _body(shard=[*SHARD, 1]),
    "empty-list": _body(shard=[]),
    "value-256": _body(shard=[256, *SHARD[1:]]),
    "negative": _body(shard=[-1, *SHARD[1:]]),
    "floats": _body(shard=[float(b) for b in SHARD]),
    "bools": _body(shard=[True] * 32),
    "strings": _body(shard=[str(b) for b in SHARD]),
    "nested-lists": _body(shard=[[b] for b in SHARD]),
    "all-zero": _body(shard=[0] * 32),
    "id-zero": _body(shard=SHARD, id=0),
    "id-256": _body(shard=SHARD, id=256),
    "id-string": _body(shard=SHARD, id="3"),
    "epoch-negative": _body(shard=SHARD, epoch=-1),
    "epoch-huge": _body(shard=SHARD, epoch=2**63),
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_a_malformed_contribution_is_400_and_changes_nothing(holding: Keeper, empty: Keeper, body: bytes) -> None:
    for keeper in (holding, empty):
        before = snapshot(keeper)
        outcome = keeper.handle(ApiRequest("POST", KEEPER_CONTRIBUTE_PATH, NEXUS, body))
        assert (outcome.response.status, outcome.response.body) == (400, BAD_REQUEST)
        assert outcome.change is KeeperChange.NONE
        assert outcome.refused
        assert snapshot(keeper) == before


def test_error_details_stay_out_of_the_answer(empty: Keeper) -> None:
    outcome = empty.handle(ApiRequest("POST", KEEPER_CONTRIBUTE_PATH, NEXUS, _body(shard=[999] * 32)))
    assert outcome.response.body == BAD_REQUEST
    assert outcome.refused is not None and "999" not in outcome.refused


def test_replacing_a_shard_reports_replaced_and_the_same_shard_reports_nothing(holding: Keeper) -> None:
    same = holding.handle(ApiRequest("POST", KEEPER_CONTRIBUTE_PATH, NEXUS, encode(ShardContribution.of(SHARE))))
    assert (same.response.status, same.change) == (200, KeeperChange.NONE)
    other = share_for(key_from_int(SAMPLE_KEY_INT), epoch=8, threshold=2, id=3)
    replaced = holding.handle(
        ApiRequest("POST", KEEPER_CONTRIBUTE_PATH, BOOTSTRAP, encode(ShardContribution.of(other)))
    )
    assert (replaced.response.status, replaced.change) == (200, KeeperChange.REPLACED)
    assert msgspec.json.decode(read(holding).body) == {
        "shard": list(other.secret_bytes()),
        "id": 3,
        "epoch": 8,
    }


def test_same_bytes_with_new_extension_fields_count_as_a_replacement(holding: Keeper) -> None:
    outcome = holding.handle(ApiRequest("POST", KEEPER_CONTRIBUTE_PATH, NEXUS, GO_BODY))
    assert outcome.change is KeeperChange.REPLACED
    assert read(holding).body == GO_BODY


def test_forget_empties_the_keeper(holding: Keeper) -> None:
    holding.forget()
    assert not holding.holds_shard
    assert read(holding).status == 404


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_methods_are_refused(holding: Keeper, method: str) -> None:
    for path in (KEEPER_SHARD_PATH, KEEPER_CONTRIBUTE_PATH):
        outcome = holding.handle(ApiRequest(method, path, NEXUS, GO_BODY))
        assert outcome.response.status == 405
        assert outcome.change is KeeperChange.NONE


@pytest.mark.parametrize("path", ["/", "/v1/store/shard/", "/v1/store", "/v1/store/contribute/x", "/V1/STORE/SHARD"])
def test_unknown_paths_are_404(holding: Keeper, path: str) -> None:
    outcome = holding.handle(ApiRequest("POST", path, NEXUS, GO_BODY))
    assert (outcome.response.status, outcome.response.body) == (404, NOT_FOUND)


def test_the_shard_read_ignores_its_body(holding: Keeper) -> None:
    response = holding.handle(ApiRequest("POST", KEEPER_SHARD_PATH, NEXUS, b"garbage")).response
    assert response.status == 200


def test_wire_encoding_of_a_share_is_go_compatible() -> None:
    assert encode(ShardContribution.of(SHARE)) == msgspec.json.encode({"shard": SHARD, "id": 3, "epoch": 7})
    assert encode(ShardContribution(SHARD)) == GO_BODY


# ---------------------------------------------------------------- properties

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=40) | st.dictionaries(st.text(max_size=6), inner, max_size=5),
    max_leaves=25,
)
shard_like = st.fixed_dictionaries(
    {"shard": st.lists(st.integers(-2, 300), min_size=30, max_size=34)},
    optional={"id": st.integers(-1, 257), "epoch": st.integers(-1, 2**64), "x": json_values},
)


@settings(max_examples=200, deadline=None)
@given(
    body=st.one_of(
        st.binary(max_size=300),
        json_values.map(msgspec.json.encode),
        shard_like.map(msgspec.json.encode),
    ),
    start_holding=st.booleans(),
)
def test_any_body_gets_200_or_400_and_a_400_changes_nothing(body: bytes, start_holding: bool) -> None:
    keeper = Keeper(TRUST)
    if start_holding:
        contribute(keeper, GO_BODY)
    before = snapshot(keeper)
    outcome = keeper.handle(ApiRequest("POST", KEEPER_CONTRIBUTE_PATH, NEXUS, body))
    assert outcome.response.status in (200, 400)
    if outcome.response.status == 400:
        assert snapshot(keeper) == before
        assert outcome.change is KeeperChange.NONE
    else:
        assert keeper.holds_shard


@settings(max_examples=150, deadline=None)
@given(shard=st.lists(st.integers(0, 255), min_size=32, max_size=32).filter(any))
def test_any_nonzero_shard_is_kept_and_returned_unchanged(shard: list[int]) -> None:
    keeper = Keeper(TRUST)
    assert contribute(keeper, msgspec.json.encode({"shard": shard})).status == 200
    assert msgspec.json.decode(read(keeper).body) == {"shard": shard}
