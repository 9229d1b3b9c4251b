"""Key material: redacted reprs, wiping, check values, commitments and HKDF."""

from __future__ import annotations

import traceback

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from spike.protocol import (
    ORDER,
    ApiRequest,
    LocalProtocolError,
    ResponseReceived,
    RootKey,
    SendRequest,
    ShardContribution,
    Share,
    derive_key,
    key_check_value,
    shard_commitment,
    share_for,
)
from spike.protocol.effects import RequestKind
from tests.core.core_helpers import OTHER_KEY_INT, SAMPLE_KEY_INT, key_from_int, shard_body

KEY = key_from_int(SAMPLE_KEY_INT)


def secret_forms(secret: bytes) -> list[str]:
    """Ways a secret could leak into text: hex (both cases), the int, the JSON list of ints."""
    return [
        secret.hex(),
        secret.hex().upper(),
        str(int.from_bytes(secret, "big")),
        str(list(secret)),
        ",".join(str(b) for b in secret),
        repr(secret),
    ]


def assert_no_secret(text: str, secret: bytes) -> None:
    for form in secret_forms(secret):
        assert form not in text, f"secret leaked as {form[:12]}..."


# ---------------------------------------------------------------- redaction


def test_root_key_repr_and_str_hide_the_bytes() -> None:
    for text in (repr(KEY), str(KEY), f"{KEY!r}", f"{[KEY]}", repr({"key": KEY})):
        assert "redacted" in text
        assert_no_secret(text, KEY.secret_bytes())


def test_share_repr_hides_the_bytes_but_shows_id_and_epoch() -> None:
    share = share_for(KEY, epoch=4, threshold=2, id=3)
    text = repr(share)
    assert text == "Share(id=3, epoch=4, value=<redacted>)"
    assert_no_secret(text, share.secret_bytes())
    assert_no_secret(str([share]), share.secret_bytes())


def test_wire_and_event_reprs_hide_shard_bodies() -> None:
    share = share_for(KEY, epoch=4, threshold=2, id=3)
    body = shard_body(share)
    texts = [
        repr(ShardContribution.of(share)),
        repr(ApiRequest("POST", "/v1/store/contribute", None, body)),
        repr(ResponseReceived(1, 200, body)),
        repr(SendRequest(3, 1, RequestKind.PUSH, "/v1/store/contribute", 1.0, body)),
    ]
    for text in texts:
        assert_no_secret(text, share.secret_bytes())


def test_an_assertion_about_keys_does_not_print_them() -> None:
    other = key_from_int(OTHER_KEY_INT)
    try:
        assert other == KEY
    except AssertionError:
        text = traceback.format_exc()
    else:  # pragma: no cover - the keys differ
        pytest.fail("different keys compared equal")
    assert_no_secret(text, KEY.secret_bytes())
    assert_no_secret(text, other.secret_bytes())


# ---------------------------------------------------------------- RootKey


def test_wipe_makes_the_key_unusable() -> None:
    key = key_from_int(SAMPLE_KEY_INT)
    assert key == KEY
    key.wipe()
    with pytest.raises(LocalProtocolError, match="wiped"):
        key.secret_bytes()
    with pytest.raises(LocalProtocolError, match="wiped"):
        key.as_int()
    with pytest.raises(LocalProtocolError, match="wiped"):
        key_check_value(key, 0)
    assert key != KEY
    assert KEY.as_int() == SAMPLE_KEY_INT  # another key with the same bytes is untouched


def test_a_root_key_copies_its_input() -> None:
    raw = bytearray(SAMPLE_KEY_INT.to_bytes(32, "big"))
    key = RootKey(raw)
    raw[0] ^= 0xFF
    assert key == KEY


def test_root_keys_are_unhashable() -> None:
    with pytest.raises(TypeError):
        hash(KEY)


@pytest.mark.parametrize(
    "value",
    [b"", b"\x01" * 31, b"\x01" * 33, bytes(32), ORDER.to_bytes(32, "big"), b"\xff" * 32],
    ids=["empty", "31", "33", "zero", "order", "max"],
)
def test_root_key_must_be_a_nonzero_field_element(value: bytes) -> None:
    with pytest.raises(LocalProtocolError):
        RootKey(value)


def test_generate_rejects_out_of_field_candidates() -> None:
    candidates = [bytes(32), b"\xff" * 32, ORDER.to_bytes(32, "big"), (ORDER - 1).to_bytes(32, "big")]
    asked: list[int] = []

    def draw(n: int) -> bytes:
        asked.append(n)
        return candidates[len(asked) - 1]

    key = RootKey.generate(draw)
    assert key.as_int() == ORDER - 1
    assert asked == [32, 32, 32, 32]


def test_keys_compare_by_value() -> None:
    assert key_from_int(SAMPLE_KEY_INT) == KEY
    assert key_from_int(OTHER_KEY_INT) != KEY
    assert SAMPLE_KEY_INT.to_bytes(32, "big") != KEY  # not equal to raw bytes


def test_shares_are_immutable_and_compare_by_value() -> None:
    share = share_for(KEY, epoch=1, threshold=2, id=1)
    with pytest.raises(AttributeError):
        share.id = 2
    assert share == Share(1, 1, share.secret_bytes())
    assert share != Share(1, 2, share.secret_bytes())
    assert share != Share(2, 1, share.secret_bytes())


# ---------------------------------------------------------------- check values and commitments


def test_key_check_value_depends_on_key_and_epoch() -> None:
    other = key_from_int(OTHER_KEY_INT)
    values = {key_check_value(KEY, 0), key_check_value(KEY, 1), key_check_value(other, 0)}
    assert len(values) == 3
    assert key_check_value(KEY, 5) == key_check_value(key_from_int(SAMPLE_KEY_INT), 5)
    assert len(key_check_value(KEY, 5)) == 32


def test_key_check_value_does_not_contain_the_key() -> None:
    assert KEY.secret_bytes() not in key_check_value(KEY, 0)


def test_shard_commitment_depends_on_epoch_id_and_value() -> None:
    share = share_for(KEY, epoch=3, threshold=2, id=4)
    commitments = {
        shard_commitment(share),
        shard_commitment(Share(4, 4, share.secret_bytes())),  # other epoch
        shard_commitment(Share(5, 3, share.secret_bytes())),  # other id
        shard_commitment(share_for(KEY, epoch=3, threshold=2, id=5)),
        shard_commitment(share_for(key_from_int(OTHER_KEY_INT), epoch=3, threshold=2, id=4)),
    }
    assert len(commitments) == 5
    assert shard_commitment(share) == shard_commitment(Share(4, 3, share.secret_bytes()))


@pytest.mark.parametrize("epoch", [-1, 2**63])
def test_epochs_outside_range_are_refused(epoch: int) -> None:
    with pytest.raises(LocalProtocolError, match="epoch"):
        key_check_value(KEY, epoch)
    with pytest.raises(LocalProtocolError, match="epoch"):
        Share(1, epoch, b"\x01" * 32)


# ---------------------------------------------------------------- HKDF


def reference_hkdf(key: RootKey, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=b"spike/v1/hkdf-salt", info=info).derive(
        key.secret_bytes()
    )


@pytest.mark.parametrize("length", [1, 16, 31, 32, 33, 64, 65, 100, 255 * 32])
def test_derive_key_is_rfc5869_hkdf_sha256(length: int) -> None:
    assert derive_key(KEY, b"spike/v1/secrets", length) == reference_hkdf(KEY, b"spike/v1/secrets", length)


def test_derive_key_defaults_to_32_bytes_and_separates_purposes() -> None:
    a = derive_key(KEY, b"a")
    assert len(a) == 32
    assert a != derive_key(KEY, b"b")
    assert a != derive_key(key_from_int(OTHER_KEY_INT), b"a")
    assert derive_key(KEY, b"a", 64)[:32] == a  # HKDF outputs are prefixes of each other


@pytest.mark.parametrize("length", [0, -1, 255 * 32 + 1])
def test_derive_key_refuses_lengths_outside_hkdf_range(length: int) -> None:
    with pytest.raises(LocalProtocolError, match="length"):
        derive_key(KEY, b"x", length)


@settings(max_examples=60, deadline=None)
@given(
    key=st.integers(1, ORDER - 1).map(key_from_int),
    info=st.binary(max_size=80),
    length=st.integers(1, 300),
)
def test_derive_key_matches_reference_hkdf_for_any_input(key: RootKey, info: bytes, length: int) -> None:
    assert derive_key(key, info, length) == reference_hkdf(key, info, length)
