"""Policies end to end: what a narrow policy lets a workload do, when changes apply, SPIKE's matching (RE2,
unanchored, the reserved system paths of ADR-0033), validation, sealed storage and tampering, what an
authorisation check costs, and the `spike policy` command.

Each test gets its own in-process deployment (three keepers, Nexus, real mTLS);
the workloads are TLS clients with SVIDs minted for spiffe://spike.test/workload/<name>.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from spike.app import cli
from spike.app.api.messages import CIPHER_ENCRYPT_PATH, POLICY_PATH, SECRETS_METADATA_PATH, SECRETS_PATH
from spike.app.commands.devca import DevIdentity
from spike.app.model.policy import Permission, Policy
from spike.app.nexus.authorizer import Authorizer
from spike.app.store.keyring import Keyring
from spike.app.store.policies import PolicyStore
from spike.protocol.api import ApiRequest, ApiResponse
from spike.protocol.identity import SpiffeId, TrustDomains
from tests.authz.deployment import Caller, Deployment, running

S, M = SECRETS_PATH, SECRETS_METADATA_PATH
TD = r"spiffe://spike\.test"
TRUST = TrustDomains.single("spike.test")


def workload_id(name: str) -> str:
    """The anchored pattern of one workload's SPIFFE ID (unanchored, it would match longer IDs too)."""
    return rf"^{TD}/workload/{name}$"


def put(caller: Caller, path: str, **values: str) -> int:
    version: int = caller.ok(S, {"path": path, "values": values or {"k": "v"}})["version"]
    return version


def status_of(caller: Caller, path: str, action: str = "get", **body: Any) -> int:
    return caller.post(S, {"path": path, **body}, action=action).status


def policies_table(deployment: Deployment) -> list[tuple[Any, ...]]:
    with sqlite3.connect(deployment.db_path) as db:
        return db.execute("SELECT id, name, sealed, created_at, updated_at FROM policy ORDER BY name").fetchall()


@pytest.fixture
def superuser(deployment: Deployment) -> Caller:
    return deployment.caller("pilot-superuser")


# ---------------------------------------------------------------------- a narrow policy


def test_a_workload_with_a_narrow_policy_reads_only_its_paths(deployment: Deployment, superuser: Caller) -> None:
    for path in ("app/web/a", "app/web/b", "app/web/deep/c", "app/webx", "app/db", "myapp/web/x", "web"):
        put(superuser, path, k=f"value of {path}")
    superuser.put_policy("web", workload_id("web"), "^app/web/.*$", ["read", "list"])
    web = deployment.workload("web")

    for path in ("app/web/a", "app/web/b", "app/web/deep/c"):
        assert web.ok(S, {"path": path}, action="get")["data"] == {"k": f"value of {path}"}
        assert web.ok(M, {"path": path}, action="get")["metadata"]["currentVersion"] == 1
    for path in ("app/webx", "app/db", "myapp/web/x", "web", "app/web"):
        assert status_of(web, path) == 401, path
        assert web.post(M, {"path": path}, action="get").status == 401

    # Read and list only: no write of any kind, even on its own paths, and nothing changed.
    assert web.post(S, {"path": "app/web/a", "values": {"k": "mine now"}}).status == 401
    assert web.post(S, {"path": "app/web/new", "values": {"k": "v"}}).status == 401
    for action in ("delete", "undelete", "destroy"):
        assert status_of(web, "app/web/a", action, versions=[1]) == 401, action
    assert web.post(M, {"path": "app/web/a", "max_versions": 1}, action="put").status == 401
    assert web.post(M, {"path": "app/web/a"}, action="delete").status == 401
    assert superuser.ok(S, {"path": "app/web/a"}, action="get") == {"data": {"k": "value of app/web/a"}, "version": 1}
    assert superuser.post(S, {"path": "app/web/new"}, action="get").status == 404

    # Listing shows only its paths, whatever the prefix, and paging still reaches all of them.
    mine = ["app/web/a", "app/web/b", "app/web/deep/c"]
    assert web.ok(S, {"prefix": ""}, action="list")["keys"] == mine
    assert web.ok(S, {"prefix": "app/"}, action="list")["keys"] == mine
    assert web.ok(S, {"prefix": "myapp/"}, action="list")["keys"] == []
    seen, after = [], ""
    for _ in range(10):
        page = web.ok(S, {"prefix": "", "limit": 2, "after": after}, action="list")
        seen += page["keys"]
        after = page.get("next_after")
        if not after:
            break
    assert seen == mine

    # Nothing outside secrets: no cipher, no policies, no status.
    assert web.post(CIPHER_ENCRYPT_PATH, {"plaintext": "aGk="}).status == 401
    assert web.post(POLICY_PATH, {}, action="list").status == 401
    assert web.post("/v1/operator/status").status == 401


def test_write_without_read_and_list_without_read(deployment: Deployment, superuser: Caller) -> None:
    put(superuser, "drop/box", k="v")
    superuser.put_policy("dropbox", workload_id("writer"), "drop/.*", ["write"])
    superuser.put_policy("lister", workload_id("lister"), "drop/.*", ["list"])
    writer, lister = deployment.workload("writer"), deployment.workload("lister")
    assert put(writer, "drop/box", k="new") == 2
    assert status_of(writer, "drop/box") == 401
    assert writer.post(S, {"prefix": "drop/"}, action="list").status == 401  # no list permission at all
    assert lister.ok(S, {"prefix": ""}, action="list")["keys"] == ["drop/box"]
    assert status_of(lister, "drop/box") == 401


def test_super_on_a_pattern_grants_everything_there_only(deployment: Deployment, superuser: Caller) -> None:
    superuser.put_policy("team", workload_id("team"), "team/.*", ["super"])
    team = deployment.workload("team")
    assert put(team, "team/x") == 1
    assert team.ok(S, {"path": "team/x"}, action="get")["version"] == 1
    assert team.ok(M, {"path": "team/x"}, action="delete") == {}
    assert team.post(S, {"path": "other/x", "values": {"k": "v"}}).status == 401
    assert team.post(POLICY_PATH, {}, action="list").status == 401


def test_several_policies_add_up(deployment: Deployment, superuser: Caller) -> None:
    superuser.put_policy("a-read", workload_id("both"), "a/.*", ["read"])
    superuser.put_policy("b-write", workload_id("both"), "b/.*", ["write"])
    put(superuser, "a/1")
    both = deployment.workload("both")
    assert status_of(both, "a/1") == 200
    assert put(both, "b/1") == 1
    assert both.post(S, {"path": "a/2", "values": {"k": "v"}}).status == 401
    assert status_of(both, "b/1") == 401


def test_a_policy_for_one_workload_grants_nothing_to_another(deployment: Deployment, superuser: Caller) -> None:
    put(superuser, "app/web/a")
    superuser.put_policy("web", workload_id("web"), "app/web/.*", ["read"])
    assert status_of(deployment.workload("web"), "app/web/a") == 200
    assert status_of(deployment.workload("api"), "app/web/a") == 401
    # spike's own components never get data access through a policy, even one that names them.
    superuser.put_policy("components", rf"^{TD}/spike/.*$", ".*", ["super"])
    for role in ("nexus", "keeper-1", "bootstrap", "pilot-recover", "pilot-restore"):
        assert status_of(deployment.caller(role), "app/web/a") == 401, role


# ---------------------------------------------------------------------- changes apply at once


def test_policy_changes_apply_on_the_next_request(deployment: Deployment, superuser: Caller) -> None:
    put(superuser, "app/late/x")
    put(superuser, "app/other/x")
    late = deployment.workload("late")
    assert status_of(late, "app/late/x") == 401  # no policy yet (and the empty answer is now cached)

    created = superuser.put_policy("late", workload_id("late"), "^app/late/.*", ["read"], create_only=True)
    assert created["created"] is True
    assert status_of(late, "app/late/x") == 200

    replaced = superuser.put_policy("late", workload_id("late"), "^app/other/.*", ["read"])
    assert replaced == {"id": created["id"], "created": False}
    assert status_of(late, "app/late/x") == 401
    assert status_of(late, "app/other/x") == 200

    superuser.put_policy("late", workload_id("somebody-else"), "^app/other/.*", ["read"])
    assert status_of(late, "app/other/x") == 401

    superuser.put_policy("late", workload_id("late"), "^app/.*", ["read"])
    assert status_of(late, "app/late/x") == 200
    assert superuser.ok(POLICY_PATH, {"id": "late"}, action="delete") == {}
    assert status_of(late, "app/late/x") == 401
    assert status_of(late, "app/other/x") == 401


# ---------------------------------------------------------------------- SPIKE's matching


def test_patterns_match_anywhere_unless_anchored_as_in_spike(deployment: Deployment, superuser: Caller) -> None:
    """ADR-0025: Go's `MatchString`, a search: an unanchored pattern matches inside longer paths and IDs."""
    for path in ("app", "app/x", "myapp/x", "myapp", "apps", "other"):
        put(superuser, path)
    superuser.put_policy("loose", rf"{TD}/workload/loose", "app", ["read", "list"])
    longer = (deployment.workload("loose2"), deployment.caller(deployment.mint("/workload/loose/sub")))
    for n, caller in enumerate((deployment.workload("loose"), *longer)):
        for path in ("app", "app/x", "myapp/x", "myapp", "apps"):
            assert status_of(caller, path) == 200, (n, path)
        assert status_of(caller, "other") == 401
    assert deployment.workload("loose").ok(S, {}, action="list")["keys"] == ["app", "app/x", "apps", "myapp", "myapp/x"]

    superuser.put_policy("exact", f"^{TD}/workload/exact$", "^app$", ["read", "list"])
    exact = deployment.workload("exact")
    assert status_of(exact, "app") == 200
    for path in ("myapp/x", "myapp", "app/x", "apps"):
        assert status_of(exact, path) == 401, path
    assert exact.ok(S, {}, action="list")["keys"] == ["app"]
    for path in ("/workload/exact/sub", "/workload/exact2", "/x/workload/exact"):
        assert status_of(deployment.caller(deployment.mint(path)), "app") == 401, path


ADR_0033_TABLE = [  # ADR-0033's own table: does the pattern describe spike/system/acl?
    ("^spike/system/acl$", True),
    ("spike/system/acl", True),
    ("^spike/system/.*$", True),
    (".*", True),
    ("acl", False),
    ("system", False),
    ("spike", False),
]


@pytest.mark.parametrize(("pattern", "reaches"), ADR_0033_TABLE)
def test_a_reserved_path_is_reached_only_by_a_pattern_that_describes_it(pattern: str, reaches: bool) -> None:
    authorizer = Authorizer(TRUST)
    ids = r"^spiffe://spike\.test/workload/w$"
    authorizer.load([Policy("i", "p", ids, pattern, frozenset({Permission.SUPER}), 0, 0)])
    caller = SpiffeId("spike.test", "/workload/w")
    assert authorizer.allows(caller, Permission.WRITE, "spike/system/acl") is reaches


@pytest.mark.parametrize(
    ("ids", "precise"),
    [
        (r"^spiffe://spike\.test/workload/w$", True),
        (".*", True),  # a deliberate catch-all
        ("^.*$", True),
        (r"spiffe://spike\.test/workload/w", False),  # would admit .../workload/w-attacker too
        ("workload/w$", False),
    ],
)
def test_a_reserved_path_needs_a_precise_identity_pattern(ids: str, precise: bool) -> None:
    authorizer = Authorizer(TRUST)
    authorizer.load([Policy("i", "p", ids, "^spike/system/.*$", frozenset({Permission.SUPER}), 0, 0)])
    caller = SpiffeId("spike.test", "/workload/w")
    for path in ("spike/system/acl", "spike/system/secret", "spike/system/cipher/exec"):
        assert authorizer.allows(caller, Permission.EXECUTE, path) is precise, path


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("acl", "spike/system/acl only by substring"),
        ("system", "spike/system/acl only by substring"),
        ("exec", "spike/system/cipher/exec only by substring"),
        ("r/.*", "spike/system/cipher/exec only by substring"),
    ],
)
def test_a_policy_reaching_a_reserved_path_by_substring_is_refused_at_write(
    deployment: Deployment, superuser: Caller, pattern: str, why: str
) -> None:
    """SPIKE's `UpsertPolicy` guard: a 400 that says which reserved path and what to do; nothing stored."""
    body = {"name": "sub", "spiffeidPattern": workload_id("w"), "pathPattern": pattern, "permissions": ["read"]}
    answer = superuser.post(POLICY_PATH, body)
    assert answer.status == 400
    assert answer.json()["err"] == "api_bad_request"
    assert why in answer.json()["reason"] and "anchor both patterns" in answer.json()["reason"]
    assert policies_table(deployment) == []
    unanchored_id = {**body, "spiffeidPattern": rf"{TD}/workload/w", "pathPattern": "^spike/system/acl$"}
    assert superuser.post(POLICY_PATH, unanchored_id).status == 400  # describes it, but names IDs by substring


def test_the_system_paths_grant_what_spike_grants(deployment: Deployment, superuser: Caller) -> None:
    """spike/system/acl: read (get), write (put, delete), list; cipher/exec: execute; secret: list every path."""
    put(superuser, "team/a")
    put(superuser, "elsewhere/b")
    superuser.put_policy("acl-read", workload_id("auditor"), "^spike/system/acl$", ["read", "list"])
    superuser.put_policy("acl-write", workload_id("admin"), "^spike/system/acl$", ["write"])
    superuser.put_policy("cipher", workload_id("crypto"), "^spike/system/cipher/exec$", ["execute"])
    superuser.put_policy("lister", workload_id("lister"), "^spike/system/secret$", ["list"])
    auditor, admin = deployment.workload("auditor"), deployment.workload("admin")
    assert auditor.ok(POLICY_PATH, {"id": "cipher"}, action="get")["name"] == "cipher"
    assert len(auditor.ok(POLICY_PATH, {}, action="list")["policies"]) == 4
    assert auditor.post(POLICY_PATH, {"id": "cipher"}, action="delete").status == 401
    new = {"name": "n", "spiffeidPattern": workload_id("n"), "pathPattern": "^n/.*$", "permissions": ["read"]}
    assert auditor.post(POLICY_PATH, new).status == 401
    assert admin.ok(POLICY_PATH, new)["created"] is True
    assert admin.ok(POLICY_PATH, {"id": "n"}, action="delete") == {}
    assert admin.post(POLICY_PATH, {"id": "cipher"}, action="get").status == 401
    assert admin.post(POLICY_PATH, {}, action="list").status == 401
    crypto = deployment.workload("crypto")
    assert crypto.post(CIPHER_ENCRYPT_PATH, {"plaintext": "aGk="}).status == 200
    for caller in (auditor, admin, deployment.workload("lister")):
        assert caller.post(CIPHER_ENCRYPT_PATH, {"plaintext": "aGk="}).status == 401
    lister = deployment.workload("lister")
    assert lister.ok(S, {"prefix": ""}, action="list")["keys"] == ["elsewhere/b", "team/a"]
    assert status_of(lister, "team/a") == 401  # listing is not reading
    # Nobody stores a secret under spike/, not even the superuser: those paths are the system's.
    for path in ("spike/system/acl", "spike/x"):
        assert superuser.post(S, {"path": path, "values": {"k": "v"}}).status == 400


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ({"name": "bad-regex", "spiffeidPattern": ".*", "pathPattern": "app/(", "permissions": ["read"]}, "path"),
        ({"name": "bad-id-regex", "spiffeidPattern": "[", "pathPattern": "app/.*", "permissions": ["read"]}, "id"),
        ({"name": "unknown", "spiffeidPattern": ".*", "pathPattern": "app/.*", "permissions": ["admin"]}, "perm"),
        ({"name": "mixed", "spiffeidPattern": ".*", "pathPattern": "a", "permissions": ["read", "Write"]}, "perm"),
        ({"name": "none", "spiffeidPattern": ".*", "pathPattern": "app/.*", "permissions": []}, "empty"),
        ({"name": "bad name!", "spiffeidPattern": ".*", "pathPattern": "app/.*", "permissions": ["read"]}, "name"),
        ({"name": "", "spiffeidPattern": ".*", "pathPattern": "app/.*", "permissions": ["read"]}, "name"),
        ({"name": "n" * 251, "spiffeidPattern": ".*", "pathPattern": "app/.*", "permissions": ["read"]}, "name"),
        ({"name": "a/b", "spiffeidPattern": ".*", "pathPattern": "app/.*", "permissions": ["read"]}, "name"),
        ({"name": "empty-path", "spiffeidPattern": ".*", "pathPattern": "", "permissions": ["read"]}, "path"),
        ({"name": "long", "spiffeidPattern": ".*", "pathPattern": "a" * 1025, "permissions": ["read"]}, "path"),
        ({"name": "typed", "spiffeidPattern": ".*", "pathPattern": "a", "permissions": "read"}, "type"),
        ({"name": "missing", "spiffeidPattern": ".*", "permissions": ["read"]}, "missing"),
        # Syntax RE2 (and so SPIKE's Go regexp) lacks: refused at write, never stored to fail later.
        ({"name": "ahead", "spiffeidPattern": ".*", "pathPattern": "app/(?=x)", "permissions": ["read"]}, "re2"),
        ({"name": "behind", "spiffeidPattern": "(?<!x)a", "pathPattern": "app/", "permissions": ["read"]}, "re2"),
        ({"name": "backref", "spiffeidPattern": ".*", "pathPattern": r"(a)\1", "permissions": ["read"]}, "re2"),
        ({"name": "big-z", "spiffeidPattern": ".*", "pathPattern": r"^app/.*\Z", "permissions": ["read"]}, "re2"),
        ({"name": "repeat", "spiffeidPattern": ".*", "pathPattern": "a{1001}", "permissions": ["read"]}, "re2"),
    ],
)
def test_an_invalid_policy_is_a_400_and_nothing_is_stored(
    deployment: Deployment, superuser: Caller, body: dict[str, Any], why: str
) -> None:
    superuser.put_policy("keep", ".*", "keep/.*", ["read"])
    before = policies_table(deployment)
    answer = superuser.post(POLICY_PATH, body)
    assert answer.status == 400, why
    assert answer.json()["err"] == "api_bad_request", why
    assert set(answer.json()) <= {"err", "reason"}, why
    assert policies_table(deployment) == before
    assert [p["name"] for p in superuser.ok(POLICY_PATH, {}, action="list")["policies"]] == ["keep"]


def test_create_on_an_existing_name_is_a_409_and_changes_nothing(deployment: Deployment, superuser: Caller) -> None:
    first = superuser.put_policy("taken", workload_id("a"), "^a/.*", ["read"], create_only=True)
    before = policies_table(deployment)
    body = {
        "name": "taken",
        "spiffeidPattern": ".*",
        "pathPattern": "^b/",
        "permissions": ["super"],
        "createOnly": True,
    }
    answer = superuser.post(POLICY_PATH, body)
    assert (answer.status, answer.json()) == (409, {"err": "api_conflict", "reason": "a policy named taken exists"})
    assert policies_table(deployment) == before
    got = superuser.ok(POLICY_PATH, {"id": "taken"}, action="get")
    assert (got["id"], got["pathPattern"], got["permissions"]) == (first["id"], "^a/.*", ["read"])


def test_the_policy_api_shapes(deployment: Deployment, superuser: Caller) -> None:
    created = superuser.put_policy("shape", workload_id("x"), "x/.*", ["write", "read"])
    assert set(created) == {"id", "created"} and len(created["id"]) == 32
    by_name = superuser.ok(POLICY_PATH, {"id": "shape"}, action="get")
    by_id = superuser.ok(POLICY_PATH, {"id": created["id"]}, action="get")
    assert by_name == by_id
    assert by_name["name"] == "shape"
    assert (by_name["spiffeidPattern"], by_name["pathPattern"]) == (workload_id("x"), "x/.*")
    assert by_name["permissions"] == ["read", "write"]
    assert by_name["createdAt"].endswith("Z") and by_name["updatedAt"].endswith("Z")
    superuser.put_policy("other", ".*", "y/.*", ["list"])
    listed = superuser.ok(POLICY_PATH, {}, action="list")["policies"]
    assert [p["name"] for p in listed] == ["other", "shape"]
    assert all(set(p) == {"id", "name"} for p in listed)
    filtered = superuser.ok(POLICY_PATH, {"pathPattern": "y/.*"}, action="list")["policies"]
    assert [p["name"] for p in filtered] == ["other"]
    assert superuser.ok(POLICY_PATH, {"id": created["id"]}, action="delete") == {}
    for action in ("get", "delete"):
        answer = superuser.post(POLICY_PATH, {"id": "shape"}, action=action)
        assert (answer.status, answer.json()) == (404, {"err": "api_not_found", "reason": "no such policy"}), action


def test_a_name_that_looks_like_another_policys_id_refers_to_that_policy_only(
    deployment: Deployment, superuser: Caller
) -> None:
    """`id` in get/delete takes an id or a name; an id is never shadowed, and delete removes one policy."""
    first = superuser.put_policy("first", workload_id("one"), "one/.*", ["read"])
    superuser.put_policy(first["id"], workload_id("two"), "two/.*", ["read"])
    assert superuser.ok(POLICY_PATH, {"id": first["id"]}, action="get")["name"] == "first"
    assert superuser.ok(POLICY_PATH, {"id": first["id"]}, action="delete") == {}
    names = [p["name"] for p in superuser.ok(POLICY_PATH, {}, action="list")["policies"]]
    assert names == [first["id"]]


# ---------------------------------------------------------------------- stored sealed


DISTINCT_PATH = "very/distinctive-path-7Qx3/.*"
DISTINCT_ID = r"spiffe://spike\.test/workload/distinctive-id-9Zr4"


def database_bytes(deployment: Deployment) -> bytes:
    files = sorted(deployment.data_dir.glob("*"))
    assert any(f.name.endswith("-wal") for f in files) or files
    return b"".join(f.read_bytes() for f in files if f.is_file())


def test_policies_are_stored_sealed(deployment: Deployment, superuser: Caller) -> None:
    superuser.put_policy("sealed-one", DISTINCT_ID, DISTINCT_PATH, ["read"])
    superuser.put_policy("sealed-one", DISTINCT_ID, DISTINCT_PATH, ["read", "list"])  # and its replacement
    stored = database_bytes(deployment)
    assert b"sealed-one" in stored  # names are in clear (looked up, listed): the check below can find text
    for text in (DISTINCT_PATH, "distinctive-path-7Qx3", DISTINCT_ID, "distinctive-id-9Zr4"):
        assert text.encode() not in stored, text
        assert text.encode("utf-16-le") not in stored, text
    ((_, _, sealed, _, _),) = policies_table(deployment)
    # Format 2: sealed under a data-key term of the keyring (format byte, term, nonce, tag around the body).
    assert sealed[0] == 2 and len(sealed) > 1 + 4 + 12 + 16


def tamper(db_path: Path, sql: str, *args: Any) -> None:
    with sqlite3.connect(db_path) as db:
        assert db.execute(sql, args).rowcount == 1


def test_a_tampered_policy_is_refused_and_the_others_still_work(
    dev_identity: DevIdentity, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "deployment"
    with running(dev_identity, root) as deployment:
        superuser = deployment.caller("pilot-superuser")
        for name in ("alpha", "beta", "gamma"):
            superuser.put_policy(name, workload_id(name), f"{name}/.*", ["read"])
            put(superuser, f"{name}/x")
        for name in ("alpha", "beta", "gamma"):
            assert status_of(deployment.workload(name), f"{name}/x") == 200
        db_path = deployment.db_path
        # A flipped bit in alpha's sealed blob, and beta's blob moved into gamma's row: while Nexus runs...
        (alpha_blob,) = sqlite3.connect(db_path).execute("SELECT sealed FROM policy WHERE name = 'alpha'").fetchone()
        flipped = bytes([*alpha_blob[:-1], alpha_blob[-1] ^ 1])
        tamper(db_path, "UPDATE policy SET sealed = ? WHERE name = 'alpha'", flipped)
        (beta_blob,) = sqlite3.connect(db_path).execute("SELECT sealed FROM policy WHERE name = 'beta'").fetchone()
        tamper(db_path, "UPDATE policy SET sealed = ? WHERE name = 'gamma'", beta_blob)
        # ...noticed at the next reload (any policy change) ...
        superuser.put_policy("delta", workload_id("delta"), "delta/.*", ["read"])
        put(superuser, "delta/x")
        check_tampered(deployment, superuser)
    # ... and after a restart.
    with running(dev_identity, root) as restarted:
        superuser = restarted.caller("pilot-superuser")
        check_tampered(restarted, superuser)
        # The operator replaces the damaged policies: sealed afresh, in force at once.
        superuser.put_policy("alpha", workload_id("alpha"), "alpha/.*", ["read"])
        assert superuser.ok(POLICY_PATH, {"id": "gamma"}, action="delete") == {}
        assert status_of(restarted.workload("alpha"), "alpha/x") == 200
        assert superuser.ok(POLICY_PATH, {"id": "alpha"}, action="get")["pathPattern"] == "alpha/.*"
    refused = [r for r in caplog.records if "tampered" in r.getMessage() and r.levelname == "ERROR"]
    assert {name for name in ("alpha", "gamma") if any(f"policy {name}" in r.getMessage() for r in refused)} == {
        "alpha",
        "gamma",
    }


def check_tampered(deployment: Deployment, superuser: Caller) -> None:
    assert status_of(deployment.workload("alpha"), "alpha/x") == 401
    assert status_of(deployment.workload("gamma"), "gamma/x") == 401
    assert status_of(deployment.workload("gamma"), "beta/x") == 401  # the moved blob grants nothing either
    assert status_of(deployment.workload("beta"), "beta/x") == 200
    assert status_of(deployment.workload("delta"), "delta/x") == 200
    for name in ("alpha", "gamma"):
        answer = superuser.post(POLICY_PATH, {"id": name}, action="get")
        assert (answer.status, answer.json()) == (500, {"err": "api_internal_error"}), name
    # The operator still sees every name, and can delete (and then re-create) the damaged ones.
    listed = [p["name"] for p in superuser.ok(POLICY_PATH, {}, action="list")["policies"]]
    assert listed == ["alpha", "beta", "delta", "gamma"]


def test_a_failed_reload_grants_nothing_until_one_succeeds(
    dev_identity: DevIdentity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the policies cannot be read, the ones read before must not stay in force (fail closed)."""
    failing = [False]
    real_load_all = PolicyStore.load_all

    def load_all(self: PolicyStore) -> Any:
        if failing[0]:
            raise sqlite3.OperationalError("disk I/O error")
        return real_load_all(self)

    monkeypatch.setattr(PolicyStore, "load_all", load_all)
    with running(dev_identity, tmp_path / "deployment") as deployment:
        superuser = deployment.caller("pilot-superuser")
        superuser.put_policy("reader", workload_id("reader"), "^r/.*", ["read"])
        put(superuser, "r/x")
        reader = deployment.workload("reader")
        assert status_of(reader, "r/x") == 200
        failing[0] = True
        superuser.ok(POLICY_PATH, {"id": "reader"}, action="delete")  # the reload after this fails
        assert status_of(reader, "r/x") == 500
        assert status_of(reader, "r/x") == 500  # still not the old grant
        failing[0] = False
        assert status_of(reader, "r/x") == 401  # the reload now succeeds: the policy is gone


# ---------------------------------------------------------------------- cost of a check


@dataclass
class Counts:
    loads: int = 0
    opens: int = 0
    statements: int = 0

    def snapshot(self) -> tuple[int, int, int]:
        return self.loads, self.opens, self.statements


@pytest.fixture
def counted(
    dev_identity: DevIdentity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Deployment, Counts]]:
    """A deployment whose policy loads, decryptions and SQL statements on the read connection are counted."""
    counts = Counts()
    real_load_all, real_open = PolicyStore.load_all, Keyring.open

    def load_all(self: PolicyStore) -> Any:
        counts.loads += 1
        return real_load_all(self)

    def open_(self: Keyring, blob: bytes, aad: bytes, label: int | None = None) -> bytes:
        counts.opens += 1
        return real_open(self, blob, aad, label)

    monkeypatch.setattr(PolicyStore, "load_all", load_all)
    monkeypatch.setattr(Keyring, "open", open_)
    with running(dev_identity, tmp_path / "deployment") as deployment:

        def trace(statement: str) -> None:
            counts.statements += 1

        deployment.on_loop(lambda: deployment.secrets.reader.set_trace_callback(trace))
        yield deployment, counts


POLICY_COUNT = 20


def checks(deployment: Deployment, rounds: int) -> list[int]:
    """`rounds` x (two requests through the route table, one `allows`), on the loop thread; the statuses."""
    peers = [deployment.spiffe_id(f"/workload/w{i}") for i in range(3)]

    def run() -> list[int]:
        statuses = []
        for n in range(rounds):
            peer = peers[n % 3]
            # Through the route table: a read of a path no policy grants (the secret is never looked up),
            # and a list, which no policy grants (refused by the route's guard).
            for body, action in ((b'{"path":"denied/x"}', "get"), (b'{"prefix":""}', "list")):
                reply = deployment.api(ApiRequest("POST", S, peer, body, f"action={action}", "application/json"))
                assert isinstance(reply, ApiResponse)  # answered at once: nothing was queued
                statuses.append(reply.status)
            assert deployment.authorizer.allows(peer, Permission.READ, f"team-{n % POLICY_COUNT}/x") == (
                (n % POLICY_COUNT) % 3 == n % 3
            )
        return statuses

    result: list[int] = deployment.on_loop(run)
    return result


def store_secrets(deployment: Deployment, count: int, prefix: str) -> None:
    futures = [deployment.secrets.put(f"{prefix}/{i:05d}", {"k": "v"}, None) for i in range(count)]
    done, _ = wait(futures, timeout=60)
    assert all(f.exception() is None for f in done) and len(done) == count


def test_a_check_reads_nothing_and_decrypts_nothing(counted: tuple[Deployment, Counts]) -> None:
    deployment, counts = counted
    superuser = deployment.caller("pilot-superuser")
    for i in range(POLICY_COUNT):
        superuser.put_policy(f"team-{i}", workload_id(f"w{i % 3}"), f"team-{i}/.*", ["read"])

    def cost_of_checks() -> tuple[int, int, int]:
        checks(deployment, 1)  # warm-up: the reload after the last change
        before = counts.snapshot()
        statuses = checks(deployment, 1000)
        assert set(statuses) == {401}
        return tuple(after - start for after, start in zip(counts.snapshot(), before, strict=True))  # type: ignore[return-value]

    store_secrets(deployment, 10, "few")
    assert cost_of_checks() == (0, 0, 0)  # 3000 decisions: no policy load, no decryption, no SQL at all
    assert (counts.loads, counts.opens) == (1, POLICY_COUNT)  # 20 changes, then one load at the first check

    def reload_cost() -> tuple[int, int]:
        deployment.authorizer.invalidate()
        start = counts.snapshot()
        checks(deployment, 1)
        return counts.loads - start[0], counts.opens - start[1]

    with_few = reload_cost()
    store_secrets(deployment, 9_990, "many")
    assert deployment.on_loop(deployment.secrets.count) == 10_000
    with_many = reload_cost()
    assert with_few == with_many == (1, POLICY_COUNT)  # one load, one decryption per policy: never per secret
    assert cost_of_checks() == (0, 0, 0)


def test_the_list_route_costs_one_scan_not_one_read_per_secret(counted: tuple[Deployment, Counts]) -> None:
    deployment, counts = counted
    superuser = deployment.caller("pilot-superuser")
    superuser.put_policy("lister", workload_id("lister"), "bulk/0.*", ["list"])
    store_secrets(deployment, 2000, "bulk")
    lister = deployment.workload("lister")
    lister.ok(S, {"prefix": "bulk/"}, action="list")  # warm-up
    before = counts.snapshot()
    keys = lister.ok(S, {"prefix": "bulk/", "limit": 10_000}, action="list")["keys"]
    assert keys == [f"bulk/{i:05d}" for i in range(2000)]  # bulk/00000 .. bulk/01999 all start with 0
    assert (counts.loads - before[0], counts.opens - before[1], counts.statements - before[2]) == (0, 0, 1)


# ---------------------------------------------------------------------- spike policy


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def spike_policy(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., Run]:
    """`spike policy ...` in this process (the real `main`), against the deployment."""
    monkeypatch.setattr("spike.app.logs.setup", lambda *args, **kwargs: None)  # keep pytest's log capture
    for name in ("SPIKE_CONFIG", "SPIFFE_ENDPOINT_SOCKET", "SPIKE_IDENTITY"):
        monkeypatch.delenv(name, raising=False)

    def run(*args: str, identity: str = "pilot-superuser") -> Run:
        files = deployment.identity.files(identity)
        monkeypatch.setenv("SPIKE_NEXUS_API_URL", deployment.url)
        monkeypatch.setenv("SPIKE_SVID_CERT", str(files.cert))
        monkeypatch.setenv("SPIKE_SVID_KEY", str(files.key))
        monkeypatch.setenv("SPIKE_SVID_BUNDLE", str(files.bundle))
        monkeypatch.setenv("SPIKE_TRUST_ROOT", deployment.identity.trust_domain)
        capsys.readouterr()
        code = cli.main(["policy", *args])
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return run


def one_line_error(run: Run, code: int, *fragments: str) -> None:
    assert run.code == code, run
    assert run.out == "", run
    lines = run.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("spike policy: "), run
    for fragment in fragments:
        assert fragment in lines[0], (fragment, run)


def test_cli_create_get_list_delete(spike_policy: Callable[..., Run], deployment: Deployment) -> None:
    created = spike_policy(
        "create", "--name", "web", "--spiffeid-pattern", workload_id("web"),
        "--path-pattern", "app/web/.*", "--permissions", "read, list",
    )  # fmt: skip
    assert created.code == 0, created
    assert created.out.startswith("created policy web (")
    # SPIKE's matching finds an unanchored pattern anywhere in the path: said, and the policy is created anyway.
    assert created.err == (
        "spike policy: warning: policy 'web': the path pattern 'app/web/.*' is not anchored: it matches any path "
        "that contains a match anywhere (write ^...$ to match the whole path)\n"
    )
    again = spike_policy(
        "create", "--name", "web", "--spiffeid-pattern", ".*", "--path-pattern", ".*", "--permissions", "super"
    )
    one_line_error(again, 1, "a policy named web already exists")

    shown = spike_policy("get", "web")
    assert shown.code == 0, shown
    assert shown.out.splitlines()[1:4] == [
        f"  SPIFFE IDs: {workload_id('web')}",
        "  paths:      app/web/.*",
        "  grants:     list, read",
    ]
    as_json = spike_policy("get", "web", "--format", "json").json()
    assert (as_json["name"], as_json["pathPattern"], as_json["permissions"]) == ("web", "app/web/.*", ["list", "read"])
    by_id = spike_policy("get", as_json["id"], "--format", "json").json()
    assert by_id == as_json

    listed = spike_policy("list")
    assert (listed.code, listed.out) == (0, f"web  {as_json['id']}\n")
    assert spike_policy("list", "--format", "json").json() == {"policies": [{"id": as_json["id"], "name": "web"}]}

    # The policy is in force for the workload at once.
    put(deployment.caller("pilot-superuser"), "app/web/a")
    assert status_of(deployment.workload("web"), "app/web/a") == 200

    deleted = spike_policy("delete", "web")
    assert (deleted.code, deleted.out) == (0, "deleted policy web\n")
    assert status_of(deployment.workload("web"), "app/web/a") == 401
    one_line_error(spike_policy("delete", "web"), 1, "no such policy")
    one_line_error(spike_policy("get", "web"), 1, "no such policy")
    assert spike_policy("list").out == ""


def test_cli_apply_yaml_and_json_in_both_spellings(
    spike_policy: Callable[..., Run], deployment: Deployment, tmp_path: Path
) -> None:
    yaml_file = tmp_path / "policies.yaml"
    yaml_file.write_text(
        f"""
- name: web
  spiffeidPattern: '{workload_id("web")}'
  pathPattern: 'app/web/.*'
  permissions: [read, list]
- name: ops
  spiffe_id_pattern: '{workload_id("ops")}'
  path_pattern: 'ops/.*'
  permissions: read,write
"""
    )
    applied = spike_policy("apply", "--file", str(yaml_file))
    assert applied.code == 0, applied
    assert [line.split(" (")[0] for line in applied.out.splitlines()] == ["created policy web", "created policy ops"]

    json_file = tmp_path / "web.json"
    json_file.write_text(
        json.dumps({"name": "web", "spiffe_id_pattern": workload_id("web"), "path_pattern": "app/.*",
                    "permissions": ["read"]})
    )  # fmt: skip
    replaced = spike_policy("apply", "--file", str(json_file), "--format", "json")
    assert replaced.code == 0, replaced
    assert replaced.json()["created"] is False and replaced.json()["name"] == "web"
    web = spike_policy("get", "web", "--format", "json").json()
    assert (web["pathPattern"], web["permissions"]) == ("app/.*", ["read"])
    ops = spike_policy("get", "ops", "--format", "json").json()
    assert (ops["spiffeidPattern"], ops["permissions"]) == (workload_id("ops"), ["read", "write"])
    # Applied policies are in force at once.
    superuser = deployment.caller("pilot-superuser")
    put(superuser, "app/db")
    assert status_of(deployment.workload("web"), "app/db") == 200
    assert put(deployment.workload("ops"), "ops/x") == 1


def test_cli_errors_are_one_line_and_apply_nothing(
    spike_policy: Callable[..., Run], deployment: Deployment, tmp_path: Path
) -> None:
    def apply(name: str, text: str) -> Run:
        path = tmp_path / name
        path.write_text(text)
        return spike_policy("apply", "--file", str(path))

    good = "- {name: fine, spiffeidPattern: 'x', pathPattern: 'a/.*', permissions: [read]}\n"
    bad_ones = [
        ("regex.yaml", "{name: bad, spiffeidPattern: x, pathPattern: 'a/(', permissions: [read]}",
         ["policy 'bad'", "not an RE2 regular expression"]),
        ("perm.yaml", "{name: bad, spiffeidPattern: x, pathPattern: a, permissions: [root]}",
         ["unknown permission 'root'"]),
        ("name.yaml", "{name: 'b/d', spiffeidPattern: x, pathPattern: a, permissions: [read]}", ["policy names are"]),
        ("field.yaml", "{name: nopath, spiffeidPattern: x, permissions: [read]}",
         ["policy 'nopath' has no pathPattern"]),
        ("types.yaml", "{name: n, spiffeidPattern: x, pathPattern: a, permissions: {read: 1}}",
         ["permissions must be a list"]),
    ]  # fmt: skip
    for file_name, policy, fragments in bad_ones:
        one_line_error(apply(file_name, f"{good}- {policy}\n"), 2, *fragments)
    one_line_error(apply("broken.yaml", "- [unclosed"), 2, "is not valid YAML")
    one_line_error(apply("broken.json", '{"name": '), 2, "is not valid JSON")
    one_line_error(apply("scalar.yaml", "just text"), 2, "must hold a policy mapping")
    one_line_error(apply("empty.yaml", "[]"), 2, "must hold a policy mapping")
    one_line_error(spike_policy("apply", "--file", str(tmp_path / "missing.yaml")), 2, "cannot read")
    bad_regex = ["--name", "x", "--spiffeid-pattern", "(", "--path-pattern", "a", "--permissions", "read"]
    one_line_error(spike_policy("create", *bad_regex), 2, "not an RE2 regular expression")
    # A file with one bad policy applies none of them.
    assert spike_policy("list").out == ""
    assert policies_table(deployment) == []
    # An identity without the right is refused in one sentence.
    one_line_error(spike_policy("list", identity="pilot-recover"), 1, "Nexus refused this identity")
