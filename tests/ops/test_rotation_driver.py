"""Nexus's side of key rotation, in-process: the route, the store effects, status, logs, metrics, the schedule.

A `RotatingNode` (rotation_rig.py) is spike's Nexus wiring on a real SQLite
store with in-memory keepers: what these tests see stored is what the store
really wrote, and each acknowledgement reaches the custody machine only after
the write returned.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
from prometheus_client import generate_latest

from spike.app.api.messages import (
    BOOTSTRAP_INIT_PATH,
    CIPHER_DECRYPT_PATH,
    CIPHER_ENCRYPT_PATH,
    RECOVER_PATH,
    ROTATE_PATH,
    SECRETS_PATH,
    STATUS_PATH,
    InitRequest,
    StatusBody,
)
from spike.app.commands.status import EXIT_RECOVERY_STALE, exit_code, render
from spike.app.nexus.cluster_watch import ClusterWatch
from spike.app.nexus.lifecycle import epochs_since
from spike.protocol import (
    Phase,
    PhaseChanged,
    RootKey,
    RotationProgress,
    RotationStage,
    ShardContribution,
    decode,
    encode,
    seal_key,
)
from spike.protocol.api import ApiRequest
from spike.protocol.identity import Role
from tests.ops.rotation_rig import INTERVAL, TRUST, RotatingNode


@pytest.fixture
def node(tmp_path: Path) -> Iterator[RotatingNode]:
    n = RotatingNode(tmp_path / "data")
    try:
        yield n
    finally:
        n.close()


def rotate(node: RotatingNode, body: object = None) -> tuple[int, dict[str, object]]:
    answer = node.call(ROTATE_PATH, body)
    return answer.status, json.loads(answer.body)


def status(node: RotatingNode) -> dict[str, object]:
    answer = node.call(STATUS_PATH)
    assert answer.status == 200
    body: dict[str, object] = json.loads(answer.body)
    return body


def dealt(node: RotatingNode, *keepers: int) -> bool:
    view = node.custody.rotation
    return view is not None and set(keepers) <= set(view.dealt)


def stages(node: RotatingNode) -> list[RotationStage]:
    return [r.stage for r in node.reports if isinstance(r, RotationProgress)]


# ---------------------------------------------------------------- the whole way


def test_an_operator_rotation_is_stored_before_the_answer_then_dealt_committed_and_retired(node: RotatingNode) -> None:
    code, body = rotate(node)
    assert code == 200, body
    rotation = body["rotation"]
    assert isinstance(rotation, dict)
    assert (rotation["stage"], rotation["from_epoch"], rotation["to_epoch"]) == ("dealing", 1, 2)
    assert body["epoch"] == 1
    pending, _, highest = node.backend.load_rotation_state()  # stored before the answer came
    assert pending is not None and pending.record.epoch == 2 and highest == 1
    assert node.backend.load_key_record().epoch == 1  # type: ignore[union-attr]

    node.run_for(INTERVAL * 6, stop=node.committed)
    assert node.committed()
    stored = node.backend.load_key_record()
    assert stored is not None and stored.epoch == 2 and stored == node.custody.record
    assert node.backend.load_rotation_state()[0] is None
    assert node.store.calls == ["persist", "commit"]
    node.run_for(INTERVAL * 3)
    assert all(keeper.epochs == (2,) for keeper in node.keeper_machines.values())  # old shards forgotten
    assert stages(node)[0] is RotationStage.PERSISTING and RotationStage.COMMITTED in stages(node)


def test_status_shows_the_rotation_under_way_and_the_high_water_mark(node: RotatingNode) -> None:
    node.down.add(3)
    assert rotate(node)[0] == 200
    node.run_for(INTERVAL * 2, stop=lambda: dealt(node, 1, 2))
    shown = status(node)
    rotation = shown["rotation"]
    assert isinstance(rotation, dict)
    assert rotation["stage"] == "dealing" and rotation["keepers"] == [1, 2, 3] and rotation["threshold"] == 2
    assert set(rotation["dealt"]) == {1, 2} and rotation["needed"] == 0
    assert shown["highest_epoch"] == 1 and shown["epoch"] == 1  # raised by the commit (or an abandon)
    node.run_for(INTERVAL * 5, stop=node.committed)
    assert node.committed()  # keeper 3 down: committed after the deal rounds with 2 of 3
    shown = status(node)
    assert shown["rotation"] is None and shown["epoch"] == 2


def test_log_lines_say_each_step_once_and_each_keeper_once_never_per_poll(node: RotatingNode) -> None:
    assert rotate(node)[0] == 200
    node.run_for(INTERVAL * 6, stop=node.committed)
    node.run_for(INTERVAL * 10)  # many polls after the commit: nothing more about the rotation
    lines = node.logs().splitlines()
    rotation_lines = [line for line in lines if "rotation" in line or "rotated" in line]
    assert len([line for line in rotation_lines if "started" in line]) == 1
    assert len([line for line in rotation_lines if "stored: dealing" in line]) == 1
    for keeper_id in (1, 2, 3):
        assert len([line for line in rotation_lines if f"keeper {keeper_id} " in line and "new shard" in line]) == 1
    assert len([line for line in rotation_lines if "committing" in line]) == 1
    assert len([line for line in lines if "root key rotated: epoch 2 is in force" in line]) == 1
    assert len([line for line in lines if "forgot its shard of epoch 1" in line]) == 3


def test_metrics_count_the_rotation_and_show_it_under_way(node: RotatingNode) -> None:
    node.down.add(3)
    assert rotate(node)[0] == 200
    node.run_for(INTERVAL * 2, stop=lambda: dealt(node, 1, 2))
    text = generate_latest(node.metrics.registry).decode()
    assert 'spike_key_rotation_stage{stage="dealing"} 1.0' in text
    assert "spike_key_rotation_to_epoch 2.0" in text and "spike_key_rotation_keepers_dealt 2.0" in text
    node.down.clear()
    node.run_for(INTERVAL * 6, stop=node.committed)
    node.run_for(INTERVAL * 2)
    text = generate_latest(node.metrics.registry).decode()
    assert 'spike_key_rotations_total{outcome="committed"} 1.0' in text
    assert 'spike_key_rotation_stage{stage="dealing"} 0.0' in text and "spike_key_rotation_to_epoch 0.0" in text
    assert 'spike_keeper_shards_retired_total{keeper="1"} 1.0' in text
    assert "spike_key_rotation_duration_seconds" in text


# ---------------------------------------------------------------- refusals change nothing


def test_a_second_rotation_is_refused_with_the_reason_while_one_is_under_way(node: RotatingNode) -> None:
    node.down.update({2, 3})
    assert rotate(node)[0] == 200
    code, body = rotate(node)
    assert code == 409 and body["err"] == "api_conflict"
    assert "a key rotation 1 -> 2 is under way (dealing" in str(body["reason"])
    assert node.store.calls == ["persist"]


def test_only_the_superuser_may_rotate_and_bad_bodies_are_refused(node: RotatingNode) -> None:
    for role in (Role.PILOT_RECOVER, Role.PILOT_RESTORE, Role.BOOTSTRAP, Role.NEXUS):
        assert node.call(ROTATE_PATH, peer=TRUST.id_of(role)).status == 401
    assert node.call(ROTATE_PATH, peer=None).status == 401
    assert node.call(ROTATE_PATH, b"{nope").status == 400
    assert node.call(ROTATE_PATH, {"data_key": True, "bogus": 1}).status == 400
    assert node.store.calls == [] and node.custody.rotation is None


def test_a_nexus_without_its_key_answers_not_ready(node: RotatingNode) -> None:
    node.custody.forget(node.clock)
    code, body = rotate(node)
    assert code == 503 and body["err"] == "state_not_ready"
    assert node.store.calls == []


def test_a_rotation_the_store_refuses_is_not_started_and_says_why(node: RotatingNode) -> None:
    other = RotatingNode(node.data_dir.parent / "other")  # the same deployment: another instance's rotation
    try:
        their_key = RootKey(bytes(range(7, 39)))
        theirs = other.custody.start_rotation(other.clock, key=their_key)
    finally:
        other.close()
    wrapped = node.backend.keyring().wrap(their_key, theirs.record.epoch)
    assert node.backend.persist_rotation(theirs, wrapped)  # stored first by the other instance
    code, body = rotate(node)
    assert code == 409 and "not started: another key rotation is stored" in str(body["reason"])
    assert node.custody.rotation is None and node.backend.load_rotation_state()[0] == theirs
    assert stages(node)[-1] is RotationStage.NOT_STARTED


def test_a_rotation_the_store_fails_to_write_is_not_started_and_says_why(node: RotatingNode) -> None:
    node.store.fail.add("persist")
    code, body = rotate(node)
    assert code == 409 and "not started: the store could not take it: persist: the disk is full" in str(body["reason"])
    assert node.custody.rotation is None and node.backend.load_rotation_state()[0] is None
    node.store.fail.clear()
    assert rotate(node)[0] == 200


def test_a_commit_the_store_fails_is_tried_again_and_nothing_moves_meanwhile(
    node: RotatingNode, caplog: pytest.LogCaptureFixture
) -> None:
    node.store.fail.add("commit")
    assert rotate(node)[0] == 200
    node.run_for(INTERVAL * 6, stop=lambda: bool(node.offload.delayed))
    assert node.offload.delayed and node.custody.rotation is not None
    assert node.custody.rotation.stage is RotationStage.COMMITTING
    assert node.backend.load_key_record().epoch == 1  # type: ignore[union-attr]
    node.run_for(INTERVAL * 2)
    assert all(1 in keeper.epochs for keeper in node.keeper_machines.values())  # nothing retired before the commit
    assert "cannot commit key rotation 1 -> 2: commit: the disk is full (a test); trying again in 0.5s" in caplog.text
    node.store.fail.clear()
    node.offload.run_delayed()
    node.driver.dispatch()
    assert node.committed() and node.backend.load_key_record().epoch == 2  # type: ignore[union-attr]


def test_abort_gives_the_rotation_up_and_burns_its_epoch(node: RotatingNode) -> None:
    node.down.update({2, 3})
    assert rotate(node)[0] == 200
    node.run_for(INTERVAL)
    code, body = rotate(node, {"abort": True})
    assert code == 200 and body["rotation"] is None and body["epoch"] == 1
    pending, _, highest = node.backend.load_rotation_state()
    assert pending is None and highest == 2
    assert status(node)["highest_epoch"] == 2
    code, body = rotate(node, {"abort": True})
    assert code == 409 and body["reason"] == "no key rotation is under way"
    node.down.clear()
    code, body = rotate(node)
    assert code == 200 and body["rotation"]["to_epoch"] == 3  # type: ignore[index]


# ---------------------------------------------------------------- restarts


def test_a_restart_with_a_stored_rotation_resumes_it_with_the_same_key(node: RotatingNode) -> None:
    node.down.update({3})
    assert rotate(node)[0] == 200
    node.run_for(INTERVAL * 1.2)
    stored, _, _ = node.backend.load_rotation_state()
    assert stored is not None
    node.restart()
    node.down.clear()
    node.run_for(INTERVAL * 8, stop=node.committed)
    assert node.committed() and node.backend.load_key_record() == stored.record


def test_a_restart_with_another_keeper_set_moves_custody(tmp_path: Path) -> None:
    node = RotatingNode(tmp_path / "data")
    try:
        node.keeper(4), node.keeper(5)
        node.restart(keepers=[1, 2, 3, 4, 5], threshold=3)
        node.run_for(INTERVAL * 12, stop=lambda: node.committed() and node.custody.keeper_ids == (1, 2, 3, 4, 5))
        record = node.backend.load_key_record()
        assert record is not None and (record.keeper_ids, record.threshold) == ((1, 2, 3, 4, 5), 3)
    finally:
        node.close()


def test_a_reload_moves_custody_and_removed_keepers_are_cleared(
    node: RotatingNode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="spike.nexus.lifecycle")
    node.keeper(4)
    node.lifecycle.move_custody([1, 2, 4], 2)
    assert "custody moves from keepers [1, 2, 3] (threshold 2) to keepers [1, 2, 4] (threshold 2)" in caplog.text
    node.run_for(INTERVAL * 10, stop=lambda: node.committed() and 3 not in node.custody.keeper_ids)
    assert node.backend.load_key_record().keeper_ids == (1, 2, 4)  # type: ignore[union-attr]
    assert node.keeper_machines[3].epochs == ()
    assert "keeper 3 (https://keeper-3.test:8443) is no longer in the keeper set" in node.logs()


# ---------------------------------------------------------------- the schedule


def test_rotate_every_rotates_by_itself_then_arms_the_next_a_period_later(tmp_path: Path) -> None:
    node = RotatingNode(tmp_path / "data", rotate_every=120.0)
    try:
        shown = status(node)
        assert shown["schedule"]["every"] == 120.0  # type: ignore[index]
        node.run_for(110.0)
        assert node.custody.record.epoch == 1  # type: ignore[union-attr]
        node.run_for(60.0, stop=node.committed)
        assert node.committed()
        committed_at = node.clock
        node.run_for(100.0)
        assert node.custody.record.epoch == 2  # type: ignore[union-attr]
        node.run_for(80.0, stop=lambda: node.committed(3))
        assert node.committed(3) and node.clock >= committed_at + 120.0
    finally:
        node.close()


# ---------------------------------------------------------------- several instances


def test_a_follower_follows_the_stored_rotation_and_adopts_the_commit_without_recovering(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two instances on one store (the follower's watch is shown what the leader's store holds)."""
    caplog.set_level(logging.INFO, logger="spike.nexus")
    leader = RotatingNode(tmp_path / "leader")
    follower = RotatingNode(tmp_path / "follower")  # the same key and record: one deployment
    try:
        follower.keeper_machines = leader.keeper_machines  # and the same keepers
        watch = ClusterWatch(follower.store, follower.api, follower.driver, follower.authorizer, 1.0)  # type: ignore[arg-type]
        ready_since = len(follower.reports)
        assert rotate(leader)[0] == 200
        watch.apply(leader.backend.cluster_state(), follower.clock)
        view = follower.custody.rotation
        assert view is not None and view.stage is RotationStage.FOLLOWING and view.to_epoch == 2
        watch.apply(leader.backend.cluster_state(), follower.clock)  # the same: followed once
        assert stages(follower).count(RotationStage.FOLLOWING) == 1
        follower.run_for(INTERVAL * 2)  # the follower never deals, never pushes its old epoch over the new one
        assert not [r for r in follower.requests if r.kind.value in ("deal", "push")]
        leader.run_for(INTERVAL * 6, stop=leader.committed)
        assert leader.committed()
        watch.apply(leader.backend.cluster_state(), follower.clock)
        assert follower.custody.phase is Phase.READY and follower.custody.record == leader.custody.record
        assert follower.custody.root_key == leader.custody.root_key
        assert "key rotation 1 -> 2 committed through another Nexus instance: its key, already held" in caplog.text
        assert stages(follower)[-1] is RotationStage.COMMITTED
        assert not [r for r in follower.reports[ready_since:] if isinstance(r, PhaseChanged)]  # READY throughout
    finally:
        leader.close()
        follower.close()


def test_a_newer_epoch_on_a_keeper_is_never_refuted_while_a_rotation_is_stored(tmp_path: Path) -> None:
    """NewerKeySeen is answered with follow_rotation, never confirm_record, while a pending rotation is stored."""
    leader = RotatingNode(tmp_path / "leader")
    follower = RotatingNode(tmp_path / "follower")
    try:
        follower.keeper_machines = leader.keeper_machines
        watch = ClusterWatch(follower.store, follower.api, follower.driver, follower.authorizer, 1.0)  # type: ignore[arg-type]
        for report in follower.reports:
            watch.report(report)
        leader.down.add(3)
        assert rotate(leader)[0] == 200
        leader.run_for(INTERVAL * 2, stop=lambda: dealt(leader, 1, 2))  # 1 and 2 hold epoch 2 (and 1 beside it)
        mark = len(follower.reports)
        follower.run_for(INTERVAL * 1.2)
        for report in follower.reports[mark:]:
            watch.report(report)
        watch.apply(leader.backend.cluster_state(), follower.clock)
        follower.run_for(INTERVAL * 2)
        assert not [r for r in follower.requests if r.kind.value in ("push", "deal")]
        assert all(2 in leader.keeper_machines[k].epochs for k in (1, 2))
    finally:
        leader.close()
        follower.close()


# ---------------------------------------------------------------- recovery files follow


def test_status_says_how_old_the_newest_recovery_export_is_and_warns_when_it_is_stale(node: RotatingNode) -> None:
    assert status(node)["recovery"] is None  # never exported: no field, and exit code 0 (as documented) ...
    never = decode(node.call(STATUS_PATH).body, StatusBody)
    assert exit_code(never) == 0
    # ... but the text says so (issue 18): without the files, losing Nexus and t keepers loses the key.
    assert "recovery shards: none exported for this key" in render(never, "n")
    exported = node.call(RECOVER_PATH, peer=TRUST.id_of(Role.PILOT_RECOVER))
    assert exported.status == 200 and json.loads(exported.body)["epoch"] == 1
    node.driver.dispatch()  # the export is recorded off the event loop
    shown = status(node)
    assert shown["recovery"]["epoch"] == 1 and shown["recovery"]["epochs_behind"] == 0  # type: ignore[index]
    assert "none exported" not in render(decode(node.call(STATUS_PATH).body, StatusBody), "n")
    assert rotate(node)[0] == 200
    node.run_for(INTERVAL * 6, stop=node.committed)
    assert node.committed()
    body = decode(node.call(STATUS_PATH).body, StatusBody)
    assert body.recovery is not None and (body.recovery.epoch, body.recovery.epochs_behind) == (1, 1)
    assert exit_code(body) == EXIT_RECOVERY_STALE
    assert "1 epoch(s) old: it no longer rebuilds the key; run `spike operator recover`" in render(body, "n")
    # What a restart keeps: the record of the export.
    node.restart()
    node.run_for(INTERVAL * 2, stop=lambda: node.custody.phase is Phase.READY)
    assert status(node)["recovery"]["epochs_behind"] == 1  # type: ignore[index]
    node.call(RECOVER_PATH, peer=TRUST.id_of(Role.PILOT_RECOVER))
    node.driver.dispatch()
    assert exit_code(decode(node.call(STATUS_PATH).body, StatusBody)) == 0


def test_epochs_since_counts_the_epochs_the_deployment_had_after_the_export() -> None:
    record, _ = seal_key(RootKey(bytes(range(1, 33))), epoch=7, threshold=2, keeper_ids=(1, 2, 3))
    with_gap = msgspec.structs.replace(record, history=((0, 2), (5, 6)))  # 3 and 4: given up, never in force
    assert epochs_since(with_gap, 7) == 0 and epochs_since(with_gap, 9) == 0
    assert epochs_since(with_gap, 6) == 1
    assert epochs_since(with_gap, 2) == 3  # 5, 6 and 7
    assert epochs_since(with_gap, 1) == 4


# ---------------------------------------------------------------- bootstrap --force


def test_bootstrap_force_during_a_rotation_deletes_it_and_epochs_are_not_reused(node: RotatingNode) -> None:
    node.down.update({2, 3})
    assert rotate(node)[0] == 200  # stored (epoch 2), stalled: only keeper 1 can be dealt
    node.run_for(INTERVAL)
    shown = status(node)
    assert shown["rotation"]["to_epoch"] == 2  # type: ignore[index]
    # What `spike bootstrap --force` picks: above the record, the high-water mark and the rotation under way.
    body = decode(node.call(STATUS_PATH).body, StatusBody)
    epoch = max(body.epoch or 0, body.highest_epoch or 0, body.rotation.to_epoch if body.rotation else 0) + 1
    assert epoch == 3
    fresh = RootKey(bytes(range(9, 41)))
    record, shares = seal_key(fresh, epoch=epoch, threshold=2, keeper_ids=(1, 2, 3))
    answer = node.call(BOOTSTRAP_INIT_PATH, InitRequest(record=record, replace=True), peer=TRUST.id_of(Role.BOOTSTRAP))
    assert answer.status == 200, answer.body
    assert node.backend.load_rotation_state()[0] is None  # the store deleted the stored rotation
    assert node.custody.rotation is None and stages(node)[-1] is RotationStage.ABANDONED
    for keeper_id, share in shares.items():  # what bootstrap then does: each keeper gets its shard
        node.keeper(keeper_id).handle(
            ApiRequest("POST", "/v1/store/contribute", TRUST.id_of(Role.BOOTSTRAP), encode(ShardContribution.of(share)))
        )
    node.down.clear()
    node.run_for(INTERVAL * 3, stop=lambda: node.custody.phase is Phase.READY)
    assert node.custody.phase is Phase.READY and node.custody.record == node.backend.load_key_record()
    assert node.custody.record.epoch == 3  # type: ignore[union-attr]
    assert rotate(node)[1]["rotation"]["to_epoch"] == 4  # type: ignore[index]


def test_secrets_and_ciphertexts_from_before_read_back_after_rotations_and_a_restart(node: RotatingNode) -> None:
    """The root key wraps the keyring only: values sealed before any number of rotations still open."""
    put = {"path": "app/db", "values": {"password": "before-the-rotation"}}
    assert node.call(SECRETS_PATH, put).status == 200
    sealed = node.call(CIPHER_ENCRYPT_PATH, {"plaintext": "aGVsbG8="})
    assert sealed.status == 200
    for epoch in (2, 3):
        assert rotate(node)[0] == 200
        node.run_for(INTERVAL * 6, stop=lambda epoch=epoch: node.committed(epoch))  # type: ignore[misc]
        assert node.committed(epoch)
        got = node.call(SECRETS_PATH, {"path": "app/db"}, action="get")
        assert got.status == 200 and json.loads(got.body)["data"] == {"password": "before-the-rotation"}
        opened = node.call(CIPHER_DECRYPT_PATH, json.loads(sealed.body))
        assert opened.status == 200 and json.loads(opened.body)["plaintext"] == "aGVsbG8="
    node.restart()
    node.run_for(INTERVAL * 2, stop=lambda: node.custody.phase is Phase.READY)
    got = node.call(SECRETS_PATH, {"path": "app/db"}, action="get")
    assert got.status == 200 and json.loads(got.body)["data"] == {"password": "before-the-rotation"}
    assert node.call(CIPHER_DECRYPT_PATH, json.loads(sealed.body)).status == 200


# ---------------------------------------------------------------- the data key


def test_data_key_rotation_adds_a_term_and_a_rewrap_moves_every_value_to_it(node: RotatingNode) -> None:
    for n in range(5):
        assert node.call(SECRETS_PATH, {"path": f"app/{n}", "values": {"v": str(n)}}).status == 200
    shown = status(node)["keyring"]
    assert isinstance(shown, dict)
    first = shown["term"]
    assert shown["values_by_term"] == {str(first): 5} and shown["rewrap_target"] is None
    code, body = rotate(node, {"data_key": True})
    assert code == 200 and body["data_term"] == first + 1 and "rewrap_target" not in body  # type: ignore[operator]
    assert node.call(SECRETS_PATH, {"path": "app/new", "values": {"v": "new"}}).status == 200
    counted = node.lifecycle.keyring_status()
    assert counted is not None and counted.term == first + 1  # type: ignore[operator]
    # A re-wrap moves the older values to the newest term in the background (the store's own thread).
    code, body = rotate(node, {"rewrap": True})
    assert code == 200 and body["rewrap_target"] == first + 1  # type: ignore[operator]
    wait_until_true(lambda: node.backend.keyring_status(fresh=True).rewrap_remaining == 0, "the re-wrap to finish")
    for n in range(5):
        got = node.call(SECRETS_PATH, {"path": f"app/{n}"}, action="get")
        assert got.status == 200 and json.loads(got.body)["data"] == {"v": str(n)}
    text = generate_latest(node.metrics.registry).decode()
    assert f"spike_data_key_term {first + 1}.0" in text and "spike_rewrap_remaining" in text


def test_a_data_key_rotation_is_refused_while_a_root_key_rotation_is_stored(node: RotatingNode) -> None:
    node.down.update({2, 3})
    assert rotate(node)[0] == 200
    code, body = rotate(node, {"data_key": True})
    assert code == 409 and "root key rotation" in str(body["reason"])
    assert node.call(ROTATE_PATH, {"abort": True, "data_key": True}).status == 400
    assert node.store.calls == ["persist", "data key"]


def wait_until_true(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
