"""100,000 secrets: get, put, list and metadata touch only their own rows.

No timing assertions: the store is filled once per module (one executemany
transaction of values sealed with the real sealer), then every statement an
operation runs is captured with SQLite's trace hook and its plan checked
with ``EXPLAIN QUERY PLAN``: a search of a primary key, never a scan of a
table.  Decryptions are counted: a get opens exactly one value, a put opens
none, a listing none.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from store_helpers import WAIT, CountingSealer, open_store, raw_db

from spike.app.model import kv
from spike.app.store.sealing import secret_aad
from spike.app.store.sqlite import SecretStore

N = 100_000
GROUPS = 100  # paths are team{g}/app{i}: a prefix holds about N / GROUPS secrets


def path_of(i: int) -> str:
    return f"team{i % GROUPS:03d}/app{i:06d}"


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SecretStore, CountingSealer, Path]]:
    data_dir = tmp_path_factory.mktemp("big")
    sealer = CountingSealer()
    store = open_store(data_dir, sealer=sealer)
    now = time.time()
    term = store.keyring().active
    secrets = [(path_of(i), 1, 1, 0, 0, now, now, None) for i in range(N)]
    versions = [
        (path_of(i), 1, sealer.seal(msgspec.json.encode({"n": str(i)}), secret_aad(path_of(i), 1)), now, None, 1, term)
        for i in range(N)
    ]
    with raw_db(data_dir) as db:
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO secret (path, current_version, oldest_version, max_versions, cas_required, created_at, "
            "updated_at, custom_metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            secrets,
        )
        db.executemany(
            "INSERT INTO secret_version (path, version, sealed, created_at, deleted_at, key_epoch, key_term) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            versions,
        )
        db.execute("COMMIT")
    try:
        yield store, sealer, data_dir
    finally:
        store.close()


class Traced:
    """Statements run on the store's connections while the block runs (expanded, parameters inlined)."""

    def __init__(self, store: SecretStore) -> None:
        self.connections = [store._reader, store._writer_db]
        self.statements: list[str] = []

    def __enter__(self) -> Traced:
        for db in self.connections:
            db.set_trace_callback(self.statements.append)
        return self

    def __exit__(self, *exc: object) -> None:
        for db in self.connections:
            db.set_trace_callback(None)

    def queries(self) -> list[str]:
        verbs = ("SELECT", "UPDATE", "DELETE", "INSERT")
        return [s for s in self.statements if s.lstrip().upper().startswith(verbs)]


def plans(data_dir: Path, statements: list[str]) -> list[tuple[str, list[str]]]:
    with raw_db(data_dir) as db:
        return [(s, [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {s}")]) for s in statements]


def assert_keyed(data_dir: Path, statements: list[str]) -> None:
    """Every statement uses a primary key search (or none at all), and no statement scans a table."""
    assert statements
    for statement, plan in plans(data_dir, statements):
        if statement.upper().startswith("INSERT") and "SELECT" not in statement.upper():
            continue
        assert plan, statement
        assert not [p for p in plan if p.startswith("SCAN")], (statement, plan)
        assert all("USING PRIMARY KEY" in p for p in plan if p.startswith("SEARCH")), (statement, plan)


def run(big: tuple[SecretStore, CountingSealer, Path], action: Callable[[SecretStore], Any]) -> tuple[Any, Traced, int]:
    store, sealer, _ = big
    opened = sealer.opened
    with Traced(store) as traced:
        result = action(store)
    return result, traced, sealer.opened - opened


def test_the_store_holds_them_all(big: tuple[SecretStore, CountingSealer, Path]) -> None:
    assert big[0].count() == N


def test_get_reads_one_row_and_decrypts_one_value(big: tuple[SecretStore, CountingSealer, Path]) -> None:
    i = 73_421
    result, traced, opened = run(big, lambda s: s.get(path_of(i), 0))
    assert result == (1, {"n": str(i)})
    assert opened == 1
    assert len(traced.queries()) == 1
    assert_keyed(big[2], traced.queries())


def test_get_of_a_missing_version_decrypts_nothing(big: tuple[SecretStore, CountingSealer, Path]) -> None:
    _, sealer, _ = big
    opened = sealer.opened
    with pytest.raises(kv.NotFound):
        big[0].get(path_of(5), 2)
    with pytest.raises(kv.NotFound):
        big[0].get("team005/absent", 0)
    assert sealer.opened == opened


def test_put_touches_only_its_secret(big: tuple[SecretStore, CountingSealer, Path]) -> None:
    store, sealer, data_dir = big
    sealed = sealer.sealed
    (version, traced, opened) = run(big, lambda s: s.put(path_of(99_999), {"n": "new"}, 1).result(WAIT))
    assert version == 2
    assert opened == 0 and sealer.sealed == sealed + 1
    assert_keyed(data_dir, traced.queries())
    assert store.get(path_of(99_999), 0) == (2, {"n": "new"})
    (version, traced, _) = run(big, lambda s: s.put("team000/brand-new", {"n": "x"}, 0).result(WAIT))
    assert version == 1
    assert_keyed(data_dir, traced.queries())
    assert store.count() == N + 1


def test_list_by_prefix_is_a_range_of_the_key(big: tuple[SecretStore, CountingSealer, Path]) -> None:
    store, _, data_dir = big
    expected = sorted(p for p in (path_of(i) for i in range(N)) if p.startswith("team042/"))
    keys, traced, opened = run(big, lambda s: s.list_paths("team042/", limit=50))
    assert keys == expected[:50]
    assert opened == 0
    assert_keyed(data_dir, traced.queries())
    # The next page starts after the last key, still a key range.
    keys, traced, _ = run(big, lambda s: s.list_paths("team042/", limit=50, after=expected[49]))
    assert keys == expected[50:100]
    assert_keyed(data_dir, traced.queries())
    assert store.list_paths("team042/", limit=N) == expected


def test_metadata_and_version_marks_touch_only_their_secret(big: tuple[SecretStore, CountingSealer, Path]) -> None:
    _, _, data_dir = big
    path = path_of(12_345)
    (meta, versions), traced, opened = run(big, lambda s: s.metadata(path))
    assert meta.current_version == 1 and [v.version for v in versions] == [1]
    assert opened == 0  # no custom metadata to open
    assert_keyed(data_dir, traced.queries())
    for action in ("delete", "undelete", "destroy"):
        _, traced, opened = run(big, lambda s, a=action: getattr(s, a)(path, [1]).result(WAIT))
        assert opened == 0
        assert_keyed(data_dir, traced.queries())
    _, traced, _ = run(big, lambda s: s.delete_all(path_of(12_346)).result(WAIT))
    assert_keyed(data_dir, traced.queries())


def test_the_plan_check_would_catch_a_scan(big: tuple[SecretStore, CountingSealer, Path]) -> None:
    """The checker itself: a lookup by value (no index) is a scan and fails it."""
    with pytest.raises(AssertionError):
        assert_keyed(big[2], ["SELECT path FROM secret WHERE updated_at = 1.0"])
    with pytest.raises(AssertionError):
        assert_keyed(big[2], ["SELECT path FROM secret_version WHERE version = 3"])
