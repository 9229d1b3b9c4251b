"""The key record: what Nexus stores to verify shards and a rebuilt key without holding the key."""

from __future__ import annotations

import base64

import msgspec
import pytest

from spike.protocol import KeyRecord, RemoteProtocolError, Share, seal_key, share_for
from spike.protocol.wire import decode, encode
from tests.core.core_helpers import OTHER_KEY_INT, SAMPLE_KEY_INT, key_from_int

KEY = key_from_int(SAMPLE_KEY_INT)
RECORD, SHARES = seal_key(KEY, epoch=9, threshold=3, keeper_ids=[5, 1, 3, 2, 4])


def test_seal_key_gives_a_valid_record_with_sorted_ids() -> None:
    assert RECORD.validate() is RECORD
    assert RECORD.keeper_ids == (1, 2, 3, 4, 5)
    assert RECORD.threshold == 3
    assert RECORD.shares == 5
    assert RECORD.epoch == 9
    assert set(RECORD.commitments) == {1, 2, 3, 4, 5}


def test_the_record_recognises_its_key_and_only_it() -> None:
    assert RECORD.matches_key(KEY)
    assert not RECORD.matches_key(key_from_int(OTHER_KEY_INT))
    other_epoch, _ = seal_key(KEY, epoch=10, threshold=3, keeper_ids=[1, 2, 3, 4, 5])
    assert other_epoch.check != RECORD.check


def test_the_record_recognises_each_dealt_share() -> None:
    assert all(RECORD.matches_share(share) for share in SHARES.values())


@pytest.mark.parametrize(
    "share",
    [
        Share(1, 8, SHARES[1].secret_bytes()),  # right bytes, stale epoch
        share_for(KEY, epoch=8, threshold=3, id=1),  # the real stale share
        Share(2, 9, SHARES[1].secret_bytes()),  # keeper 1's bytes claimed by keeper 2
        share_for(key_from_int(OTHER_KEY_INT), epoch=9, threshold=3, id=1),  # another key
        share_for(KEY, epoch=9, threshold=2, id=1),  # another threshold
        Share(6, 9, SHARES[1].secret_bytes()),  # an id the record does not know
    ],
    ids=["stale-epoch-label", "stale-share", "swapped-id", "other-key", "other-threshold", "unknown-id"],
)
def test_the_record_rejects_foreign_or_stale_shares(share: Share) -> None:
    assert not RECORD.matches_share(share)


def test_the_record_survives_a_json_round_trip() -> None:
    assert decode(encode(RECORD), KeyRecord) == RECORD


def test_the_record_holds_no_key_or_shard_bytes() -> None:
    text = encode(RECORD)
    secrets = [KEY.secret_bytes(), *(s.secret_bytes() for s in SHARES.values())]
    for secret in secrets:
        assert base64.b64encode(secret) not in text
        assert secret.hex().encode() not in text
        assert secret not in text


def test_a_stored_record_with_unknown_fields_is_refused() -> None:
    raw = msgspec.json.decode(encode(RECORD))
    raw["surprise"] = 1
    with pytest.raises(RemoteProtocolError, match="malformed"):
        decode(msgspec.json.encode(raw), KeyRecord)


def _broken(**changes: object) -> KeyRecord:
    return msgspec.structs.replace(RECORD, **changes)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (_broken(threshold=0), "at least 1"),
        (_broken(threshold=6), "larger than"),
        (_broken(keeper_ids=()), "at least one"),
        (_broken(keeper_ids=(1, 2, 2, 4, 5)), "twice"),
        (_broken(keeper_ids=(0, 2, 3, 4, 5)), "between 1 and 255"),
        (_broken(keeper_ids=(1, 2, 3, 4, 256)), "between 1 and 255"),
        (_broken(epoch=-1), "epoch"),
        (_broken(epoch=2**63), "epoch"),
        (_broken(check=b"\x00" * 31), "check value"),
        (_broken(check=b""), "check value"),
        (_broken(commitments={i: c for i, c in RECORD.commitments.items() if i != 3}), "commitments"),
        (_broken(commitments={**RECORD.commitments, 6: b"\x00" * 32}), "commitments"),
        (_broken(commitments={**RECORD.commitments, 3: b"\x00" * 33}), "not 32 bytes"),
    ],
)
def test_malformed_records_raise_remote_protocol_error(record: KeyRecord, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        record.validate()


def test_a_record_with_unknown_commitment_does_not_match_that_share() -> None:
    record = _broken(commitments={**RECORD.commitments, 1: bytes(32)})
    assert not record.matches_share(SHARES[1])
    assert record.matches_share(SHARES[2])
