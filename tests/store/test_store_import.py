"""`import_batch` (what `spike migrate from-spike` writes through) on SQLite and PostgreSQL (a real server).

One write: every secret with its version numbers and times, every policy, or nothing.  Refused whole when
the store holds data (without merge) or a path or policy name is on both sides (with merge).
"""

from __future__ import annotations

from typing import Any

import pytest

from spike.app.model import kv
from spike.app.model.policy import Permission
from spike.app.store.policies import PolicyStore
from tests.store.store_helpers import WAIT

T0 = 1_700_000_000.25


def batch() -> list[kv.ImportedSecret]:
    return [
        kv.ImportedSecret(
            "apps/db",
            (
                kv.ImportedVersion(1, {"password": "one"}, T0),
                kv.ImportedVersion(2, {"password": "two"}, T0 + 1, deleted_at=T0 + 5),
                kv.ImportedVersion(3, {"password": "three"}, T0 + 2),
            ),
            T0,
            T0 + 5,
            max_versions=10,
        ),
        kv.ImportedSecret("/tenants/acme", (kv.ImportedVersion(4, {"api key": "k"}, T0, deleted_at=T0 + 1),), T0, T0),
    ]


def policy_rows(store: PolicyStore) -> list[Any]:
    return [store.new_row("db readers", "^spiffe://x/y$", "^apps/db$", frozenset({Permission.READ}), T0, T0 + 3)]


def test_an_import_keeps_numbers_times_and_deletions(backend: Any) -> None:
    policies = PolicyStore(backend)
    backend.import_batch(batch(), policy_rows(policies), merge=False).result(WAIT)

    assert backend.get("apps/db", 0) == (3, {"password": "three"})
    assert backend.get("apps/db", 1) == (1, {"password": "one"})
    with pytest.raises(kv.NotFound):
        backend.get("apps/db", 2)  # soft-deleted, as in the source
    meta, versions = backend.metadata("apps/db")
    assert (meta.current_version, meta.oldest_version, meta.max_versions) == (3, 1, 10)
    assert (meta.created_at, meta.updated_at) == (T0, T0 + 5)
    assert [(v.version, v.created_at, v.deleted_at) for v in versions] == [
        (1, T0, None),
        (2, T0 + 1, T0 + 5),
        (3, T0 + 2, None),
    ]
    with pytest.raises(kv.NotFound):
        backend.get("/tenants/acme", 0)  # deleted whole
    backend.undelete("/tenants/acme", [4]).result(WAIT)
    assert backend.get("/tenants/acme", 0) == (4, {"api key": "k"})
    # The next write follows the newest version imported.
    assert backend.put("apps/db", {"password": "four"}, None).result(WAIT) == 4
    (policy,) = policies.load_all()
    assert (policy.name, policy.path_pattern, policy.created_at, policy.updated_at) == (
        "db readers",
        "^apps/db$",
        T0,
        T0 + 3,
    )


def test_an_import_into_a_store_with_data_is_refused_whole_without_merge(backend: Any) -> None:
    backend.put("mine", {"k": "v"}, None).result(WAIT)
    with pytest.raises(kv.ImportConflict, match="already holds 1 secret"):
        backend.import_batch(batch(), policy_rows(PolicyStore(backend)), merge=False).result(WAIT)
    assert backend.count() == 1
    assert backend.policy_rows() == []


def test_a_merge_adds_and_refuses_any_clash_whole(backend: Any) -> None:
    policies = PolicyStore(backend)
    backend.put("mine", {"k": "v"}, None).result(WAIT)
    backend.import_batch(batch(), policy_rows(policies), merge=True).result(WAIT)
    assert backend.list_paths("", limit=10) == ["/tenants/acme", "apps/db", "mine"]

    # The same batch again: every path and the policy clash; nothing more is written.
    again = [*batch(), kv.ImportedSecret("fresh", (kv.ImportedVersion(1, {"k": "v"}, T0),), T0, T0)]
    with pytest.raises(kv.ImportConflict, match="'apps/db'") as refused:
        backend.import_batch(again, policy_rows(policies), merge=True).result(WAIT)
    assert "db readers" in str(refused.value)
    assert "fresh" not in backend.list_paths("", limit=10)
    assert len(backend.policy_rows()) == 1
    assert backend.get("apps/db", 0) == (3, {"password": "three"})


def test_an_import_that_fails_in_the_database_leaves_nothing(backend: Any) -> None:
    """A failure after rows were written (here a duplicate version the store's key refuses) undoes them all."""
    broken = [
        kv.ImportedSecret("first", (kv.ImportedVersion(1, {"k": "v"}, T0),), T0, T0),
        kv.ImportedSecret(
            "dup", (kv.ImportedVersion(1, {"k": "v"}, T0), kv.ImportedVersion(1, {"k": "w"}, T0)), T0, T0
        ),
    ]
    with pytest.raises(Exception):  # noqa: B017 - each database words its own key violation
        backend.import_batch(broken, [], merge=False).result(WAIT)
    assert backend.count() == 0
    # The store goes on writing.
    backend.import_batch(batch(), [], merge=False).result(WAIT)
    assert backend.count() == 2
