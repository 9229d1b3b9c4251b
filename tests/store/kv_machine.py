"""The hypothesis machine that drives a real store beside the KV v2 model (tests/store/kv_model.py).

test_store_model.py runs it on SQLite and PostgreSQL; test_data_keys_model.py extends it with
data-key and root key rotations.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from spike.app.model import kv
from tests.store.kv_model import DEFAULT_MAX, Model, Outcome, WriteOp, settle
from tests.store.store_helpers import open_backend, open_store

# "a~": '~' sorts after every other character a path may hold, so a prefix range must include it.
PATHS = ["a", "a/b", "a/b/c", "a~", "ab", "b/x"]
PREFIXES = ["", "a", "a/", "a/b", "a/b/", "a~", "b/", "c"]


paths = st.sampled_from(PATHS)
values = st.dictionaries(
    st.sampled_from(["k", "user", "pw"]), st.text(alphabet="xyz€ ", max_size=4), min_size=1, max_size=2
)
cas_values = st.one_of(st.none(), st.integers(0, 6))
version_lists = st.lists(st.integers(1, 6), max_size=2)  # empty: the current version
marks = st.sampled_from(["delete", "undelete", "destroy"])
max_versions = st.one_of(st.none(), st.integers(0, 4))
cas_required = st.one_of(st.none(), st.booleans())
customs = st.one_of(
    st.none(), st.dictionaries(st.sampled_from(["owner", "team"]), st.text("ab", max_size=3), max_size=2)
)
write_ops = st.one_of(
    st.builds(lambda p, v, c: WriteOp("put", p, (v, c)), paths, values, cas_values),
    st.builds(lambda k, p, v: WriteOp(k, p, (v,)), marks, paths, version_lists),
    st.builds(lambda p, m, c, d: WriteOp("tune", p, (m, c, d)), paths, max_versions, cas_required, customs),
    st.builds(lambda p: WriteOp("purge", p, ()), paths),
)


class KvMachine(RuleBasedStateMachine):
    backend = "sqlite"

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="spike-kv-"))
        if self.backend == "sqlite":
            self.store: Any = open_store(self.dir, default_max_versions=DEFAULT_MAX)
            # Semantics only: durability is the crash test's.  Without an fsync per commit a failing
            # run shrinks to its smallest example several times faster.
            self.store._writer_db.execute("PRAGMA synchronous=OFF")
        else:
            self.store = open_backend(self.backend, self.dir, default_max_versions=DEFAULT_MAX)
        self.model = Model()

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def write(self, op: WriteOp) -> None:
        assert settle(op.submit(self.store)) == op.apply(self.model), op

    # One rule per kind of write (cheaper to generate than one rule over all of them), and
    # puts twice: most interesting states need several versions.
    @rule(path=paths, values=values, cas=cas_values)
    def put(self, path: str, values: dict[str, str], cas: int | None) -> None:
        self.write(WriteOp("put", path, (values, cas)))

    @rule(path=paths, values=values)
    def put_again(self, path: str, values: dict[str, str]) -> None:
        self.write(WriteOp("put", path, (values, None)))

    @rule(action=marks, path=paths, versions=version_lists)
    def mark(self, action: str, path: str, versions: list[int]) -> None:
        self.write(WriteOp(action, path, (versions,)))

    @rule(path=paths, max_versions=max_versions, cas_required=cas_required, custom=customs)
    def tune(
        self, path: str, max_versions: int | None, cas_required: bool | None, custom: dict[str, str] | None
    ) -> None:
        self.write(WriteOp("tune", path, (max_versions, cas_required, custom)))

    @rule(path=paths)
    def purge(self, path: str) -> None:
        self.write(WriteOp("purge", path, ()))

    @rule(ops=st.lists(write_ops, min_size=2, max_size=6))
    def burst(self, ops: list[WriteOp]) -> None:
        """Submitted back to back, resolved afterwards: they share group commits."""
        futures = [op.submit(self.store) for op in ops]
        for op, future in zip(ops, futures, strict=True):
            assert settle(future) == op.apply(self.model), (op, ops)

    @rule(path=paths, version=st.integers(0, 8))
    def get(self, path: str, version: int) -> None:
        assert self.read(path, version) == self.model.get(path, version)

    def read(self, path: str, version: int) -> Outcome:
        try:
            return "ok", self.store.get(path, version)
        except kv.KvError as exc:
            return "error", type(exc)

    @invariant()
    def visible_state_matches(self) -> None:
        for path in PATHS:
            expected = self.model.secrets.get(path)
            try:
                meta, versions = self.store.metadata(path)
            except kv.NotFound:
                assert expected is None, path
                continue
            assert expected is not None, path
            assert (meta.current_version, meta.oldest_version) == (expected.current, expected.oldest), path
            assert (meta.max_versions, meta.cas_required) == (expected.max_versions, expected.cas_required), path
            assert meta.custom_metadata == expected.custom, path
            flags = {v.version: (v.deleted_at is not None, v.destroyed) for v in versions}
            assert flags == {n: (v.deleted, v.destroyed) for n, v in expected.versions.items()}, path
            assert self.read(path, 0) == self.model.get(path, 0), path

    @invariant()
    def listing_matches(self) -> None:
        for prefix in PREFIXES:
            listed: list[str] = []
            after = ""
            while True:
                page = self.store.list_paths(prefix, limit=2, after=after)
                listed += page
                if len(page) < 2:
                    break
                after = page[-1]
            assert listed == sorted(p for p in self.model.secrets if p.startswith(prefix)), prefix
