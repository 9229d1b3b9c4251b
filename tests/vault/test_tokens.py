"""The Vault face's tokens, without a server: hashed, bound to one SPIFFE ID, expiring, bounded in number."""

from __future__ import annotations

import hashlib

import pytest

from spike.app.nexus.vault.tokens import TokenStore, TooManyTokens
from spike.protocol.identity import SpiffeId

WEB = SpiffeId.parse("spiffe://spike.test/app/web")
OTHER = SpiffeId.parse("spiffe://spike.test/app/other")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_only_a_hash_is_kept_and_the_token_works_only_for_its_identity() -> None:
    clock = Clock()
    store = TokenStore(600, clock=clock)
    token, entry = store.issue(WEB)
    assert token.startswith("s.") and len(token) >= 40
    kept = repr(store.__dict__)
    assert token not in kept and token.encode() not in kept.encode()
    assert hashlib.sha256(token.encode()).digest() in store._tokens  # what is kept is the digest
    assert store.check(token, WEB) == entry
    assert store.check(token, OTHER) is None  # another SVID presenting it
    assert store.check(token, None) is None
    assert store.check(token + "x", WEB) is None
    assert not store.renew(token, OTHER, None) and not store.revoke(token, OTHER)
    assert store.check(token, WEB) is not None  # the refused attempts changed nothing


def test_tokens_expire_and_renewals_stop_at_the_lifetime() -> None:
    clock = Clock()
    store = TokenStore(600, clock=clock, max_lifetime=1000)
    token, _ = store.issue(WEB)
    clock.now += 599
    assert store.check(token, WEB) is not None
    renewed = store.renew(token, WEB, 300)
    assert renewed is not None and renewed.remaining(clock.now) == 300
    clock.now += 299
    renewed = store.renew(token, WEB, None)  # the TTL again, but the lifetime ends at issue + 1000
    assert renewed is not None and renewed.expires_at == renewed.issued_at + 1000
    clock.now = renewed.expires_at
    assert store.check(token, WEB) is None
    assert store.renew(token, WEB, None) is None  # an expired token cannot be brought back
    assert len(store) == 0


def test_revoke_self() -> None:
    store = TokenStore(600, clock=Clock())
    token, _ = store.issue(WEB)
    assert store.revoke(token, WEB)
    assert store.check(token, WEB) is None and not store.revoke(token, WEB)


def test_logins_are_bounded_per_identity_and_in_all() -> None:
    clock = Clock()
    store = TokenStore(600, clock=clock, per_identity=3, max_tokens=5)
    first = [store.issue(WEB)[0] for _ in range(3)]
    clock.now += 1
    fourth, _ = store.issue(WEB)  # the identity's oldest token makes room
    assert store.check(first[0], WEB) is None
    assert all(store.check(t, WEB) for t in [*first[1:], fourth])
    store.issue(OTHER)
    store.issue(OTHER)
    with pytest.raises(TooManyTokens):  # five live tokens: a third identity's login is refused, nobody evicted
        store.issue(SpiffeId.parse("spiffe://spike.test/app/third"))
    assert len(store) == 5
    clock.now += 600  # all expired: room again
    store.issue(WEB)
    assert len(store) == 1
