"""Two corners of the semantics searched harder than the state machine can afford to.

Version marks: any sequence of delete/undelete/destroy on a secret with a few
versions leaves exactly the flags the model says (destroy is final: undelete
does not bring back a destroyed version, nor clear its deletion time).

Listing: for any set of paths drawn from every character a path may hold,
and any prefix, the paginated listing is exactly the sorted paths that start
with the prefix (SQLite's range bounds and Python's `startswith` agree).

Both reuse one store across examples, with a fresh namespace per example.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spike.app.model import kv
from tests.store.kv_model import Model, WriteOp, settle
from tests.store.store_helpers import WAIT, open_store

MARKS = st.lists(
    st.tuples(st.sampled_from(["delete", "undelete", "destroy"]), st.lists(st.integers(1, 4), max_size=2)),
    max_size=8,
)


def test_version_marks_match_the_model(tmp_path: Path) -> None:
    store = open_store(tmp_path / "data")
    store._writer_db.execute("PRAGMA synchronous=OFF")  # semantics only: no fsync needed
    names = itertools.count()

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(versions=st.integers(1, 3), marks=MARKS)
    def check(versions: int, marks: list[tuple[str, list[int]]]) -> None:
        path, model = f"marks/{next(names)}", Model()
        for n in range(versions):
            op = WriteOp("put", path, ({"n": str(n)}, None))
            assert settle(op.submit(store)) == op.apply(model)
        for action, numbers in marks:
            op = WriteOp(action, path, (numbers,))
            assert settle(op.submit(store)) == op.apply(model), (action, numbers)
        _, stored = store.metadata(path)
        flags = {v.version: (v.deleted_at is not None, v.destroyed) for v in stored}
        assert flags == {n: (v.deleted, v.destroyed) for n, v in model.secrets[path].versions.items()}, marks
        for n in range(versions + 1):
            try:
                got = "ok", store.get(path, n)
            except kv.NotFound:
                got = "error", kv.NotFound
            assert got == model.get(path, n)

    try:
        check()
    finally:
        store.close()


SEGMENT = st.text(alphabet="aZ09._@+=~-", min_size=1, max_size=3).filter(lambda s: s not in (".", ".."))
PATHS = st.lists(SEGMENT, min_size=1, max_size=3).map("/".join)


def test_listing_is_exactly_the_paths_with_the_prefix(tmp_path: Path) -> None:
    store = open_store(tmp_path / "data")
    store._writer_db.execute("PRAGMA synchronous=OFF")  # semantics only: no fsync needed
    names = itertools.count()

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(paths=st.sets(PATHS, max_size=12), prefix=st.one_of(PATHS, PATHS.map(lambda p: p + "/"), st.just("")))
    def check(paths: set[str], prefix: str) -> None:
        namespace = f"list{next(names)}/"
        futures = [store.put(namespace + p, {"k": "v"}, None) for p in paths]
        for future in futures:
            future.result(WAIT)
        wanted = namespace + prefix
        kv.check_prefix(wanted)
        listed: list[str] = []
        after = ""
        while True:
            page = store.list_paths(wanted, limit=3, after=after)
            listed += page
            if len(page) < 3:
                break
            after = page[-1]
        expected = sorted(namespace + p for p in paths if (namespace + p).startswith(wanted))
        assert listed == expected, (wanted, sorted(paths))

    try:
        check()
    finally:
        store.close()
