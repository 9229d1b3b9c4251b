"""A failed policy reload: the set in force stays only if it is provably the stored one (issue 14, M1)."""

from __future__ import annotations

import logging

import pytest

from spike.app.model.policy import Permission, Policy
from spike.app.nexus.authorizer import Authorizer, PoliciesDatabaseUnavailable, PoliciesUnavailable
from spike.app.store.errors import DatabaseUnavailable
from spike.protocol.identity import SpiffeId, TrustDomains

TRUST = TrustDomains.single("spike.test")
CALLER = SpiffeId("spike.test", "/workload/w")
READER = Policy("1", "reader", "^spiffe://spike\\.test/workload/w$", "^r/", frozenset({Permission.READ}), 0, 0)


class Source:
    """The policies' side of the store, as the engine reads it: a counter and the rows, or a failure."""

    def __init__(self) -> None:
        self.counter = 1
        self.policies = [READER]
        self.rows_fail: Exception | None = None
        self.counter_fails = False

    def snapshot(self) -> tuple[int, list[Policy]]:
        if self.rows_fail is not None:
            raise self.rows_fail
        return self.counter, list(self.policies)

    def version(self) -> int:
        if self.counter_fails:
            raise DatabaseUnavailable("the database is away")
        return self.counter


def test_the_set_in_force_stays_when_the_counter_proves_nothing_changed(caplog: pytest.LogCaptureFixture) -> None:
    source = Source()
    authorizer = Authorizer(TRUST, source)
    assert authorizer.allows(CALLER, Permission.READ, "r/x")
    source.rows_fail = OSError("disk I/O error")
    authorizer.invalidate()
    with caplog.at_level(logging.WARNING, logger="spike.nexus.policy"):
        assert authorizer.allows(CALLER, Permission.READ, "r/x")  # provably current: kept
        assert authorizer.allows(CALLER, Permission.READ, "r/x")
    assert [r.levelname for r in caplog.records] == ["WARNING"]  # said once, not per request
    assert "have not changed" in caplog.records[0].getMessage()


@pytest.mark.parametrize("counter", ["moved", "unreadable"])
def test_nothing_is_granted_when_the_set_in_force_may_be_stale(counter: str, caplog: pytest.LogCaptureFixture) -> None:
    source = Source()
    authorizer = Authorizer(TRUST, source)
    assert authorizer.allows(CALLER, Permission.READ, "r/x")
    source.rows_fail = DatabaseUnavailable("connection refused")
    if counter == "moved":
        source.counter = 2  # the policy was deleted meanwhile
    else:
        source.counter_fails = True
    authorizer.invalidate()
    with caplog.at_level(logging.ERROR, logger="spike.nexus.policy"):
        for _ in range(3):
            with pytest.raises(PoliciesDatabaseUnavailable):  # a 503 on the API
                authorizer.allows(CALLER, Permission.READ, "r/x")
    assert len(caplog.records) == 1 and "POLICY-BASED ACCESS DENIED" in caplog.records[0].getMessage()
    source.rows_fail, source.counter_fails, source.policies = None, False, []
    assert not authorizer.allows(CALLER, Permission.READ, "r/x")  # read again: the deletion is in force


def test_an_unexpected_failure_is_a_500_and_denies() -> None:
    source = Source()
    authorizer = Authorizer(TRUST, source)
    source.rows_fail = ValueError("a bug")
    with pytest.raises(PoliciesUnavailable) as raised:
        authorizer.allows(CALLER, Permission.READ, "r/x")
    assert not isinstance(raised.value, DatabaseUnavailable)
