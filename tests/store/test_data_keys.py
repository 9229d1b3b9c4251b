"""Data-key rotation and the re-wrap of stored values, on SQLite and PostgreSQL (spike/app/store/data_keys.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from spike.app.model import kv
from spike.app.model.policy import Permission
from spike.app.store.data_keys import RewrapCursor
from spike.app.store.errors import RotationUnderWay
from spike.app.store.policies import PolicyStore
from spike.protocol.pending import PendingRotation
from spike.protocol.record import seal_key
from tests.store.store_helpers import BACKENDS, EPOCH, OTHER_KEY, RECORD, ROOT_KEY, WAIT, open_backend, second_instance


def labels(backend: Any) -> dict[str, int]:
    """Every stored value's data-key term, by what it is (a destroyed version holds no value)."""

    def read(conn: Any) -> dict[str, int]:
        versions = conn.execute("SELECT path, version, key_term FROM secret_version WHERE sealed IS NOT NULL")
        found = {f"{p}@{v}": t for p, v, t in versions}
        found |= {
            f"{p}#custom": t
            for p, t in conn.execute("SELECT path, custom_term FROM secret WHERE custom_metadata IS NOT NULL")
        }
        found |= {f"policy {n}": t for n, t in conn.execute("SELECT name, key_term FROM policy")}
        return found

    return backend._read(read, "labels")  # type: ignore[no-any-return]


def fill(backend: Any, secrets: int = 12) -> None:
    futures = [backend.put(f"app/{i:03d}", {"v": f"{i}-1"}, None) for i in range(secrets)]
    futures += [backend.put(f"app/{i:03d}", {"v": f"{i}-2"}, None) for i in range(secrets)]
    futures += [
        backend.update_metadata(f"app/{i:03d}", max_versions=None, cas_required=None, custom_metadata={"i": str(i)})
        for i in range(0, secrets, 3)
    ]
    for future in futures:
        future.result(WAIT)
    policies = PolicyStore(backend)
    for name in ("p1", "p2"):
        policies.put(name, "spiffe://x/.*", "app/.*", frozenset({Permission.READ}), create_only=True).result(WAIT)


def all_read(backend: Any, secrets: int = 12) -> None:
    for i in range(secrets):
        assert backend.get(f"app/{i:03d}", 1) == (1, {"v": f"{i}-1"})
        assert backend.get(f"app/{i:03d}", 0) == (2, {"v": f"{i}-2"})
    for i in range(0, secrets, 3):
        assert backend.metadata(f"app/{i:03d}")[0].custom_metadata == {"i": str(i)}
    assert [p.name for p in PolicyStore(backend).load_all()] == ["p1", "p2"]


def wait_for(condition: Any) -> None:
    """Until `condition()` holds (a background re-wrap at work), at most WAIT seconds: a hang, not a timing."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "the re-wrap did not finish"
        time.sleep(0.01)


def test_a_data_key_rotation_seals_new_values_under_a_new_term_and_old_ones_stay_readable(backend: Any) -> None:
    fill(backend)
    first = backend.keyring().active
    assert backend.rotate_data_key() == first + 1
    assert backend.cluster_state().data_term == first + 1
    backend.put("app/new", {"v": "n"}, None).result(WAIT)
    assert labels(backend)["app/new@1"] == first + 1
    assert set(labels(backend).values()) == {first, first + 1}
    all_read(backend)
    counts = backend.values_by_term(fresh=True)
    assert counts == {first: 12 * 2 + 4 + 2, first + 1: 1}
    status = backend.keyring_status()
    assert (status.active_term, [t for t, _ in status.terms], status.rewrap_target) == (first + 1, [1, 2], None)
    assert status.rewrap_remaining == 0


def test_no_data_key_rotation_while_a_root_key_rotation_is_stored(backend: Any) -> None:
    """Its keyring is wrapped under the new root key already: a term added now would be lost at its commit."""
    new, _ = seal_key(OTHER_KEY, epoch=2, threshold=2, keeper_ids=[1, 2, 3])
    pending = PendingRotation.seal(ROOT_KEY, RECORD, OTHER_KEY, new)
    assert backend.persist_rotation(pending, backend.keyring().wrap(OTHER_KEY, 2))
    term = backend.keyring().active
    with pytest.raises(RotationUnderWay, match="root key rotation is under way"):
        backend.rotate_data_key()
    assert backend.keyring().active == term and backend.cluster_state().data_term == term
    assert backend.commit_rotation(pending)
    backend.unlock(OTHER_KEY, 2)
    assert backend.rotate_data_key() == term + 1
    # And a rotation persisted with a keyring wrapped before a data-key rotation is refused.
    newer, _ = seal_key(ROOT_KEY, epoch=3, threshold=2, keeper_ids=[1, 2, 3])
    late = PendingRotation.seal(OTHER_KEY, pending.record, ROOT_KEY, newer)
    stale = backend.keyring().wrap(ROOT_KEY, 3)
    backend.rotate_data_key()
    assert backend.persist_rotation(late, stale) is False
    assert backend.persist_rotation(late, backend.keyring().wrap(ROOT_KEY, 3)) is True


def test_an_instance_whose_record_was_replaced_still_reads_the_cluster_state(backend: Any, tmp_path: Path) -> None:
    """bootstrap --force through another instance: the new keyring's term is above every term this instance
    knows, and opening it with the old key failed ('the stored key record is of epoch 2, not 1'), so its
    ClusterWatch never saw the new record and it kept the old key for good (tests/e2e/test_postgres_multi)."""
    other = second_instance(backend, tmp_path)
    try:
        replaced, _ = seal_key(OTHER_KEY, epoch=EPOCH + 1, threshold=2, keeper_ids=[1, 2, 3])
        assert backend.install_key_record(replaced, replace=RECORD) == replaced
        backend.unlock(OTHER_KEY, EPOCH + 1)  # the new keyring, with a term above the old one's
        assert backend.cluster_state().data_term > other.keyring().active
        state = other.cluster_state()
        assert state.record == replaced
    finally:
        other.close()


def test_another_instance_takes_up_a_new_term_without_a_restart(backend: Any, tmp_path: Path) -> None:
    other = second_instance(backend, tmp_path)
    try:
        old = other.keyring().active
        backend.put("mine", {"k": "before"}, None).result(WAIT)
        new = backend.rotate_data_key()
        backend.put("theirs", {"k": "after"}, None).result(WAIT)
        # A value under the new term: the other instance reads the stored keyring again to open it.
        assert other.get("theirs", 0) == (1, {"k": "after"})
        assert other.keyring().active == new
        # Its next look at the store (ClusterWatch, every second) is enough too.
        newest = backend.rotate_data_key()
        assert other.keyring().active == new
        assert other.cluster_state().data_term == newest
        assert other.keyring().active == newest > old
        other.put("by-other", {"k": "v"}, None).result(WAIT)
        assert labels(backend)["by-other@1"] == newest
        assert backend.get("by-other", 0) == (1, {"k": "v"})
    finally:
        other.close()


def test_a_rewrap_moves_every_stored_value_to_the_newest_term_page_by_page(backend: Any) -> None:
    fill(backend)
    term = backend.rotate_data_key()
    before = labels(backend)
    cursor: RewrapCursor | None = RewrapCursor()
    batches, done = 0, 0
    while cursor is not None:
        batch = backend.rewrap_batch(term, cursor, limit=5)
        assert batch.changed == batch.unreadable == 0
        done, cursor, batches = done + batch.rewrapped, batch.next, batches + 1
    assert done == len(before) == 12 * 2 + 4 + 2
    assert batches >= done // 5
    assert set(labels(backend).values()) == {term}
    all_read(backend)
    assert backend.values_by_term(fresh=True) == {term: done}
    # A second pass finds nothing to do.
    assert backend.rewrap_batch(term, RewrapCursor()).rewrapped == 0


def test_a_write_during_a_rewrap_is_never_lost(backend: Any) -> None:
    """Each value is sealed again only if it is still what the re-wrap read: a write in between wins."""
    fill(backend, secrets=3)
    term = backend.rotate_data_key()
    policies = PolicyStore(backend)

    def versions_meanwhile() -> None:
        backend.destroy("app/000", [1]).result(WAIT)
        backend.delete("app/001", [1]).result(WAIT)  # a mark only: its value is sealed again, still deleted
        backend.put("app/002", {"v": "2-3"}, None).result(WAIT)  # a new version, under the new term already

    def custom_meanwhile() -> None:
        backend.update_metadata("app/000", max_versions=None, cas_required=None, custom_metadata={"i": "new"}).result(
            WAIT
        )

    def policy_meanwhile() -> None:
        policies.put("p1", "spiffe://y/.*", "app/.*", frozenset({Permission.LIST}), create_only=False).result(WAIT)

    # One page of each kind of value (versions, custom metadata, policies), a write between its read and its write.
    hooks = iter([versions_meanwhile, custom_meanwhile, policy_meanwhile])
    cursor: RewrapCursor | None = RewrapCursor()
    changed = 0
    while cursor is not None:
        batch = backend.rewrap_batch(term, cursor, limit=100, before_write=next(hooks))
        changed, cursor = changed + batch.changed, batch.next
    assert changed == 3  # the destroyed version, the replaced custom metadata, the replaced policy
    with pytest.raises(kv.NotFound):
        backend.get("app/000", 1)
    assert backend.metadata("app/000")[1][0].destroyed
    assert backend.metadata("app/000")[0].custom_metadata == {"i": "new"}
    assert backend.metadata("app/001")[1][0].deleted_at is not None
    backend.undelete("app/001", [1]).result(WAIT)
    assert backend.get("app/001", 1) == (1, {"v": "1-1"})
    assert backend.get("app/002", 0) == (3, {"v": "2-3"})
    assert policies.get("p1").spiffe_id_pattern == "spiffe://y/.*"
    assert set(labels(backend).values()) == {term}


def test_the_background_rewrap_finishes_and_ends_the_stored_rewrap(backend: Any) -> None:
    fill(backend)
    backend.rewrap_batch_size = 4
    term = backend.rotate_data_key(rewrap=True)
    wait_for(lambda: backend.cluster_state().rewrap_target is None)
    assert set(labels(backend).values()) == {term}
    status = backend.keyring_status(fresh=True)
    assert (status.rewrap_target, status.rewrap_remaining, status.rewrapped) == (None, 0, 12 * 2 + 4 + 2)
    all_read(backend)


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_rewrap_resumes_after_a_restart_from_the_rows(kind: str, tmp_path: Path) -> None:
    backend = open_backend(kind, tmp_path / "data")
    url = getattr(backend, "_url", None)
    try:
        fill(backend)
        term = backend.rotate_data_key()
        backend.set_rewrap_target(term)  # asked for, as rotate_data_key(rewrap=True) does, but not run here
        backend.rewrap_batch(term, RewrapCursor(), limit=10)  # then Nexus stops a batch in
        assert backend.keyring_status(fresh=True).rewrap_remaining == 12 * 2 + 4 + 2 - 10
    finally:
        backend.close()
    if kind == "sqlite":
        from spike.app.store.sqlite import SqliteBackend

        again: Any = SqliteBackend(tmp_path / "data")
    else:
        from spike.app.store.postgres import PostgresBackend

        again = PostgresBackend(url, read_threads=2)
    try:
        again.unlock(ROOT_KEY, EPOCH)  # Nexus has its key again: the re-wrap resumes by itself
        wait_for(lambda: again.cluster_state().rewrap_target is None)
        assert set(labels(again).values()) == {term}
        assert again.rewrapped == 12 * 2 + 4 + 2 - 10
        all_read(again)
    finally:
        again.close()


def test_values_that_cannot_be_opened_are_left_as_they_are_and_the_rewrap_ends(backend: Any) -> None:
    fill(backend, secrets=3)

    def tamper(conn: Any) -> None:
        statement = (
            "UPDATE secret_version SET sealed = %(s)s WHERE path = 'app/001' AND version = 1"
            if backend.shared
            else "UPDATE secret_version SET sealed = :s WHERE path = 'app/001' AND version = 1"
        )
        (sealed,) = conn.execute(
            "SELECT sealed FROM secret_version WHERE path = 'app/001' AND version = 2", {}
        ).fetchone()
        conn.execute(statement, {"s": sealed})  # another version's value: refused as moved

    backend._key_change(tamper)
    term = backend.rotate_data_key(rewrap=True)
    wait_for(lambda: backend.cluster_state().rewrap_target is None)
    left = {k: t for k, t in labels(backend).items() if t != term}
    assert list(left) == ["app/001@1"]
    assert backend.keyring_status(fresh=True).values_by_term[left["app/001@1"]] == 1


def test_one_instance_runs_the_rewrap_at_a_time(tmp_path: Path) -> None:
    """PostgreSQL: the instance holding the session lock re-wraps; another waits, and takes over if it stops."""
    first = open_backend("postgres", tmp_path / "a")
    from spike.app.store.postgres import PostgresBackend

    second = PostgresBackend(first._url, read_threads=2)
    second.unlock(ROOT_KEY, EPOCH)
    try:
        with first._rewrap_claim() as mine:
            assert mine is True
            with second._rewrap_claim() as theirs:
                assert theirs is False
        with second._rewrap_claim() as theirs:
            assert theirs is True
    finally:
        first.close()
        second.close()
