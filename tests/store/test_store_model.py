"""Versioning semantics against a plain in-memory model of Vault KV v2 (hypothesis stateful).

The machine drives a real storage backend (a `SecretStore` on a SQLite file,
and again a `PostgresBackend` on a real PostgreSQL server) and, step by step,
a dictionary model written from the KV v2 rules alone: versions count up from
1 per path; check-and-set (0 = only if absent, n = only if the current version
is n); a per-secret max_versions (0 = the store's default, here 3) after which
the oldest versions are pruned on the next write; soft delete and undelete;
destroy, which undelete cannot reverse; metadata written before the first
version; and deleting a secret with everything it has.  Every outcome (result
or error class) must match, and after every step the whole visible state does:
metadata, version flags, the current value of each path, and listings by prefix
read page by page.

Writes are also submitted in bursts without waiting, so several land in one
group commit: the model applies them one after the other in submission order,
which is what the single writer thread promises, and a failing write in a
burst must not undo the others.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from spike.app.model import kv
from tests.store.kv_machine import KvMachine
from tests.store.kv_model import Model, Outcome, WriteOp

KvMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_kv_semantics_match_the_model = KvMachine.TestCase


class PostgresKvMachine(KvMachine):
    """The same rules on PostgreSQL: a fresh schema per example on the test run's server."""

    backend = "postgres"


PostgresKvMachine.TestCase.settings = settings(
    max_examples=12,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_kv_semantics_match_the_model_on_postgres = PostgresKvMachine.TestCase


class MemoryKvMachine(KvMachine):
    """The same rules on the memory backend (SPIKE_NEXUS_BACKEND_STORE=memory): the same SqlStore, in memory."""

    backend = "memory"

    def teardown(self) -> None:
        assert not any(self.dir.iterdir()), "the memory backend wrote a file"
        super().teardown()


MemoryKvMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_kv_semantics_match_the_model_on_the_memory_backend = MemoryKvMachine.TestCase


@pytest.mark.parametrize(
    ("ops", "expected"),
    [
        # A version pruned by max_versions is gone for good; the next is still current + 1.
        ([("put", "a", ({"k": "1"}, None))] * 4, [("ok", 1), ("ok", 2), ("ok", 3), ("ok", 4)]),
        # cas 0 on a secret that has metadata but no version yet succeeds (Vault does the same).
        ([("tune", "a", (None, True, None)), ("put", "a", ({"k": "1"}, 0))], [("ok", None), ("ok", 1)]),
        # A secret that requires cas refuses a write without it.
        (
            [("tune", "a", (None, True, None)), ("put", "a", ({"k": "1"}, None))],
            [("ok", None), ("error", kv.CasRequired)],
        ),
    ],
)
def test_model_examples(ops: list[tuple[str, str, tuple[Any, ...]]], expected: list[Outcome]) -> None:
    """A few fixed stories, so that the model itself is pinned to KV v2 and not just to the store."""
    model = Model()
    assert [WriteOp(*op).apply(model) for op in ops] == expected
