"""The keeper's extension for key rotation (docs/key-lifecycle.md section 2): keep, reads by epoch, forget.

A caller that sends none of the extension fields sees SPIKE's keeper: that
table is pinned in test_keeper_machine.py.  These tests pin the extension,
check that the keeper never holds more than two shards, and that a dropped
shard's bytes are overwritten.
"""

from __future__ import annotations

import base64

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
    KeeperOutcome,
    Role,
    ShardContribution,
    Share,
    SpiffeId,
    TrustDomains,
    share_for,
)
from spike.protocol.material import shard_commitment
from spike.protocol.wire import KEEPER_FORGET_PATH, encode
from tests.core.core_helpers import SAMPLE_KEY_INT, key_from_int

TRUST = TrustDomains.single("spike.ist")
NEXUS = TRUST.id_of(Role.NEXUS)
BOOTSTRAP = TRUST.id_of(Role.BOOTSTRAP)
KEY = key_from_int(SAMPLE_KEY_INT)


def share(epoch: int, keeper_id: int = 3) -> Share:
    return share_for(KEY, epoch=epoch, threshold=2, id=keeper_id)


def shard(epoch: int) -> list[int]:
    return list(share(epoch).secret_bytes())


def contribute(keeper: Keeper, epoch: int, keep: int | None = None, peer: SpiffeId | None = NEXUS) -> KeeperOutcome:
    body = encode(ShardContribution.of(share(epoch), keep=keep))
    return keeper.handle(ApiRequest("POST", KEEPER_CONTRIBUTE_PATH, peer, body))


def read(keeper: Keeper, body: bytes = b"{}") -> ApiResponse:
    return keeper.handle(ApiRequest("POST", KEEPER_SHARD_PATH, NEXUS, body)).response


def read_epoch(keeper: Keeper, epoch: int) -> dict[str, object]:
    response = read(keeper, msgspec.json.encode({"epoch": epoch}))
    assert response.status == 200
    answer: dict[str, object] = msgspec.json.decode(response.body)
    return answer


def forget(keeper: Keeper, body: object, peer: SpiffeId | None = NEXUS) -> KeeperOutcome:
    raw = body if isinstance(body, bytes) else msgspec.json.encode(body)
    return keeper.handle(ApiRequest("POST", KEEPER_FORGET_PATH, peer, raw))


@pytest.fixture
def rotated() -> Keeper:
    """A keeper dealt epoch 8 while keeping its shard of epoch 7."""
    keeper = Keeper(TRUST)
    assert contribute(keeper, 7).change is KeeperChange.STORED
    outcome = contribute(keeper, 8, keep=7)
    assert (outcome.response.status, outcome.change) == (200, KeeperChange.REPLACED)
    return keeper


# ---------------------------------------------------------------- reads


def test_a_read_naming_an_epoch_gets_that_shard_and_the_keepers_capabilities(rotated: Keeper) -> None:
    assert read_epoch(rotated, 7) == {"shard": shard(7), "id": 3, "epoch": 7, "other_epoch": 8, "slots": 2}
    assert read_epoch(rotated, 8) == {"shard": shard(8), "id": 3, "epoch": 8, "other_epoch": 7, "slots": 2}


def test_a_read_naming_an_epoch_it_does_not_hold_gets_the_latest_like_a_go_keeper(rotated: Keeper) -> None:
    assert read_epoch(rotated, 9) == {"shard": shard(8), "id": 3, "epoch": 8, "other_epoch": 7, "slots": 2}
    single = Keeper(TRUST)
    contribute(single, 7)
    assert read_epoch(single, 9) == {"shard": shard(7), "id": 3, "epoch": 7, "slots": 2}


def test_a_read_without_an_epoch_is_spikes_read_of_the_latest_shard(rotated: Keeper) -> None:
    for body in (b"{}", b"", b"garbage", b'{"epoch": "7"}', b'{"epoch": -1}', b'{"other": 1}'):
        response = read(rotated, body)
        assert msgspec.json.decode(response.body) == {"shard": shard(8), "id": 3, "epoch": 8}, body


def test_an_empty_keeper_answers_404_to_a_read_naming_an_epoch() -> None:
    response = read(Keeper(TRUST), b'{"epoch": 7}')
    assert (response.status, response.body) == (404, b'{"err":"api_not_found"}')


# ---------------------------------------------------------------- contributions


def test_a_contribution_without_keep_leaves_one_shard_as_spikes_keeper_does(rotated: Keeper) -> None:
    assert contribute(rotated, 9).change is KeeperChange.REPLACED
    assert rotated.epochs == (9,)
    assert read_epoch(rotated, 7) == {"shard": shard(9), "id": 3, "epoch": 9, "slots": 2}


def test_keep_names_the_shard_kept_and_every_other_is_dropped(rotated: Keeper) -> None:
    contribute(rotated, 9, keep=8)
    assert rotated.epochs == (9, 8)


def test_keep_of_a_shard_it_does_not_hold_is_409_and_changes_nothing(rotated: Keeper) -> None:
    """A keeper restarted between Nexus's read and the deal must not end up with the new shard alone."""
    outcome = contribute(rotated, 10, keep=5)
    assert (outcome.response.status, outcome.response.body) == (409, b'{"err":"api_conflict"}')
    assert outcome.change is KeeperChange.NONE and outcome.refused
    assert rotated.epochs == (8, 7)
    empty = Keeper(TRUST)
    assert contribute(empty, 8, keep=7).response.status == 409
    assert empty.epochs == ()


def test_the_same_epoch_again_replaces_the_latest_and_keeps_the_previous(rotated: Keeper) -> None:
    body = encode(ShardContribution(shard(9), 3, 8, keep=7))  # bytes of another shard, labelled 8
    assert rotated.handle(ApiRequest("POST", KEEPER_CONTRIBUTE_PATH, NEXUS, body)).change is KeeperChange.REPLACED
    assert rotated.epochs == (8, 7)
    assert contribute(rotated, 8, keep=7).change is KeeperChange.REPLACED  # its own shard of 8 back
    assert contribute(rotated, 8, keep=7).change is KeeperChange.NONE  # the same again changes nothing


def test_an_old_epoch_dealt_while_keeping_the_new_swaps_the_slots(rotated: Keeper) -> None:
    contribute(rotated, 7, keep=8)
    assert rotated.epochs == (7, 8)
    assert read_epoch(rotated, 8)["epoch"] == 8


@pytest.mark.parametrize(
    "body",
    [
        {"shard": shard(8), "keep": 7},  # keep without an epoch
        {"shard": shard(8), "id": 3, "epoch": 8, "keep": 8},  # keep the shard being given
        {"shard": shard(8), "id": 3, "epoch": 8, "keep": -1},
        {"shard": shard(8), "id": 3, "epoch": 8, "keep": 2**63},
        {"shard": shard(8), "id": 3, "epoch": 8, "keep": "7"},
    ],
    ids=["no-epoch", "same-epoch", "negative", "huge", "string"],
)
def test_a_bad_keep_is_400_and_changes_nothing(rotated: Keeper, body: dict[str, object]) -> None:
    before = (rotated.epochs, read_epoch(rotated, 7), read_epoch(rotated, 8))
    outcome = rotated.handle(ApiRequest("POST", KEEPER_CONTRIBUTE_PATH, NEXUS, msgspec.json.encode(body)))
    assert (outcome.response.status, outcome.change) == (400, KeeperChange.NONE)
    assert outcome.refused
    assert (rotated.epochs, read_epoch(rotated, 7), read_epoch(rotated, 8)) == before


def test_a_lone_unlabelled_shard_is_kept_as_the_epoch_nexus_names() -> None:
    """SPIKE's bootstrap gives shards without labels; Nexus checked this one against epoch 7 before dealing 8."""
    keeper = Keeper(TRUST)
    go = msgspec.json.encode({"shard": shard(7)})
    keeper.handle(ApiRequest("POST", KEEPER_CONTRIBUTE_PATH, BOOTSTRAP, go))
    assert contribute(keeper, 8, keep=7).response.status == 200
    assert keeper.epochs == (8, 7)
    assert read_epoch(keeper, 7) == {"shard": shard(7), "epoch": 7, "other_epoch": 8, "slots": 2}


def deal_checked(keeper: Keeper, epoch: int, keep: int) -> KeeperOutcome:
    """A deal as Nexus sends it: keep the shard of `keep` the key record commits to."""
    body = msgspec.json.encode(
        {
            "shard": shard(epoch),
            "id": 3,
            "epoch": epoch,
            "keep": keep,
            # base64 of the 32-byte commitment, as msgspec encodes bytes
            "keep_commitment": base64.b64encode(shard_commitment(share(keep))).decode(),
        }
    )
    return keeper.handle(ApiRequest("POST", KEEPER_CONTRIBUTE_PATH, NEXUS, body))


def test_a_deal_keeps_the_shard_the_record_commits_to(rotated: Keeper) -> None:
    assert deal_checked(rotated, 9, keep=8).response.status == 200
    assert rotated.epochs == (9, 8)
    unlabelled = Keeper(TRUST)
    unlabelled.handle(ApiRequest("POST", KEEPER_CONTRIBUTE_PATH, BOOTSTRAP, msgspec.json.encode({"shard": shard(7)})))
    assert deal_checked(unlabelled, 8, keep=7).response.status == 200
    assert unlabelled.epochs == (8, 7)


@pytest.mark.parametrize(
    "planted",
    [
        {"shard": shard(9)},  # garbage without labels: SPIKE's lone-shard rule would take it for epoch 7's
        {"shard": shard(9), "id": 3, "epoch": 7},  # labelled as epoch 7, other bytes
        {"shard": list(share(7, keeper_id=4).secret_bytes()), "id": 4, "epoch": 7},  # another keeper's shard
    ],
    ids=["unlabelled", "labelled-7", "swapped"],
)
def test_a_deal_refuses_to_keep_a_shard_that_changed_since_nexus_verified_it(planted: dict[str, object]) -> None:
    """Simulation seed 2699: a keeper corrupted between Nexus's read and the deal kept the garbage as the old
    epoch's shard, so the key in force had a wrong shard there until the rotation's commit (the old keeper
    answered 200 and kept it)."""
    keeper = Keeper(TRUST)
    keeper.handle(ApiRequest("POST", KEEPER_CONTRIBUTE_PATH, BOOTSTRAP, msgspec.json.encode(planted)))
    before = keeper.epochs
    outcome = deal_checked(keeper, 8, keep=7)
    assert (outcome.response.status, outcome.change) == (409, KeeperChange.NONE)
    assert outcome.refused == "its shard of epoch 7 is not the one the key record commits to"
    assert keeper.epochs == before


def test_bootstrap_may_ask_to_keep_too(rotated: Keeper) -> None:
    assert contribute(rotated, 9, keep=8, peer=BOOTSTRAP).response.status == 200
    assert rotated.epochs == (9, 8)


# ---------------------------------------------------------------- forget


def test_forget_drops_the_previous_shard(rotated: Keeper) -> None:
    outcome = forget(rotated, {"epoch": 7})
    assert (outcome.response.status, outcome.response.body, outcome.change) == (200, b"{}", KeeperChange.FORGOTTEN)
    assert rotated.epochs == (8,)
    assert read_epoch(rotated, 8) == {"shard": shard(8), "id": 3, "epoch": 8, "slots": 2}


def test_forgetting_the_latest_makes_the_previous_one_the_latest(rotated: Keeper) -> None:
    assert forget(rotated, {"epoch": 8}).change is KeeperChange.FORGOTTEN
    assert rotated.epochs == (7,)
    assert msgspec.json.decode(read(rotated).body) == {"shard": shard(7), "id": 3, "epoch": 7}


def test_forgetting_what_it_does_not_hold_is_200_and_changes_nothing(rotated: Keeper) -> None:
    outcome = forget(rotated, {"epoch": 5})
    assert (outcome.response.status, outcome.change) == (200, KeeperChange.NONE)
    assert rotated.epochs == (8, 7)
    assert forget(Keeper(TRUST), {"all": True}).change is KeeperChange.NONE


def test_forget_all_empties_the_keeper(rotated: Keeper) -> None:
    assert forget(rotated, {"all": True}).change is KeeperChange.FORGOTTEN
    assert not rotated.holds_shard and rotated.epochs == ()
    assert read(rotated).status == 404


@pytest.mark.parametrize(
    "peer",
    [
        BOOTSTRAP,
        TRUST.id_of(Role.KEEPER, 3),
        TRUST.id_of(Role.PILOT_SUPERUSER),
        SpiffeId.parse("spiffe://x/spike/nexus"),
        None,
    ],
    ids=["bootstrap", "keeper", "pilot", "other-domain-nexus", "no-peer"],
)
def test_only_nexus_may_make_a_keeper_forget(rotated: Keeper, peer: SpiffeId | None) -> None:
    outcome = forget(rotated, {"all": True}, peer=peer)
    assert (outcome.response.status, outcome.response.body) == (401, b'{"err":"access_unauthorized"}')
    assert outcome.change is KeeperChange.NONE and outcome.refused
    assert rotated.epochs == (8, 7)


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"null", b"{}", b'{"all": false}', b'{"epoch": 7, "all": true}', b'{"epoch": -1}',
     b'{"epoch": "7"}', b'{"all": 1}', b'{"epoch": 7, "also": 1}', b"[7]"],
)  # fmt: skip
def test_a_bad_forget_is_400_and_changes_nothing(rotated: Keeper, body: bytes) -> None:
    outcome = forget(rotated, body)
    assert (outcome.response.status, outcome.response.body) == (400, b'{"err":"api_bad_request"}')
    assert outcome.change is KeeperChange.NONE and outcome.refused
    assert rotated.epochs == (8, 7)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_forget_takes_post_only(rotated: Keeper, method: str) -> None:
    outcome = rotated.handle(ApiRequest(method, KEEPER_FORGET_PATH, NEXUS, b'{"all": true}'))
    assert outcome.response.status == 405
    assert rotated.epochs == (8, 7)


def test_a_dropped_shard_is_overwritten_in_memory(rotated: Keeper) -> None:
    previous = rotated._previous
    assert previous is not None and any(previous.shard)
    forget(rotated, {"epoch": 7})
    assert not any(previous.shard)
    latest = rotated._latest
    assert latest is not None
    contribute(rotated, 9)  # replaced without keep: the old latest is overwritten too
    assert not any(latest.shard)


# ---------------------------------------------------------------- properties


operations = st.lists(
    st.one_of(
        st.tuples(st.just("contribute"), st.integers(1, 5), st.one_of(st.none(), st.integers(1, 5))),
        st.tuples(st.just("forget"), st.integers(1, 5), st.none()),
        st.tuples(st.just("forget-all"), st.just(0), st.none()),
        st.tuples(st.just("go-contribute"), st.integers(1, 5), st.none()),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(ops=operations)
def test_the_keeper_holds_at_most_two_shards_and_answers_like_a_model(ops: list[tuple[str, int, int | None]]) -> None:
    keeper = Keeper(TRUST)
    model: list[int | None] = []  # epochs held, latest first
    for op, epoch, keep in ops:
        if op == "contribute":
            outcome = contribute(keeper, epoch, keep)
            if keep == epoch:
                assert outcome.response.status == 400
                continue
            if keep is not None and keep not in model and model != [None]:
                assert outcome.response.status == 409
                continue
            model = [epoch, *([keep] if keep is not None else [])]
        elif op == "go-contribute":
            body = msgspec.json.encode({"shard": shard(epoch)})
            keeper.handle(ApiRequest("POST", KEEPER_CONTRIBUTE_PATH, NEXUS, body))
            model = [None]
        elif op == "forget":
            forget(keeper, {"epoch": epoch})
            model = [e for e in model if e != epoch]
        else:
            forget(keeper, {"all": True})
            model = []
        assert list(keeper.epochs) == model
        assert len(keeper.epochs) <= 2
        if len(model) == 2:
            assert None not in model and model[0] != model[1]
        for wanted in range(1, 6):
            response = read(keeper, msgspec.json.encode({"epoch": wanted}))
            if not model:
                assert response.status == 404
                continue
            answer = msgspec.json.decode(response.body)
            expected = wanted if wanted in model else model[0]
            assert answer.get("epoch") == expected
            others = [e for e in model if e != expected]
            assert answer.get("other_epoch") == (others[0] if others else None)
            assert answer["slots"] == 2
