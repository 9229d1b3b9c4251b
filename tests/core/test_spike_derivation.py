"""SPIKE's shard derivation (`ShardDerivation.SPIKE`): the bytes SPIKE's Go Nexus deals, and a record that says so.

The reference, `tests/core/spike_go_reference.py`, is written from SPIKE's
Go code step by step (the files and functions are named there).
"""

from __future__ import annotations

import hashlib
import itertools

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spike.protocol import (
    ORDER,
    KeyRecord,
    PersistRotation,
    RootKey,
    RotationRefused,
    ShardDerivation,
    combine,
    deal,
    seal_key,
    share_for,
)
from spike.protocol.errors import LocalProtocolError
from tests.core.core_helpers import SAMPLE_KEY_INT, Rig, key_from_int, of_type
from tests.core.spike_go_reference import go_compute_shares

KEY = key_from_int(SAMPLE_KEY_INT)
SPIKE = ShardDerivation.SPIKE
HMAC = ShardDerivation.HMAC


# Pinned outputs of the reference above (as `spike operator recover` files say them), so that a
# change to the reference itself is seen too.
PINNED = [
    (
        "5ec0de5ec0de5ec0de5ec0de5ec0de5ec0de5ec0de5ec0de5ec0de5ec0de5ec0",
        2,
        [
            "spike:1:fcccb21cb2abee692aa6b59ec436d88d29bd2bd1ecc60bc7ab1746fe6b5f44f7",
            "spike:2:9ad885dba4797e1076eeaa5f29acd2bbd5b4fe355415b82c03b3e4db197d05dd",
            "spike:3:38e4599a96470db7c3369f1f8f22ccea81acd098bb6564905c5082b7c79ac6c3",
        ],
    ),
    (
        "0000000000000000000000000000000000000000000000000000000000000001",
        3,
        [
            "spike:1:1f035e459acc6a475807b9677e4b6b5ae07d33b2f6e38cd0ebe561d508ed7221",
            "spike:2:a37b4b5a193910fdb10294a4ad7a14c71f8cf5adaa015ec03022d3422722fb99",
            "spike:3:8d67c73e7b45f4220af091b78d8bfc4500484b427241d748d8fe89845e3d7718",
            "spike:4:dcc8d1f1c0f313b565d1b0a01e8121d43f962f1ef6bc94efda324f5eaaa009ef",
            "spike:5:919e6b74ea406fb6c1a5f15e60598575208fa6959059f93040045a0e0fe78ecd",
        ],
    ),
    (
        "0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20",
        3,
        [
            "spike:1:d7060f775f1f687b1cfc95871d87713c8d221022b18839e5568d203073e11d52",
            "spike:2:fccf5c74832298645351c9190a004ff8a8deeb7891a849705013a0a10c7acd05",
            "spike:3:725de9fb710f96c3ac09a5c1d278ab446448a515b57645b905ad9c6de6eb2e39",
        ],
    ),
]


@pytest.mark.parametrize(("key_hex", "threshold", "files"), PINNED)
def test_spike_derivation_matches_pinned_go_vectors(key_hex: str, threshold: int, files: list[str]) -> None:
    key = RootKey(bytes.fromhex(key_hex))
    ids = list(range(1, len(files) + 1))
    for epoch in (0, 1, 99):  # SPIKE's scheme has no epoch input
        shares = deal(key, epoch=epoch, threshold=threshold, ids=ids, derivation=SPIKE)
        assert [f"spike:{i}:{shares[i].secret_bytes().hex()}" for i in ids] == files
    assert go_compute_shares(bytes.fromhex(key_hex), threshold, len(files)) == {
        int(f.split(":")[1]): bytes.fromhex(f.split(":")[2]) for f in files
    }


def test_threshold_two_is_the_key_plus_its_sha256_times_the_id() -> None:
    # The smallest case by hand: a1 = SHA256(key) (far below N almost always), y = key + a1 * x.
    raw = KEY.secret_bytes()
    a1 = int.from_bytes(hashlib.sha256(raw).digest(), "big")
    assert a1 < ORDER
    for x in (1, 2, 3, 200):
        share = share_for(KEY, epoch=4, threshold=2, id=x, derivation=SPIKE)
        assert share.as_int() == (KEY.as_int() + a1 * x) % ORDER


keys = st.integers(min_value=1, max_value=ORDER - 1).map(key_from_int)


@settings(max_examples=60, deadline=None)
@given(key=keys, threshold=st.integers(1, 7), extra=st.integers(0, 4))
def test_spike_derivation_matches_the_go_reference_for_any_key(key: RootKey, threshold: int, extra: int) -> None:
    n = threshold + extra
    expected = go_compute_shares(key.secret_bytes(), threshold, n)
    shares = deal(key, epoch=5, threshold=threshold, ids=range(1, n + 1), derivation=SPIKE)
    assert {i: s.secret_bytes() for i, s in shares.items()} == expected
    assert share_for(key, epoch=5, threshold=threshold, id=n, derivation=SPIKE) == shares[n]


@settings(max_examples=60, deadline=None)
@given(
    key=keys,
    derivation=st.sampled_from(list(ShardDerivation)),
    ids=st.lists(st.integers(1, 255), min_size=1, max_size=8, unique=True),
    data=st.data(),
)
def test_any_threshold_of_the_shares_rebuilds_the_key_under_either_derivation(
    key: RootKey, derivation: ShardDerivation, ids: list[int], data: st.DataObject
) -> None:
    threshold = data.draw(st.integers(1, len(ids)))
    shares = deal(key, epoch=3, threshold=threshold, ids=ids, derivation=derivation)
    subset = data.draw(st.permutations(ids)).__getitem__(slice(0, threshold))
    assert combine([shares[i] for i in subset], threshold) == key


def test_every_subset_rebuilds_the_key_with_spike_derivation() -> None:
    shares = deal(KEY, epoch=0, threshold=3, ids=[1, 2, 3, 4, 5], derivation=SPIKE)
    for subset in itertools.combinations(shares, 3):
        assert combine([shares[i] for i in subset], 3) == KEY


def test_the_derivations_give_different_shards_and_only_ours_follows_the_epoch() -> None:
    ours = deal(KEY, epoch=1, threshold=2, ids=[1, 2, 3])
    theirs = deal(KEY, epoch=1, threshold=2, ids=[1, 2, 3], derivation=SPIKE)
    assert all(ours[i].secret_bytes() != theirs[i].secret_bytes() for i in ours)
    assert share_for(KEY, epoch=2, threshold=2, id=1).secret_bytes() != ours[1].secret_bytes()
    assert share_for(KEY, epoch=2, threshold=2, id=1, derivation=SPIKE).secret_bytes() == theirs[1].secret_bytes()


# ---------------------------------------------------------------- the record says which


def test_a_record_of_ours_is_written_exactly_as_before() -> None:
    record, _ = seal_key(KEY, epoch=3, threshold=2, keeper_ids=[1, 2, 3])
    data = msgspec.json.encode(record)
    assert b"derivation" not in data
    assert msgspec.json.decode(data, type=KeyRecord).derivation is HMAC


def test_a_spike_record_keeps_its_derivation_and_commits_to_spike_shards() -> None:
    record, shares = seal_key(KEY, epoch=3, threshold=2, keeper_ids=[1, 2, 3], derivation=SPIKE)
    data = msgspec.json.encode(record)
    assert b'"derivation":"spike"' in data
    again = msgspec.json.decode(data, type=KeyRecord).validate()
    assert again == record and again.derivation is SPIKE
    expected = go_compute_shares(KEY.secret_bytes(), 2, 3)
    assert {i: s.secret_bytes() for i, s in shares.items()} == expected
    assert all(record.matches_share(s) for s in shares.values())
    ours = deal(KEY, epoch=3, threshold=2, ids=[1, 2, 3])
    assert not any(record.matches_share(s) for s in ours.values())


def test_an_unknown_derivation_in_a_record_is_refused() -> None:
    record, _ = seal_key(KEY, epoch=3, threshold=2, keeper_ids=[1, 2, 3], derivation=SPIKE)
    data = msgspec.json.encode(record).replace(b'"spike"', b'"xor"')
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(data, type=KeyRecord)


# ---------------------------------------------------------------- Nexus follows the record


def spike_rig(ids: tuple[int, ...] = (1, 2, 3)) -> Rig:
    record, shares = seal_key(KEY, epoch=7, threshold=2, keeper_ids=ids, derivation=SPIKE)
    rig = Rig(ids, record=record, derivation=SPIKE, random_bytes=lambda n: bytes([7]) * n)
    rig.shares = shares
    return rig


def test_nexus_reseeds_and_exports_spike_shards_under_a_spike_record() -> None:
    rig = spike_rig()
    rig.recover(1, 2)
    assert rig.phase().value == "ready"
    exported = rig.custody.export_shards()
    assert {i: s.secret_bytes() for i, s in exported.items()} == go_compute_shares(KEY.secret_bytes(), 2, 3)
    pushes = rig.requests(rig.reply(3, 404), None)
    push = next(p for p in pushes if p.keeper_id == 3)
    body = msgspec.json.decode(push.body)
    assert bytes(body["shard"]) == go_compute_shares(KEY.secret_bytes(), 2, 3)[3]


def test_nexus_refuses_a_record_whose_derivation_is_not_the_configured_one() -> None:
    record, _ = seal_key(KEY, epoch=7, threshold=2, keeper_ids=[1, 2, 3], derivation=SPIKE)
    with pytest.raises(LocalProtocolError, match="'spike' way, configured is 'hmac'"):
        Rig(record=record)
    rig = Rig(with_record=False)
    with pytest.raises(LocalProtocolError, match="derived the 'spike' way"):
        rig.custody.initialise(record, rig.now)


def test_a_changed_derivation_is_a_rekey_the_rotation_deals_with_the_configured_one() -> None:
    record, shares = seal_key(KEY, epoch=7, threshold=2, keeper_ids=[1, 2, 3])
    rig = Rig(record=record, ids=(1, 2, 3), derivation=SPIKE, rekey=True, random_bytes=lambda n: bytes([9]) * n)
    rig.shares = shares
    effects = rig.recover(1, 2)
    assert rig.phase().value == "ready"  # rebuilt from shards of ours, re-seeds follow the record
    (persist,) = of_type(effects, PersistRotation)
    assert persist.pending.record.derivation is SPIKE
    assert persist.pending.record.epoch == 8


def test_rotation_under_spike_derivation_needs_a_new_key() -> None:
    rig = spike_rig((1, 2, 3, 4, 5))
    rig.recover(1, 2)
    with pytest.raises(RotationRefused, match="needs a new root key"):
        rig.custody.start_rotation(rig.now, key=KEY)
    pending = rig.custody.start_rotation(rig.now, key=key_from_int(SAMPLE_KEY_INT + 1))
    assert pending.record.derivation is SPIKE
    assert pending.record.epoch == 8
