"""One conformance suite for every storage backend: SQLite and PostgreSQL (a real server).

Each test takes the `backend` fixture, so it runs once per backend: the
interface of spike/app/store/backend.py (key record, secrets, policies, reads
through futures, writes through futures) must behave the same on both.
The tests marked `shared` are about several Nexus instances on one database
and run where the backend says it can be shared.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import pytest
from store_helpers import EPOCH, OTHER_KEY, RECORD, ROOT_KEY, WAIT

from spike.app.model import kv
from spike.app.model.policy import Permission
from spike.app.store.backend import Backend
from spike.app.store.errors import EpochUsed, StorageError
from spike.app.store.policies import NameTaken, PolicyStore
from spike.protocol.material import RootKey
from spike.protocol.pending import PendingRotation
from spike.protocol.record import KeyRecord, seal_key

OTHER_RECORD, _ = seal_key(OTHER_KEY, epoch=1, threshold=2, keeper_ids=[1, 2, 3])
NEXT_RECORD, _ = seal_key(OTHER_KEY, epoch=2, threshold=2, keeper_ids=[1, 2, 3])


def outcome(future: Future[Any]) -> Any:
    try:
        return future.result(WAIT)
    except Exception as exc:
        return exc


def race(threads: int, work: Any) -> list[Any]:
    barrier = threading.Barrier(threads)

    def run(i: int) -> Any:
        barrier.wait(timeout=WAIT)
        try:
            return work(i)
        except kv.KvError as exc:
            return exc

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(run, range(threads)))


def second(backend: Backend, tmp_path: Path) -> Any:
    """Another instance on the same data: the same file for SQLite, the same database for PostgreSQL."""
    if backend.shared:
        from spike.app.store.postgres import PostgresBackend

        assert isinstance(backend, PostgresBackend)
        other: Any = PostgresBackend(backend._url, read_threads=2)
    else:
        from spike.app.store.sqlite import SqliteBackend

        other = SqliteBackend(tmp_path / "data")
    other.unlock(ROOT_KEY, EPOCH)
    return other


# ---------------------------------------------------------------------- key record


def test_the_key_record_is_installed_once_and_replaced_only_over_the_one_in_force(empty_backend: Backend) -> None:
    backend = empty_backend
    assert backend.load_key_record() is None
    assert backend.cluster_state().record is None
    assert backend.install_key_record(RECORD, replace=None) == RECORD
    assert backend.load_key_record() == RECORD
    # A second first install loses: the record in force comes back.
    assert backend.install_key_record(OTHER_RECORD, replace=None) == RECORD
    # Replacing needs the record in force; a stale `replace` loses too.
    assert backend.install_key_record(NEXT_RECORD, replace=OTHER_RECORD) == RECORD
    assert backend.install_key_record(NEXT_RECORD, replace=RECORD) == NEXT_RECORD
    assert backend.load_key_record() == NEXT_RECORD
    assert backend.cluster_state().record == NEXT_RECORD


def test_installs_at_the_same_moment_agree_on_one_record(empty_backend: Backend) -> None:
    backend = empty_backend
    records = [seal_key(ROOT_KEY, epoch=1, threshold=2, keeper_ids=[1, 2, 3])[0] for _ in range(8)]
    winners = race(8, lambda i: backend.install_key_record(records[i], replace=None))
    assert len({r.check for r in winners}) == 1
    assert isinstance(winners[0], KeyRecord)
    assert backend.load_key_record() == winners[0]


def test_a_record_keeps_every_earlier_epoch_and_one_without_history_reads_as_before(
    empty_backend: Backend, tmp_path: Path
) -> None:
    backend = empty_backend
    """Issue 14 L2: the record knows the deployment's epochs; records stored before it did still load."""
    assert b"history" not in msgspec.json.encode(RECORD)  # what earlier versions stored, byte for byte
    assert backend.install_key_record(RECORD, replace=None) == RECORD
    assert backend.load_key_record() == RECORD and RECORD.history is None
    third, _ = seal_key(ROOT_KEY, epoch=5, threshold=2, keeper_ids=[1, 2, 3])
    nxt = NEXT_RECORD.succeeding(RECORD)
    assert backend.install_key_record(nxt, replace=RECORD) == nxt
    latest = third.succeeding(nxt)
    assert backend.install_key_record(latest, replace=nxt) == latest
    other = second(backend, tmp_path)
    try:
        for reader in (backend, other):
            stored = reader.load_key_record()
            assert stored == latest and stored.history == ((0, 2),)
            assert [e for e in range(7) if stored.had_epoch(e)] == [0, 1, 2, 5]
            assert reader.cluster_state().record == latest
    finally:
        other.close()


# ---------------------------------------------------------------------- rotations (docs/key-lifecycle.md section 4)

THIRD_KEY = RootKey(bytes(range(3, 35)))


def rotation(old_key: RootKey, old: KeyRecord, new_key: RootKey, epoch: int) -> PendingRotation:
    new, _ = seal_key(new_key, epoch=epoch, threshold=old.threshold, keeper_ids=list(old.keeper_ids))
    return PendingRotation.seal(old_key, old, new_key, new)


def wrapped(backend: Backend, pending: PendingRotation, new_key: RootKey) -> bytes:
    """The keyring under the rotation's new key: what Nexus stores with it."""
    return backend.keyring().wrap(new_key, pending.record.epoch)


def test_a_rotation_is_stored_only_over_the_record_it_starts_from_and_only_one_at_a_time(
    empty_backend: Backend,
) -> None:
    backend = empty_backend
    p2 = rotation(ROOT_KEY, RECORD, OTHER_KEY, 2)
    assert backend.load_rotation_state() == (None, None, 0)
    blob = b"\x02" + bytes(8 + 4 + 12 + 16)  # a wrapped keyring's shape, for the refusals before a keyring exists
    with pytest.raises(ValueError, match="wrapped for epoch 0, not 2"):
        backend.persist_rotation(p2, blob)
    blob = b"\x02" + (2).to_bytes(8, "big") + bytes(4 + 12 + 16)
    assert backend.persist_rotation(p2, blob) is False  # no record yet
    backend.install_key_record(RECORD, replace=None)
    assert backend.load_rotation_state() == (None, None, 1)
    assert backend.persist_rotation(p2, blob) is False  # no keyring yet: nothing to carry over
    backend.unlock(ROOT_KEY, EPOCH)
    keyring = wrapped(backend, p2, OTHER_KEY)
    # Not from the record in force: another epoch, or the same epoch with another key.
    p3 = rotation(OTHER_KEY, NEXT_RECORD, THIRD_KEY, 3)
    assert backend.persist_rotation(p3, wrapped(backend, p3, THIRD_KEY)) is False
    foreign = rotation(OTHER_KEY, OTHER_RECORD, THIRD_KEY, 2)
    assert backend.persist_rotation(foreign, wrapped(backend, foreign, THIRD_KEY)) is False
    assert backend.persist_rotation(p2, keyring) is True
    assert backend.load_rotation_state() == (p2, keyring, 1)
    assert backend.cluster_state().pending == p2
    # The same rotation again (a retry) is what is stored; any other is refused while it is.
    assert backend.persist_rotation(p2, keyring) is True
    other = rotation(ROOT_KEY, RECORD, THIRD_KEY, 2)
    assert backend.persist_rotation(other, wrapped(backend, other, THIRD_KEY)) is False
    assert backend.load_rotation_state() == (p2, keyring, 1)
    assert backend.load_key_record() == RECORD


def test_a_commit_makes_the_new_record_and_its_keyring_current_in_one_write(backend: Backend) -> None:
    p2 = rotation(ROOT_KEY, RECORD, OTHER_KEY, 2)
    other = rotation(ROOT_KEY, RECORD, THIRD_KEY, 2)
    backend.put("kept", {"k": "v"}, None).result(WAIT)
    assert backend.commit_rotation(p2) is False  # nothing stored
    keyring = wrapped(backend, p2, OTHER_KEY)
    assert backend.persist_rotation(p2, keyring) is True
    assert backend.commit_rotation(other) is False  # not the stored one
    assert backend.load_key_record() == RECORD
    assert backend.commit_rotation(p2) is True
    assert backend.load_key_record() == p2.record
    assert p2.record.had_epoch(1)
    assert backend.load_rotation_state() == (None, None, 2)
    assert backend.load_keyring() == (2, keyring)
    state = backend.cluster_state()
    assert (state.record, state.pending, state.highest_epoch) == (p2.record, None, 2)
    assert backend.commit_rotation(p2) is True  # a retry after the commit went through
    assert backend.commit_rotation(other) is False
    # The new key opens the same keyring: what was stored reads, what is written next too.
    backend.unlock(OTHER_KEY, 2)
    assert backend.get("kept", 0) == (1, {"k": "v"})
    assert backend.put("kept", {"k": "w"}, 1).result(WAIT) == 2
    # The next rotation starts from the new record.
    p3 = rotation(OTHER_KEY, p2.record, THIRD_KEY, 3)
    stale = rotation(ROOT_KEY, RECORD, THIRD_KEY, 3)
    assert backend.persist_rotation(stale, wrapped(backend, stale, THIRD_KEY)) is False
    assert backend.persist_rotation(p3, wrapped(backend, p3, THIRD_KEY)) is True
    assert backend.commit_rotation(p3) is True
    assert backend.load_key_record() == p3.record
    backend.unlock(THIRD_KEY, 3)
    assert backend.get("kept", 1) == (1, {"k": "v"})


def test_an_abandoned_epoch_is_never_used_again(backend: Backend) -> None:
    p2 = rotation(ROOT_KEY, RECORD, OTHER_KEY, 2)
    keyring = wrapped(backend, p2, OTHER_KEY)
    assert backend.persist_rotation(p2, keyring) is True
    assert backend.abandon_rotation(rotation(ROOT_KEY, RECORD, THIRD_KEY, 2)) is False  # not the stored one
    assert backend.load_rotation_state() == (p2, keyring, 1)
    assert backend.abandon_rotation(p2) is True
    assert backend.load_rotation_state() == (None, None, 2)
    assert backend.load_key_record() == RECORD
    assert backend.abandon_rotation(p2) is True  # a retry
    # Epoch 2 is burnt: a rotation to it is refused, whatever its key; epoch 3 goes.
    again = rotation(ROOT_KEY, RECORD, THIRD_KEY, 2)
    assert backend.persist_rotation(again, wrapped(backend, again, THIRD_KEY)) is False
    p3 = rotation(ROOT_KEY, RECORD, THIRD_KEY, 3)
    assert backend.persist_rotation(p3, wrapped(backend, p3, THIRD_KEY)) is True
    assert backend.commit_rotation(p3) is True
    assert backend.abandon_rotation(p3) is False  # committed: not abandoned
    assert backend.load_rotation_state() == (None, None, 3)


def test_bootstrap_force_drops_a_pending_rotation_and_keeps_the_high_water_mark(backend: Backend) -> None:
    backend.abandon_rotation(rotation(ROOT_KEY, RECORD, OTHER_KEY, 2))  # mark at 2
    p3 = rotation(ROOT_KEY, RECORD, OTHER_KEY, 3)
    keyring = wrapped(backend, p3, OTHER_KEY)
    assert backend.persist_rotation(p3, keyring) is True
    # A replacement at an epoch already used is refused and changes nothing.
    with pytest.raises(EpochUsed, match="not above 2"):
        backend.install_key_record(NEXT_RECORD.succeeding(RECORD), replace=RECORD)
    assert backend.load_key_record() == RECORD
    assert backend.load_rotation_state() == (p3, keyring, 2)
    # Above the mark: installed, the pending rotation is gone and cannot be committed any more.
    forced, _ = seal_key(THIRD_KEY, epoch=3, threshold=2, keeper_ids=[1, 2, 3])
    forced = forced.succeeding(RECORD)
    assert backend.install_key_record(forced, replace=RECORD) == forced
    assert backend.load_rotation_state() == (None, None, 3)
    assert backend.load_keyring() == (3, None)
    assert backend.commit_rotation(p3) is False
    assert backend.load_key_record() == forced


def test_rotations_at_once_from_two_instances_store_one(backend: Backend, tmp_path: Path) -> None:
    other = second(backend, tmp_path)
    try:
        instances = [backend, other]
        keys = [RootKey(bytes([i + 1]) * 32) for i in range(8)]
        candidates = [rotation(ROOT_KEY, RECORD, keys[i], 2) for i in range(8)]
        blobs = [wrapped(instances[i % 2], candidates[i], keys[i]) for i in range(8)]
        won = race(8, lambda i: instances[i % 2].persist_rotation(candidates[i], blobs[i]))
        assert won.count(True) == 1, won
        winner = won.index(True)
        for instance in instances:
            assert instance.load_rotation_state() == (candidates[winner], blobs[winner], 1)
        # Commit and abandon at once: exactly one of them happens.
        done = race(2, lambda i: [other.commit_rotation, backend.abandon_rotation][i](candidates[winner]))
        assert done.count(True) == 1, done
        record = backend.load_key_record()
        assert record == (candidates[winner].record if done[0] else RECORD)
        assert backend.load_rotation_state()[:2] == (None, None)
    finally:
        other.close()


# ---------------------------------------------------------------------- secrets


def test_versions_cas_marks_metadata_and_purge(backend: Backend) -> None:
    assert backend.put("app/db", {"user": "u", "pw": "1"}, None).result(WAIT) == 1
    assert backend.put("app/db", {"pw": "2"}, 1).result(WAIT) == 2
    assert isinstance(outcome(backend.put("app/db", {"pw": "x"}, 1)), kv.CasMismatch)
    assert isinstance(outcome(backend.put("new", {"k": "v"}, 3)), kv.CasMismatch)
    assert backend.get("app/db", 0) == (2, {"pw": "2"})
    assert backend.get("app/db", 1) == (1, {"user": "u", "pw": "1"})
    with pytest.raises(kv.NotFound):
        backend.get("app/db", 3)
    with pytest.raises(kv.NotFound):
        backend.get("nothing", 0)

    backend.delete("app/db", []).result(WAIT)
    with pytest.raises(kv.NotFound):
        backend.get("app/db", 0)
    backend.undelete("app/db", [2]).result(WAIT)
    assert backend.get("app/db", 0) == (2, {"pw": "2"})
    backend.destroy("app/db", [1]).result(WAIT)
    backend.undelete("app/db", [1]).result(WAIT)  # destroy is final
    with pytest.raises(kv.NotFound):
        backend.get("app/db", 1)
    assert isinstance(outcome(backend.delete("nothing", [])), kv.NotFound)

    backend.update_metadata("app/db", max_versions=2, cas_required=True, custom_metadata={"team": "a"}).result(WAIT)
    assert isinstance(outcome(backend.put("app/db", {"pw": "3"}, None)), kv.InvalidRequest)  # cas required
    assert backend.put("app/db", {"pw": "3"}, 2).result(WAIT) == 3
    meta, versions = backend.metadata("app/db")
    assert (meta.current_version, meta.oldest_version, meta.max_versions, meta.cas_required) == (3, 2, 2, True)
    assert meta.custom_metadata == {"team": "a"}
    assert [(v.version, v.deleted_at is None, v.destroyed) for v in versions] == [(2, True, False), (3, True, False)]

    # Metadata before the first version, then cas 0.
    backend.update_metadata("early", max_versions=None, cas_required=True, custom_metadata=None).result(WAIT)
    meta, versions = backend.metadata("early")
    assert (meta.current_version, meta.cas_required, versions) == (0, True, [])
    assert backend.put("early", {"k": "v"}, 0).result(WAIT) == 1

    backend.delete_all("app/db").result(WAIT)
    with pytest.raises(kv.NotFound):
        backend.metadata("app/db")
    assert isinstance(outcome(backend.delete_all("app/db")), kv.NotFound)
    assert backend.put("app/db", {"k": "again"}, 0).result(WAIT) == 1  # a purged path starts over


def test_listing_by_prefix_page_by_page(backend: Backend) -> None:
    paths = ["a", "a/b", "a/b/c", "a~", "ab", "b/x", "a/z"]
    for future in [backend.put(p, {"k": "v"}, None) for p in paths]:
        future.result(WAIT)
    assert backend.count() == len(paths)
    for prefix in ["", "a", "a/", "a/b", "b/", "c"]:
        listed: list[str] = []
        after = ""
        while True:
            page = backend.list_paths(prefix, limit=2, after=after)
            listed += page
            if len(page) < 2:
                break
            after = page[-1]
        assert listed == sorted(p for p in paths if p.startswith(prefix)), prefix


def test_reads_through_futures_answer_the_same(backend: Backend) -> None:
    backend.put("f", {"k": "v"}, None).result(WAIT)
    assert backend.read(lambda: backend.get("f", 0)).result(WAIT) == (1, {"k": "v"})
    assert isinstance(outcome(backend.read(lambda: backend.get("g", 0))), kv.NotFound)


def test_a_failing_write_in_a_burst_leaves_the_others(backend: Backend) -> None:
    futures = [backend.put(f"burst/{i}", {"i": str(i)}, None) for i in range(20)]
    futures.insert(10, backend.put("burst/3", {"i": "late"}, 7))
    outcomes = [outcome(f) for f in futures]
    assert isinstance(outcomes.pop(10), kv.CasMismatch)
    assert outcomes == [1] * 20
    assert all(backend.get(f"burst/{i}", 0) == (1, {"i": str(i)}) for i in range(20))


def test_writes_submitted_in_order_apply_in_order(backend: Backend) -> None:
    futures = [backend.put("order", {"n": str(n)}, n) for n in range(30)]
    assert [f.result(WAIT) for f in futures] == list(range(1, 31))
    assert backend.get("order", 0) == (30, {"n": "29"})


def test_cas_race_has_exactly_one_winner_per_round(backend: Backend) -> None:
    for current in range(4):
        outcomes = race(12, lambda i, c=current: backend.put("race", {"by": str(i)}, cas=c).result(WAIT))
        winners = [(i, o) for i, o in enumerate(outcomes) if not isinstance(o, Exception)]
        assert len(winners) == 1, outcomes
        assert all(isinstance(o, kv.CasMismatch) for o in outcomes if isinstance(o, Exception)), outcomes
        assert backend.get("race", 0) == (current + 1, {"by": str(winners[0][0])})


def test_concurrent_writes_share_commits(backend: Backend) -> None:
    futures = [backend.put(f"group/{i}", {"n": str(i)}, None) for i in range(200)]
    assert [f.result(WAIT) for f in futures] == [1] * 200
    assert backend.count() == 200
    assert getattr(backend, "batches") < 200  # noqa: B009 - both backends count their commits


def test_a_locked_backend_seals_and_opens_nothing(backend: Backend) -> None:
    backend.put("sealed", {"k": "v"}, None).result(WAIT)
    backend.lock()
    with pytest.raises(StorageError):
        backend.put("sealed", {"k": "w"}, None)
    with pytest.raises(StorageError):
        backend.get("sealed", 0)
    # Another root key, or another epoch, opens no keyring: nothing is sealed or opened (a bare storage error,
    # never a value, never taken for tampering with a row).
    backend.unlock(OTHER_KEY, EPOCH)
    with pytest.raises(StorageError, match="does not open with the root key of epoch 1"):
        backend.get("sealed", 0)
    with pytest.raises(StorageError, match="does not open"):
        backend.put("sealed", {"k": "w"}, None)
    backend.unlock(ROOT_KEY, EPOCH + 1)
    with pytest.raises(StorageError, match="record is of epoch 1, not 2"):
        backend.get("sealed", 0)
    backend.unlock(ROOT_KEY, EPOCH)
    assert backend.get("sealed", 0) == (1, {"k": "v"})


def test_an_acknowledged_write_is_read_by_another_instance_at_once(backend: Backend, tmp_path: Path) -> None:
    other = second(backend, tmp_path)
    try:
        for n in range(20):
            version = backend.put("shared", {"n": str(n)}, None).result(WAIT)
            assert other.get("shared", 0) == (version, {"n": str(n)})
            other.delete("shared", []).result(WAIT)
            with pytest.raises(kv.NotFound):
                backend.get("shared", 0)
    finally:
        other.close()


# ---------------------------------------------------------------------- policies


def test_policies_create_replace_get_list_delete(backend: Backend) -> None:
    ids = iter(["id-1", "id-2", "id-3"])
    store = PolicyStore(backend, new_id=lambda: next(ids))
    before = backend.cluster_state().policy_version
    assert store.put("readers", "spiffe://x/.*", "a/.*", frozenset({Permission.READ}), create_only=True).result(
        WAIT
    ) == ("id-1", True)
    assert store.put("readers", "spiffe://x/y", "b/.*", frozenset({Permission.LIST}), create_only=False).result(
        WAIT
    ) == ("id-1", False)
    assert isinstance(
        outcome(store.put("readers", "spiffe://x/y", "b/.*", frozenset({Permission.LIST}), create_only=True)),
        NameTaken,
    )
    store.put("id-1", "spiffe://z/.*", "c", frozenset({Permission.WRITE}), create_only=True).result(WAIT)
    assert store.get("id-1").name == "readers"  # an id wins over a name
    assert store.get("readers").path_pattern == "b/.*"
    assert store.list() == [("id-2", "id-1"), ("id-1", "readers")]
    assert [p.name for p in store.load_all()] == ["id-1", "readers"]
    store.delete("readers").result(WAIT)
    assert isinstance(outcome(store.delete("readers")), kv.NotFound)
    with pytest.raises(kv.NotFound):
        store.get("readers")
    if backend.shared:  # other instances reload their policies when this moves
        assert backend.cluster_state().policy_version >= before + 3


# ---------------------------------------------------------------------- several instances


def test_cas_across_two_instances_has_exactly_one_winner(backend: Backend, tmp_path: Path) -> None:
    if not backend.shared:
        pytest.skip("one Nexus process per SQLite file")
    other = second(backend, tmp_path)
    try:
        instances = [backend, other]
        for current in range(6):
            outcomes = race(8, lambda i, c=current: instances[i % 2].put("x", {"by": str(i)}, cas=c).result(WAIT))
            winners = [o for o in outcomes if not isinstance(o, Exception)]
            assert winners == [current + 1], outcomes
        # No lost update across instances: increments with cas retries.
        backend.put("counter", {"n": "0"}, 0).result(WAIT)

        def increment(i: int) -> int:
            store, done, conflicts = instances[i % 2], 0, 0
            while done < 10:
                version, values = store.get("counter", 0)
                try:
                    store.put("counter", {"n": str(int(values["n"]) + 1)}, version).result(WAIT)
                except kv.CasMismatch:
                    conflicts += 1
                    continue
                done += 1
            return conflicts

        conflicts = race(6, increment)
        assert other.get("counter", 0) == (61, {"n": "60"})
        assert sum(conflicts) > 0
    finally:
        other.close()
