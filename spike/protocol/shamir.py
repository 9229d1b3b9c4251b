"""Shamir's secret sharing over the P-256 scalar field.

The secret is the root key read as a big-endian integer; share ``x`` is the
keeper's stable id, share ``y`` is 32 big-endian bytes.  `deal` derives the
polynomial's coefficients from the key itself so that the same key, epoch and
threshold always give the same share for the same keeper: every Nexus
instance, restart and re-seed agree on what a keeper should hold.

Two derivations of the coefficients (`ShardDerivation`):

* ``hmac`` (spike's own, the default): HMAC-SHA512 under the key over a label,
  the epoch, the threshold and the coefficient's index, reduced modulo the
  field order (a bias below 2**-256).  Each epoch has its own polynomial.
* ``spike`` (SPIKE's Go Nexus and bootstrap): a SHA-256 chain of the key,
  ``H1 = SHA256(key)``, ``H(i+1) = SHA256(H(i))``, each block read as a
  big-endian number and taken as the next coefficient if it is below the
  field order (else skipped).  No epoch goes in: the shards depend on the key
  and the threshold only, so a new key is the only way to new shards (which a
  rotation always makes).  With it, SPIKE's Go Nexus and spike's deal the
  same bytes to the same keepers and read each other's recovery files.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from enum import Enum
from functools import lru_cache

from .errors import ShamirError
from .material import MAX_KEEPER_ID, MIN_KEEPER_ID, ORDER, SHARD_SIZE, RootKey, Share

_COEFFICIENT_LABEL = b"spike/v1/shamir-coefficient"


class ShardDerivation(Enum):
    """How the polynomial's coefficients come from the root key (module docstring)."""

    HMAC = "hmac"  # spike's: HMAC-SHA512 in (key, epoch, threshold, index)
    SPIKE = "spike"  # SPIKE's Go code: a SHA-256 chain of the key, no epoch


def check_parameters(threshold: int, ids: Sequence[int]) -> None:
    """Raise `ShamirError` unless ``1 <= threshold <= len(ids)`` with distinct ids in 1..255."""
    if not ids:
        raise ShamirError("at least one share id is needed")
    if threshold < 1:
        raise ShamirError(f"threshold must be at least 1, not {threshold}")
    if threshold > len(ids):
        raise ShamirError(f"threshold {threshold} is larger than the number of shares {len(ids)}")
    seen: set[int] = set()
    for i in ids:
        _check_id(i)
        if i in seen:
            raise ShamirError(f"share id {i} appears twice")
        seen.add(i)


def _check_id(i: int) -> None:
    if not isinstance(i, int) or not MIN_KEEPER_ID <= i <= MAX_KEEPER_ID:
        raise ShamirError(f"share id {i!r} is not between {MIN_KEEPER_ID} and {MAX_KEEPER_ID}")


def _coefficients(key: RootKey, epoch: int, threshold: int, derivation: ShardDerivation) -> list[int]:
    if derivation is ShardDerivation.SPIKE:
        return _spike_coefficients(key, threshold)
    secret = key.secret_bytes()
    prefix = _COEFFICIENT_LABEL + epoch.to_bytes(8, "big") + threshold.to_bytes(1, "big")
    coefficients = [int.from_bytes(secret, "big")]
    for j in range(1, threshold):
        digest = hmac.new(secret, prefix + j.to_bytes(1, "big"), "sha512").digest()
        coefficients.append(int.from_bytes(digest, "big") % ORDER)
    return coefficients


def _spike_coefficients(key: RootKey, threshold: int) -> list[int]:
    # SPIKE's ComputeShares (spike-sdk-go crypto/shamir.go) hands circl's secretsharing.New a
    # DeterministicReader (crypto/io.go: SHA256 of the key, then SHA256 of the previous block, 32
    # bytes at a time); circl draws each coefficient with crypto/rand.Int(reader, order), which reads
    # 32 bytes and retries while the number is not below the order.
    secret = key.secret_bytes()
    coefficients = [int.from_bytes(secret, "big")]
    block = secret
    while len(coefficients) < threshold:
        block = hashlib.sha256(block).digest()
        candidate = int.from_bytes(block, "big")
        if candidate < ORDER:
            coefficients.append(candidate)
    return coefficients


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    result = 0
    for c in reversed(coefficients):
        result = (result * x + c) % ORDER
    return result


def _to_share(x: int, epoch: int, y: int) -> Share:
    return Share(x, epoch, y.to_bytes(SHARD_SIZE, "big"))


def deal(
    key: RootKey,
    *,
    epoch: int,
    threshold: int,
    ids: Sequence[int],
    derivation: ShardDerivation = ShardDerivation.HMAC,
) -> dict[int, Share]:
    """Split `key` into one share per id; any `threshold` of them rebuild it."""
    check_parameters(threshold, ids)
    coefficients = _coefficients(key, epoch, threshold, derivation)
    return {i: _to_share(i, epoch, _evaluate(coefficients, i)) for i in ids}


def share_for(
    key: RootKey, *, epoch: int, threshold: int, id: int, derivation: ShardDerivation = ShardDerivation.HMAC
) -> Share:
    """The share `deal` gives to `id`, without computing the others."""
    if threshold < 1:
        raise ShamirError(f"threshold must be at least 1, not {threshold}")
    _check_id(id)
    return _to_share(id, epoch, _evaluate(_coefficients(key, epoch, threshold, derivation), id))


def split_with(secret: int, coefficients: Sequence[int], ids: Sequence[int]) -> dict[int, int]:
    """Textbook split with caller-chosen coefficients (``a1 .. a(t-1)``); for embedding and tests."""
    check_parameters(len(coefficients) + 1, ids)
    if not 0 <= secret < ORDER or any(not 0 <= c < ORDER for c in coefficients):
        raise ShamirError("secret and coefficients must be field elements")
    poly = [secret, *coefficients]
    return {i: _evaluate(poly, i) for i in ids}


@lru_cache(maxsize=256)
def _lagrange_at_zero(ids: tuple[int, ...]) -> tuple[int, ...]:
    # Depends only on which ids take part, so the inversions are paid once per id set.
    weights = []
    for i in ids:
        numerator = 1
        denominator = 1
        for j in ids:
            if j != i:
                numerator = numerator * j % ORDER
                denominator = denominator * (j - i) % ORDER
        weights.append(numerator * pow(denominator, -1, ORDER) % ORDER)
    return tuple(weights)


def interpolate(points: dict[int, int]) -> int:
    """The polynomial's value at zero through the given (x, y) points."""
    ids = tuple(sorted(points))
    weights = _lagrange_at_zero(ids)
    return sum(w * points[i] for w, i in zip(weights, ids, strict=True)) % ORDER


def on_one_polynomial(points: dict[int, int], threshold: int) -> bool:
    """Whether every (x, y) point lies on the polynomial of degree `threshold` - 1 through the lowest `threshold`.

    With exactly `threshold` points this always holds (they define the polynomial); every point beyond
    them is a real check: shards of one key dealt once agree, a shard of anything else does not.
    """
    ids = sorted(points)
    base, rest = ids[:threshold], ids[threshold:]
    for x in rest:
        value = 0
        for i in base:
            numerator, denominator = 1, 1
            for j in base:
                if j != i:
                    numerator = numerator * (x - j) % ORDER
                    denominator = denominator * (i - j) % ORDER
            value = (value + points[i] * numerator * pow(denominator, -1, ORDER)) % ORDER
        if value != points[x] % ORDER:
            return False
    return True


def combine(shares: Iterable[Share], threshold: int) -> RootKey:
    """Rebuild the key from at least `threshold` shares of one epoch.

    Exactly `threshold` shares (the lowest ids) are used; checking the rest
    is the job of the shard commitments and the key check value, which can
    name the bad shard instead of just failing.
    """
    given = list(shares)
    if threshold < 1:
        raise ShamirError(f"threshold must be at least 1, not {threshold}")
    if len(given) < threshold:
        raise ShamirError(f"{threshold} shares are needed, only {len(given)} given")
    epochs = {s.epoch for s in given}
    if len(epochs) > 1:
        raise ShamirError(f"shares of different epochs cannot be combined: {sorted(epochs)}")
    by_id: dict[int, Share] = {}
    for share in given:
        if share.id in by_id:
            raise ShamirError(f"share id {share.id} appears twice")
        by_id[share.id] = share
    chosen = sorted(by_id)[:threshold]
    secret = interpolate({i: by_id[i].as_int() for i in chosen})
    if secret == 0:
        raise ShamirError("these shares do not rebuild a valid key")
    return RootKey(secret.to_bytes(SHARD_SIZE, "big"))
