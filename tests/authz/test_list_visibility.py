"""`list` shows a caller only the paths it may list, and its cursor names none of the others (issue 14, M4).

Before the fix `next_after` was taken from the page before the permission filter: with ``limit: 1`` a
workload allowed to list only ``app/a/...`` read every other path name in the store from it.  Now the
cursor is the last path of a full page (one the caller sees) or an opaque token, and paging still
moves forward, with bounded work, across any number of paths the caller may not see.
"""

from __future__ import annotations

from concurrent.futures import wait
from typing import Any

from spike.app.api.messages import SECRETS_PATH
from tests.authz.deployment import Caller, Deployment

TD = r"spiffe://spike\.test"
VISIBLE = ["app/a/1", "app/a/2", "app/a/3"]
HIDDEN = ["app/b/payroll-db", "billing/stripe-key", "zeta/root-token", "app/a/1/hidden-child"]


def store(deployment: Deployment, paths: list[str]) -> None:
    futures = [deployment.secrets.put(p, {"k": "v"}, None) for p in paths]
    done, _ = wait(futures, timeout=120)
    assert len(done) == len(paths) and all(f.exception() is None for f in done)


def walk(caller: Caller, limit: int, prefix: str = "") -> tuple[list[str], list[Any], int]:
    """Every key and every cursor of a listing paged with `limit`, and the number of requests it took."""
    keys: list[str] = []
    cursors: list[Any] = []
    after, requests = "", 0
    while True:
        requests += 1
        assert requests < 1000, "the listing does not move forward"
        page = caller.ok(SECRETS_PATH, {"prefix": prefix, "limit": limit, "after": after}, action="list")
        keys += page["keys"]
        cursors.append(page.get("next_after"))
        after = page.get("next_after")
        if not after:
            return keys, cursors, requests


def test_the_cursor_never_names_a_path_the_caller_may_not_list(deployment: Deployment) -> None:
    superuser = deployment.caller("pilot-superuser")
    store(deployment, VISIBLE + HIDDEN)
    superuser.put_policy("lister", rf"^{TD}/workload/lister$", "^app/a/[0-9]+$", ["list"])
    lister = deployment.workload("lister")
    for limit in (1, 2, 10):
        keys, cursors, _ = walk(lister, limit)
        assert keys == VISIBLE, limit
        for cursor in cursors:
            assert cursor is None or cursor in VISIBLE or all(h not in cursor for h in HIDDEN), (limit, cursor)
            assert cursor not in HIDDEN, (limit, cursor)  # before the fix: every hidden name, one per page
    # The superuser sees every path, with plain paths as cursors.
    keys, cursors, _ = walk(superuser, 2)
    assert keys == sorted(VISIBLE + HIDDEN)
    assert all(c is None or c in keys for c in cursors)


def test_paging_moves_forward_across_many_paths_the_caller_may_not_see(deployment: Deployment) -> None:
    """More hidden paths between two visible ones than one request scans: a token carries the listing on."""
    superuser = deployment.caller("pilot-superuser")
    hidden = [f"app/a/1/n{i:05d}" for i in range(9000)]  # sorted between app/a/1 and app/a/2
    store(deployment, VISIBLE + hidden)
    superuser.put_policy("lister", rf"^{TD}/workload/lister$", "^app/a/[0-9]+$", ["list"])
    lister = deployment.workload("lister")
    keys, cursors, requests = walk(lister, 1)
    assert keys == VISIBLE
    assert 3 <= requests <= 8  # bounded work per request, and progress on every one
    tokens = [c for c in cursors if c and c not in VISIBLE]
    assert tokens, "a token stood for where a scan stopped"
    assert all(t.startswith("!") and "app/a/1/n" not in t for t in tokens)
    # A token is this caller's only: another caller (even one allowed to list) gets a 400, not a path.
    superuser.put_policy("other", rf"^{TD}/workload/other$", "^app/a/[0-9]+$", ["list"])
    other = deployment.workload("other")
    answer = other.post(SECRETS_PATH, {"prefix": "", "limit": 1, "after": tokens[0]}, action="list")
    assert (answer.status, answer.json()["err"]) == (400, "api_bad_request")
    forged = lister.post(SECRETS_PATH, {"prefix": "", "limit": 1, "after": "!" + "A" * 40}, action="list")
    assert forged.status == 400
