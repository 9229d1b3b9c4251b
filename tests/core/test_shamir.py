"""Shamir t-of-n over the P-256 scalar field: round trips, determinism, errors, known answers."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spike.protocol import ORDER, RootKey, ShamirError, Share, combine, deal, share_for, split_with
from spike.protocol.shamir import interpolate
from tests.core.core_helpers import OTHER_KEY_INT, SAMPLE_KEY_INT, key_from_int

KEY = key_from_int(SAMPLE_KEY_INT)

# (t, n) pairs including t=1, t=n and a few wide ones.
SHAPES = [(1, 1), (1, 3), (2, 2), (2, 3), (3, 3), (3, 5), (4, 7), (5, 5), (1, 9), (9, 9), (6, 9)]


@pytest.mark.parametrize(("threshold", "n"), SHAPES)
def test_every_threshold_subset_rebuilds_the_key(threshold: int, n: int) -> None:
    ids = list(range(1, n + 1))
    shares = deal(KEY, epoch=3, threshold=threshold, ids=ids)
    assert sorted(shares) == ids
    for subset in itertools.combinations(ids, threshold):
        assert combine((shares[i] for i in subset), threshold) == KEY, subset


@pytest.mark.parametrize(("threshold", "n"), [(2, 3), (3, 5), (5, 5), (6, 9)])
def test_more_than_threshold_shares_also_rebuild_the_key(threshold: int, n: int) -> None:
    shares = deal(KEY, epoch=0, threshold=threshold, ids=range(1, n + 1))
    assert combine(shares.values(), threshold) == KEY


@pytest.mark.parametrize(("threshold", "n"), [(2, 3), (3, 5), (5, 5), (6, 9)])
def test_fewer_than_threshold_shares_are_refused(threshold: int, n: int) -> None:
    shares = deal(KEY, epoch=0, threshold=threshold, ids=list(range(1, n + 1)))
    for subset in itertools.combinations(sorted(shares), threshold - 1):
        with pytest.raises(ShamirError, match="needed"):
            combine([shares[i] for i in subset], threshold)


def test_fewer_shares_than_a_smaller_threshold_claims_give_a_different_key() -> None:
    # Lying about t (combining 2 shares of a 3-of-5 split as if t were 2) gives
    # some other field element: which is why Nexus checks the key check value.
    shares = deal(KEY, epoch=0, threshold=3, ids=[1, 2, 3, 4, 5])
    assert combine([shares[1], shares[2]], 2) != KEY


def test_sparse_stable_ids_work_as_x_coordinates() -> None:
    ids = [7, 42, 200, 255]
    shares = deal(KEY, epoch=1, threshold=3, ids=ids)
    assert {s.id for s in shares.values()} == set(ids)
    assert combine([shares[255], shares[7], shares[200]], 3) == KEY


def test_threshold_one_gives_every_keeper_the_key_itself() -> None:
    # t=1 is a constant polynomial: each share is the secret. Documented so that
    # nobody mistakes a 1-of-n deployment for one where a keeper holds "a part".
    shares = deal(KEY, epoch=5, threshold=1, ids=[1, 2, 3])
    assert {s.secret_bytes() for s in shares.values()} == {KEY.secret_bytes()}
    assert combine([shares[2]], 1) == KEY


def test_255_keepers_with_a_high_threshold() -> None:
    ids = list(range(1, 256))
    shares = deal(KEY, epoch=9, threshold=200, ids=ids)
    picked = random.Random(4).sample(ids, 200)
    assert combine([shares[i] for i in picked], 200) == KEY


# ---------------------------------------------------------------- determinism


def test_deal_is_a_function_of_key_epoch_threshold_and_id() -> None:
    first = deal(KEY, epoch=11, threshold=3, ids=[1, 2, 3, 4, 5])
    again = deal(KEY, epoch=11, threshold=3, ids=[5, 4, 3, 2, 1])
    assert first == again
    # The share of one id does not depend on which other ids take part.
    assert deal(KEY, epoch=11, threshold=3, ids=[2, 9, 30])[2] == first[2]


@pytest.mark.parametrize(
    ("key", "epoch", "threshold"),
    [(KEY, 12, 3), (KEY, 11, 4), (key_from_int(OTHER_KEY_INT), 11, 3)],
    ids=["epoch", "threshold", "key"],
)
def test_deal_changes_when_any_input_changes(key: RootKey, epoch: int, threshold: int) -> None:
    base = deal(KEY, epoch=11, threshold=3, ids=[1, 2, 3, 4, 5])
    other = deal(key, epoch=epoch, threshold=threshold, ids=[1, 2, 3, 4, 5])
    for i in base:
        assert base[i].secret_bytes() != other[i].secret_bytes(), i


@pytest.mark.parametrize(("threshold", "n"), SHAPES)
def test_share_for_equals_deal(threshold: int, n: int) -> None:
    ids = list(range(1, n + 1))
    dealt = deal(KEY, epoch=2, threshold=threshold, ids=ids)
    for i in ids:
        assert share_for(KEY, epoch=2, threshold=threshold, id=i) == dealt[i]


def test_shares_carry_their_id_and_epoch() -> None:
    shares = deal(KEY, epoch=77, threshold=2, ids=[3, 8])
    assert [(s.id, s.epoch) for s in shares.values()] == [(3, 77), (8, 77)]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("threshold", "ids", "message"),
    [
        (0, [1, 2, 3], "at least 1"),
        (-1, [1, 2, 3], "at least 1"),
        (4, [1, 2, 3], "larger than"),
        (2, [], "at least one"),
        (2, [1, 2, 2], "twice"),
        (1, [0, 1], "between 1 and 255"),
        (1, [1, 256], "between 1 and 255"),
        (1, [-3], "between 1 and 255"),
    ],
)
def test_deal_rejects_bad_parameters(threshold: int, ids: list[int], message: str) -> None:
    with pytest.raises(ShamirError, match=message):
        deal(KEY, epoch=0, threshold=threshold, ids=ids)


@pytest.mark.parametrize(("threshold", "keeper_id"), [(0, 1), (2, 0), (2, 256)])
def test_share_for_rejects_bad_parameters(threshold: int, keeper_id: int) -> None:
    with pytest.raises(ShamirError):
        share_for(KEY, epoch=0, threshold=threshold, id=keeper_id)


def test_shamir_errors_are_value_errors_for_callers_that_catch_those() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        deal(KEY, epoch=0, threshold=0, ids=[1])


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_a_share_of_the_wrong_length_is_refused(length: int) -> None:
    with pytest.raises(ShamirError, match="32 bytes"):
        Share(1, 0, b"\x01" * length)


@pytest.mark.parametrize("bad_id", [0, 256, -1])
def test_a_share_with_an_id_outside_1_to_255_is_refused(bad_id: int) -> None:
    with pytest.raises(ShamirError, match="between 1 and 255"):
        Share(bad_id, 0, b"\x01" * 32)


def test_a_share_outside_the_field_is_refused() -> None:
    with pytest.raises(ShamirError, match="field"):
        Share(1, 0, ORDER.to_bytes(32, "big"))
    Share(1, 0, (ORDER - 1).to_bytes(32, "big"))  # the largest element is fine


def test_combine_refuses_shares_of_different_epochs() -> None:
    a = deal(KEY, epoch=1, threshold=2, ids=[1, 2])
    b = deal(KEY, epoch=2, threshold=2, ids=[1, 2])
    with pytest.raises(ShamirError, match="different epochs"):
        combine([a[1], b[2]], 2)


def test_combine_refuses_duplicate_ids() -> None:
    shares = deal(KEY, epoch=1, threshold=2, ids=[1, 2, 3])
    with pytest.raises(ShamirError, match="twice"):
        combine([shares[1], shares[1], shares[2]], 2)


@pytest.mark.parametrize("threshold", [0, -2])
def test_combine_refuses_a_threshold_below_one(threshold: int) -> None:
    shares = deal(KEY, epoch=1, threshold=1, ids=[1])
    with pytest.raises(ShamirError, match="at least 1"):
        combine(shares.values(), threshold)


def test_combine_refuses_shares_that_rebuild_zero() -> None:
    # y = x is the line through (1, 1) and (2, 2): its value at zero is zero,
    # which is not a valid key.
    with pytest.raises(ShamirError, match="valid key"):
        combine([Share(1, 0, (1).to_bytes(32, "big")), Share(2, 0, (2).to_bytes(32, "big"))], 2)


# ---------------------------------------------------------------- known answers


def test_split_with_known_coefficients_matches_hand_computed_values() -> None:
    # f(x) = 5 + 3x + 2x^2: f(1) = 10, f(2) = 19, f(3) = 32, f(10) = 235.
    assert split_with(5, [3, 2], [1, 2, 3, 10]) == {1: 10, 2: 19, 3: 32, 10: 235}


def test_split_with_reduces_modulo_the_field_order() -> None:
    # f(x) = (ORDER - 1) + x: f(1) = ORDER = 0, f(2) = ORDER + 1 = 1 (mod ORDER).
    assert split_with(ORDER - 1, [1], [1, 2]) == {1: 0, 2: 1}
    # f(x) = 1 + (ORDER - 1) x^2 = 1 - x^2: f(3) = -8 = ORDER - 8, f(4) = -15.
    assert split_with(1, [0, ORDER - 1], [1, 3, 4]) == {1: 0, 3: ORDER - 8, 4: ORDER - 15}


def test_interpolate_inverts_the_hand_computed_split() -> None:
    assert interpolate({1: 10, 2: 19, 3: 32}) == 5
    assert interpolate({3: 32, 10: 235, 1: 10}) == 5
    assert interpolate({1: 0, 2: 1}) == ORDER - 1


def test_split_with_no_coefficients_is_threshold_one() -> None:
    assert split_with(42, [], [1, 2, 3]) == {1: 42, 2: 42, 3: 42}


@pytest.mark.parametrize(("secret", "coefficients"), [(ORDER, [1]), (-1, [1]), (5, [ORDER]), (5, [1, -2])])
def test_split_with_refuses_values_outside_the_field(secret: int, coefficients: list[int]) -> None:
    with pytest.raises(ShamirError, match="field elements"):
        split_with(secret, coefficients, [1, 2, 3])


def test_split_with_checks_threshold_against_ids() -> None:
    with pytest.raises(ShamirError, match="larger than"):
        split_with(5, [1, 2, 3], [1, 2, 3])


def test_deal_uses_the_key_as_constant_term() -> None:
    # For t=2 the shares lie on a line through (0, key): f(2) - f(1) == f(3) - f(2).
    shares = deal(KEY, epoch=4, threshold=2, ids=[1, 2, 3])
    y = {i: s.as_int() for i, s in shares.items()}
    slope = (y[2] - y[1]) % ORDER
    assert (y[3] - y[2]) % ORDER == slope
    assert (y[1] - slope) % ORDER == KEY.as_int()


# ---------------------------------------------------------------- properties

field_keys = st.integers(min_value=1, max_value=ORDER - 1).map(key_from_int)
byte_keys = st.binary(min_size=32, max_size=32).filter(lambda b: 0 < int.from_bytes(b, "big") < ORDER).map(RootKey)


@st.composite
def deals(draw: st.DrawFn) -> tuple[RootKey, int, int, list[int]]:
    key = draw(st.one_of(field_keys, byte_keys))
    ids = sorted(draw(st.sets(st.integers(1, 255), min_size=1, max_size=10)))
    threshold = draw(st.integers(1, len(ids)))
    epoch = draw(st.integers(0, 2**63 - 1))
    return key, epoch, threshold, ids


@settings(max_examples=150, deadline=None)
@given(deals(), st.randoms(use_true_random=False))
def test_any_threshold_subset_rebuilds_any_key(dealt: tuple[RootKey, int, int, list[int]], rnd: random.Random) -> None:
    key, epoch, threshold, ids = dealt
    shares = deal(key, epoch=epoch, threshold=threshold, ids=ids)
    subset = rnd.sample(ids, rnd.randint(threshold, len(ids)))
    assert combine([shares[i] for i in subset], threshold) == key


@settings(max_examples=100, deadline=None)
@given(deals(), st.randoms(use_true_random=False))
def test_any_smaller_subset_is_refused(dealt: tuple[RootKey, int, int, list[int]], rnd: random.Random) -> None:
    key, epoch, threshold, ids = dealt
    shares = deal(key, epoch=epoch, threshold=threshold, ids=ids)
    subset = rnd.sample(ids, rnd.randint(0, threshold - 1))
    with pytest.raises(ShamirError):
        combine([shares[i] for i in subset], threshold)


@settings(max_examples=100, deadline=None)
@given(deals())
def test_share_for_agrees_with_deal_for_any_inputs(dealt: tuple[RootKey, int, int, list[int]]) -> None:
    key, epoch, threshold, ids = dealt
    shares = deal(key, epoch=epoch, threshold=threshold, ids=ids)
    for i in ids:
        assert share_for(key, epoch=epoch, threshold=threshold, id=i) == shares[i]


@settings(max_examples=100, deadline=None)
@given(
    secret=st.integers(0, ORDER - 1),
    coefficients=st.lists(st.integers(0, ORDER - 1), max_size=6),
    extra=st.integers(0, 4),
    data=st.data(),
)
def test_split_with_then_interpolate_returns_the_secret(
    secret: int, coefficients: list[int], extra: int, data: st.DataObject
) -> None:
    count = len(coefficients) + 1 + extra
    ids = data.draw(st.lists(st.integers(1, 255), min_size=count, max_size=count, unique=True))
    points = split_with(secret, coefficients, ids)
    chosen = data.draw(st.permutations(ids))[: len(coefficients) + 1]
    assert interpolate({i: points[i] for i in chosen}) == secret
