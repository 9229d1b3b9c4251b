"""The audit's findings on the policy engine (issue 14, M1 and M2), each on a real deployment (mTLS on loopback).

M1 (a): a pattern with a bracket class and a bar (``spike/[]|]``) broke every reload after it, so a
policy deleted afterwards kept granting access; (b): ``app/x[]|spike/acl/policies|]`` (a class, not
three alternatives) was read as granting the policy routes.  M2: a backtracking pattern held the event
loop for seconds.  The requests here use only the HTTP API and SPIKE's route names, so they run
unchanged against the code before the fix (where they fail).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from spike.app.api.messages import CIPHER_ENCRYPT_PATH, POLICY_PATH, SECRETS_PATH
from spike.app.commands.devca import DevIdentity
from tests.authz.deployment import Caller, Deployment, running

TD = r"spiffe://spike\.test"


def workload_id(name: str) -> str:
    return rf"^{TD}/workload/{name}$"


def read(caller: Caller, path: str) -> int:
    return caller.post(SECRETS_PATH, {"path": path}, action="get").status


@pytest.fixture
def superuser(deployment: Deployment) -> Caller:
    return deployment.caller("pilot-superuser")


def test_a_class_holding_a_bar_neither_breaks_reloads_nor_keeps_a_deleted_policy(
    deployment: Deployment, superuser: Caller
) -> None:
    superuser.ok(SECRETS_PATH, {"path": "r/x", "values": {"k": "v"}})
    superuser.put_policy("reader", workload_id("reader"), "^r/.*$", ["read"])
    reader = deployment.workload("reader")
    assert read(reader, "r/x") == 200
    superuser.put_policy("odd", workload_id("odd"), "spike/[]|]", ["read"])
    assert read(reader, "r/x") == 200  # before the fix: 500, every reload failing from now on
    assert superuser.ok(POLICY_PATH, {"id": "reader"}, action="delete") == {}
    assert read(reader, "r/x") == 401  # before the fix: 200, the deleted policy still in force
    assert read(reader, "r/x") == 401


def test_a_stored_pattern_that_does_not_compile_grants_nothing_and_stops_nothing_else(
    dev_identity: DevIdentity, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pattern RE2 refuses can still come from the store (written around the API): it is loud, and alone."""
    with running(dev_identity, tmp_path / "deployment") as deployment:
        superuser = deployment.caller("pilot-superuser")
        for path in ("r/x", "s/x"):
            superuser.ok(SECRETS_PATH, {"path": path, "values": {"k": "v"}})
        superuser.put_policy("reader", workload_id("reader"), "^r/.*$", ["read"])
        superuser.put_policy("other", workload_id("other"), "^s/.*$", ["read"])
        reader, other = deployment.workload("reader"), deployment.workload("other")
        assert read(reader, "r/x") == read(other, "s/x") == 200
        # Written by the store directly, as a database edited by hand or an older spike could have it.
        sealer = deployment.secrets.sealer()
        import msgspec

        from spike.app.store.policies import _Sealed
        from spike.app.store.sealing import policy_aad

        body = msgspec.json.encode(_Sealed(workload_id("other"), "^s/(?=x)", ["read"], dialect=2))
        deployment.secrets.policy_put(
            "other", lambda pid: sealer.seal(body, policy_aad(pid, "other")), create_only=False, new_id=str
        ).result(10)
        deployment.authorizer.invalidate()
        caplog.set_level(logging.ERROR, logger="spike.nexus.policy")
        assert read(other, "s/x") == 401  # grants nothing ...
        assert read(reader, "r/x") == 200  # ... and the others stay in force
        assert any("policy other grants nothing" in r.getMessage() for r in caplog.records)
        assert superuser.ok(POLICY_PATH, {"id": "reader"}, action="delete") == {}
        assert read(reader, "r/x") == 401  # and a deletion is honoured at once


@pytest.mark.parametrize("reserved", ["spike/acl/policies", "spike/system/acl"])
def test_a_class_is_not_read_as_alternatives_granting_the_policy_routes(
    deployment: Deployment, superuser: Caller, reserved: str
) -> None:
    superuser.ok(SECRETS_PATH, {"path": "team-b/db", "values": {"password": "p"}})
    superuser.put_policy("sneaky", workload_id("sneaky"), f"app/x[]|{reserved}|]", ["super"])
    sneaky = deployment.workload("sneaky")
    assert sneaky.post(POLICY_PATH, {}, action="list").status == 401  # before the fix: 200
    everything = {"name": "mine", "spiffeidPattern": ".*", "pathPattern": ".*", "permissions": ["super"]}
    assert sneaky.post(POLICY_PATH, everything).status == 401  # before the fix: 200, then...
    assert read(sneaky, "team-b/db") == 401  # ... another team's secret
    assert sneaky.post(CIPHER_ENCRYPT_PATH, {"plaintext": "aGk="}).status == 401


def test_a_backtracking_pattern_costs_linear_time(deployment: Deployment, superuser: Caller) -> None:
    """ReDoS (M2): the pattern runs on RE2, whose matching is linear in the path whatever the pattern.

    No clock here (speed is a benchmark's business, docs/benchmarks.md): the proof is the engine
    itself, and the request and a superuser's call answered as usual.
    """
    import re2

    superuser.put_policy("bomb", workload_id("victim"), "app/b/([a-z0-9]+-?)*/config", ["read"])
    victim = deployment.workload("victim")
    assert read(victim, "app/b/" + "a" * 27) == 401  # before the fix: 6 s on the event loop, doubling per "a"
    compiled = deployment.authorizer.policies.compiled
    assert [c.name for c in compiled] == ["bomb"]
    assert isinstance(compiled[0].paths, re2._Regexp) and isinstance(compiled[0].ids, re2._Regexp)
    assert superuser.ok(SECRETS_PATH, {"path": "app/b/x/config", "values": {"k": "v"}})["version"] == 1
    assert read(victim, "app/b/x/config") == 200
