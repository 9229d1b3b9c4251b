"""Key rotation and rekey in the custody core (docs/key-lifecycle.md), on real keeper machines and a store.

Each test is one story: the sequence and what is stored before each step,
what a Nexus restarted in each stored state does, SPIKE's single-slot
keepers, giving a rotation up, moving custody to another keeper set, a
scheduled rotation, another instance's rotation, and the refusals.
"""

from __future__ import annotations

import msgspec
import pytest

from spike.protocol import (
    KEEPER_CONTRIBUTE_PATH,
    AbandonRotation,
    CommitRotation,
    KeeperLeft,
    KeeperState,
    KeyRecovered,
    LocalProtocolError,
    PendingRotation,
    PersistRotation,
    Phase,
    RemoteProtocolError,
    RequestKind,
    RootKey,
    RotationProgress,
    RotationRefused,
    RotationStage,
    SendRequest,
    ShamirError,
    ShardContribution,
    ShardRetired,
    decode,
    encode,
    seal_key,
)
from spike.protocol.nexus import DEAL_ROUNDS
from tests.core.core_helpers import of_type
from tests.core.rotation_helpers import Deployment, key_of


def committed(d: Deployment) -> bool:
    return d.nexus.rotation is None and d.nexus.record is not None and d.nexus.record.epoch > 1


# ---------------------------------------------------------------- the sequence


def test_a_rotation_stores_then_deals_then_commits_then_retires() -> None:
    d = Deployment(hold_store=True)
    pending = d.nexus.start_rotation(d.now)
    assert pending.from_epoch == 1 and pending.record.epoch == 2 and pending.record.had_epoch(1)
    d.run_for(20.0)  # the store has not answered: nothing of epoch 2 went out, polls went on at epoch 1
    [persist] = d.held
    assert isinstance(persist, PersistRotation) and persist.pending == pending
    assert all(msgspec.json.decode(r.body).get("epoch") == 1 for r in d.requests if r.body != b"{}")
    assert d.epochs() == {1: (1,), 2: (1,), 3: (1,)}

    d.release()  # stored: dealing begins at the keepers' next polls
    mark = len(d.requests)
    d.run_for(d.interval * 1.3)
    deals = [r for r in d.requests[mark:] if r.kind is RequestKind.DEAL]
    assert sorted(r.keeper_id for r in deals) == [1, 2, 3]
    for deal in deals:
        body = decode(deal.body, ShardContribution)
        assert (body.epoch, body.keep) == (2, 1)
    [commit] = d.held
    assert isinstance(commit, CommitRotation) and commit.pending == pending
    assert d.epochs() == {1: (2, 1), 2: (2, 1), 3: (2, 1)}  # everyone holds both until the commit is durable
    d.run_for(20.0)
    assert d.epochs() == {1: (2, 1), 2: (2, 1), 3: (2, 1)}  # still: the commit is not durable

    d.release()
    assert d.nexus.record == pending.record and d.nexus.root_key == d.nexus.root_key  # READY with the new key
    assert d.nexus.phase is Phase.READY
    d.run_for(d.interval * 1.3)
    assert d.epochs() == {1: (2,), 2: (2,), 3: (2,)}
    assert sorted((r.keeper_id, r.epoch) for r in of_type(d.reports, ShardRetired)) == [(1, 1), (2, 1), (3, 1)]
    stages = [r.stage for r in of_type(d.reports, RotationProgress)]
    assert stages[0] is RotationStage.PERSISTING and stages[-1] is RotationStage.COMMITTED
    assert RotationStage.COMMITTING in stages


def test_the_new_key_is_the_one_stored_and_every_key_is_wiped_when_done() -> None:
    d = Deployment()
    new = key_of(99)
    pending = d.nexus.start_rotation(d.now, key=new)
    assert pending.open_new(d.key) == new and pending.open_old(new) == d.key
    held = d.nexus.rotation_key
    assert held == new and held is not new  # a copy: the caller's key is the caller's
    old = d.nexus.root_key
    d.run_for(30.0, stop=lambda: committed(d))
    assert d.nexus.root_key == new
    assert not any(old._buf), "the old key is wiped after the commit"
    with pytest.raises(LocalProtocolError, match="no rotation key"):
        _ = d.nexus.rotation_key


def test_a_keeper_restarted_during_dealing_gets_its_old_shard_first_then_the_new() -> None:
    d = Deployment(hold_store=True)
    d.nexus.start_rotation(d.now)
    d.run_for(0.1)
    d.release()
    d.restart_keeper(3)
    d.run_for(d.interval * 2.2, stop=lambda: d.keepers[3].holds_shard)
    assert d.epochs()[3] == (1,)  # re-seeded with the epoch in force
    d.run_for(d.interval * 1.3, stop=lambda: len(d.keepers[3].epochs) == 2)
    assert d.epochs()[3] == (2, 1)  # then dealt, keeping it: a keeper holding the new shard holds the old one


# ---------------------------------------------------------------- a restarted Nexus, in each stored state


def test_a_restart_before_the_pending_rotation_was_stored_leaves_the_old_key_alone() -> None:
    d = Deployment(hold_store=True)
    d.nexus.start_rotation(d.now)
    d.restart()  # the PersistRotation was never performed
    d.hold_store = False
    d.run_for(d.interval * 3)
    assert d.nexus.phase is Phase.READY and d.nexus.record is not None and d.nexus.record.epoch == 1
    assert d.nexus.rotation is None and d.epochs() == {1: (1,), 2: (1,), 3: (1,)}


def test_a_restart_while_dealing_rebuilds_the_old_key_from_either_slot_and_resumes_the_same_rotation() -> None:
    d = Deployment(hold_store=True)
    pending = d.nexus.start_rotation(d.now)
    d.run_for(0.1)
    d.release()
    d.run_for(d.interval * 1.3, stop=lambda: len(d.keepers[2].epochs) == 2 and len(d.keepers[1].epochs) == 2)
    assert d.epochs()[1] == d.epochs()[2] == (2, 1)
    d.down.add(3)  # one keeper out of reach: two of three left, and both hold epoch 2 as their latest
    d.restart()
    d.hold_store = False
    d.run_for(2.0)
    recovered = of_type(d.reports, KeyRecovered)[-1]
    assert (recovered.epoch, d.nexus.phase) == (1, Phase.READY)  # reads named epoch 1: the old slot answered
    assert d.nexus.root_key == d.key
    assert d.nexus.rotation_key == pending.open_new(d.key)  # the same new key, opened from the store
    d.down.clear()
    d.run_for(60.0, stop=lambda: committed(d))
    assert d.nexus.record == pending.record


def test_a_restart_with_single_slot_keepers_rebuilds_whichever_key_has_its_threshold() -> None:
    d = Deployment(go_keepers=frozenset({1, 2, 3}), hold_store=True)
    pending = d.nexus.start_rotation(d.now)
    d.run_for(0.1)
    d.release()
    new_key = pending.open_new(d.key)
    d.run_for(d.interval * 2.2, stop=lambda: d.holders(new_key, pending.record) >= {1, 2})
    assert d.holders(d.key, d.store.current()) == {3}  # 1 and 2 lost their old shard when they took the new one
    assert d.holders(pending.open_new(d.key), pending.record) >= {1, 2}
    d.down.add(3)
    d.restart()
    d.run_for(2.0)
    recovered = of_type(d.reports, KeyRecovered)[-1]
    assert recovered.epoch == 2  # only the new key had its threshold: the old one is opened from the store
    assert d.nexus.root_key == d.key and d.nexus.record is not None and d.nexus.record.epoch == 1


def test_a_restart_after_the_commit_recovers_the_new_key_and_retires_the_old_shards() -> None:
    d = Deployment(hold_store=True)
    d.nexus.start_rotation(d.now)
    d.run_for(0.1)
    d.release()
    d.run_for(d.interval * 2, stop=lambda: bool(d.held))
    [commit] = d.held
    assert isinstance(commit, CommitRotation)
    assert d.store.commit(commit.pending)  # durable, and Nexus dies before it hears so
    d.restart()
    d.hold_store = False
    d.run_for(d.interval * 3)
    assert d.nexus.phase is Phase.READY and d.nexus.record == commit.pending.record
    assert d.epochs() == {1: (2,), 2: (2,), 3: (2,)}


def test_a_keeper_that_missed_the_rotation_is_stale_and_reseeded_with_the_new_epoch() -> None:
    d = Deployment()
    d.down.add(3)
    d.nexus.start_rotation(d.now)
    d.run_for(d.interval * (DEAL_ROUNDS + 2), stop=lambda: committed(d))
    assert committed(d) and d.epochs()[3] == (1,)
    d.down.clear()
    d.run_for(d.interval * 1.3, stop=lambda: d.epochs()[3] == (2,))
    assert d.epochs()[3] == (2,)  # the push of epoch 2 overwrote its stale shard


# ---------------------------------------------------------------- SPIKE's single-slot keepers


def test_a_rotation_that_could_leave_single_slot_keepers_with_neither_key_is_refused() -> None:
    d = Deployment(threshold=3, go_keepers=frozenset({1, 2, 3}))
    with pytest.raises(RotationRefused, match=r"3 keepers, threshold 3: keepers 1, 2, 3 keep one shard only.*needs 5"):
        d.nexus.start_rotation(d.now)
    assert d.nexus.rotation is None and of_type(d.nexus.effects(), PersistRotation) == []


def test_single_slot_keepers_may_rotate_with_n_at_least_2t_minus_1() -> None:
    d = Deployment(threshold=2, go_keepers=frozenset({1, 2, 3}))
    d.nexus.start_rotation(d.now)
    d.run_for(60.0, stop=lambda: committed(d))
    assert committed(d) and d.epochs() == {1: (None,), 2: (None,), 3: (None,)}
    assert not [r for r in d.requests if r.kind is RequestKind.FORGET]  # nothing to retire: overwritten


def test_two_slot_keepers_may_rotate_whatever_n_and_t() -> None:
    d = Deployment(ids=(1, 2, 3), threshold=3)
    d.nexus.start_rotation(d.now)
    d.run_for(60.0, stop=lambda: committed(d))
    assert committed(d)


# ---------------------------------------------------------------- giving a rotation up


def test_an_abandoned_rotation_burns_its_epoch_and_its_shards_are_retired() -> None:
    d = Deployment(hold_store=True)
    pending = d.nexus.start_rotation(d.now)
    d.run_for(0.1)
    d.release()
    d.run_for(d.interval * 1.3, stop=lambda: len(d.keepers[1].epochs) == 2)
    d.nexus.abort_rotation(d.now)
    d.run_for(0.1)
    [abandon] = d.held
    assert isinstance(abandon, AbandonRotation) and abandon.pending == pending
    d.release()
    assert d.store.highest == 2 and d.nexus.highest_epoch == 2 and d.nexus.rotation is None
    d.run_for(d.interval * 2)
    assert d.epochs() == {1: (1,), 2: (1,), 3: (1,)}
    again = d.nexus.start_rotation(d.now)
    assert again.record.epoch == 3  # epochs are never used twice


def test_a_restart_after_an_abandon_still_finds_old_shards_behind_abandoned_ones() -> None:
    d = Deployment(hold_store=True)
    d.nexus.start_rotation(d.now)
    d.run_for(0.1)
    d.release()
    d.run_for(d.interval * 1.3, stop=lambda: len(d.keepers[1].epochs) == len(d.keepers[2].epochs) == 2)
    d.nexus.abort_rotation(d.now)
    d.run_for(0.01)
    d.release()
    d.down.add(3)
    d.restart()
    d.run_for(2.0)
    assert d.nexus.phase is Phase.READY and d.nexus.root_key == d.key


def test_giving_up_is_refused_once_a_single_slot_keeper_took_its_new_shard() -> None:
    d = Deployment(go_keepers=frozenset({3}), hold_store=True)
    d.nexus.start_rotation(d.now)
    d.run_for(0.1)
    d.down.add(1)  # so that the rotation does not commit meanwhile
    d.release()
    d.run_for(d.interval * 2.2, stop=lambda: d.nexus._keepers[3].took_new)
    with pytest.raises(RotationRefused, match="keepers 3 keep one shard only and took their new one"):
        d.nexus.abort_rotation(d.now)


# ---------------------------------------------------------------- rekey


def test_a_rekey_moves_custody_to_another_set_and_threshold() -> None:
    d = Deployment(ids=(1, 2, 3), threshold=2)
    d.keeper(4), d.keeper(5)  # new hosts, empty
    d.nexus.start_rotation(d.now, keeper_ids=[2, 3, 4, 5], threshold=3)
    assert 4 not in d.nexus.keeper_ids  # joins once the rotation is stored
    d.run_for(0.01)
    assert {4, 5} <= set(d.nexus.keeper_ids)
    done = {1: (), 2: (2,), 3: (2,), 4: (2,), 5: (2,)}
    d.run_for(90.0, stop=lambda: committed(d) and 1 not in d.nexus.keeper_ids and d.epochs() == done)
    record = d.nexus.record
    assert record is not None and (record.keeper_ids, record.threshold) == ((2, 3, 4, 5), 3)
    assert d.nexus.keeper_ids == (2, 3, 4, 5)  # keeper 1 was cleared and left the poll list
    assert d.epochs() == {1: (), 2: (2,), 3: (2,), 4: (2,), 5: (2,)}
    assert [r.keeper_id for r in of_type(d.reports, KeeperLeft)] == [1]


def test_a_restart_with_a_new_configuration_recovers_with_the_old_set_then_rekeys() -> None:
    d = Deployment(ids=(1, 2, 3), threshold=2, rekey=True)
    d.keeper(4), d.keeper(5)  # new hosts, empty
    d.restart(ids=[1, 2, 3, 4, 5], threshold=3)
    assert d.nexus.keeper_ids == (1, 2, 3) and d.nexus.threshold == 2  # the stored record's, until the rekey
    d.run_for(120.0, stop=lambda: committed(d) and d.nexus.keeper_ids == (1, 2, 3, 4, 5))
    record = d.nexus.record
    assert record is not None and (record.keeper_ids, record.threshold) == ((1, 2, 3, 4, 5), 3)


def test_without_rekey_a_record_for_other_keepers_is_refused_as_before() -> None:
    d = Deployment()
    with pytest.raises(LocalProtocolError, match="configured are"):
        d.restart(ids=[1, 2, 3, 4])


# ---------------------------------------------------------------- scheduled rotation


def test_a_scheduled_rotation_is_a_deadline_and_starts_when_ready() -> None:
    d = Deployment()
    d.nexus.rotate_at(d.now + 100.0)
    assert d.nexus.next_deadline() <= d.now + 100.0
    d.run_for(99.0)
    assert d.nexus.rotation is None
    d.run_for(2.0)
    assert d.nexus.rotation is not None
    d.run_for(60.0, stop=lambda: committed(d))
    assert committed(d)
    d.nexus.rotate_at(d.now + 10.0)
    d.nexus.rotate_at(None)  # disarmed
    d.run_for(30.0)
    assert d.nexus.record is not None and d.nexus.record.epoch == 2


def test_a_scheduled_rotation_that_is_refused_says_why() -> None:
    d = Deployment(threshold=3, go_keepers=frozenset({1, 2, 3}))
    d.nexus.rotate_at(d.now)
    d.run_for(0.1)
    [report] = of_type(d.reports, RotationProgress)
    assert report.stage is RotationStage.NOT_STARTED and "keep one shard only" in report.detail


def test_a_scheduled_rotation_due_during_a_rotation_is_satisfied_by_its_commit() -> None:
    """The schedule asks for one rotation per period: one that came due meanwhile is the one just committed."""
    d = Deployment(hold_store=True)
    d.nexus.start_rotation(d.now)
    d.run_for(0.01)
    d.nexus.rotate_at(d.now)  # comes due while the operator's rotation is still being stored
    d.run_for(1.0)
    d.release()
    d.hold_store = False
    d.run_for(60.0, stop=lambda: committed(d))
    assert committed(d)
    d.run_for(d.interval * 4)
    assert d.nexus.rotation is None and d.nexus.record is not None and d.nexus.record.epoch == 2
    assert not [e for e in d.held if isinstance(e, PersistRotation)]


def test_a_follower_whose_schedule_came_due_while_following_does_not_rotate_again_at_the_commit() -> None:
    """With several instances, each arms the same period: the leader's rotation is the follower's too.

    On the old code the follower's due timer started a second rotation the moment it adopted the
    leader's commit: two rotations per period, one right after the other.
    """
    d = Deployment()
    leader = d.nexus
    follower = d.start()
    d.run_for(1.0)
    d.nexus = leader
    pending = leader.start_rotation(d.now)
    d.run_for(0.01)
    follower.follow_rotation(pending, d.now)
    follower.rotate_at(d.now)  # its own schedule comes due while it follows
    d.nexus = follower
    d.run_for(1.0)
    assert follower.rotation is not None and follower.rotation.stage is RotationStage.FOLLOWING
    d.nexus = leader
    d.run_for(60.0, stop=lambda: committed(d))
    d.nexus = follower
    follower.effects()
    assert follower.initialise(pending.record, d.now, replace=True)
    assert follower.phase is Phase.READY and follower.rotation is None
    assert not [e for e in follower.effects() if isinstance(e, PersistRotation)]


def test_a_follower_configured_for_another_set_does_not_move_custody_back() -> None:
    """Two instances configured for different sets would rekey back and forth: a followed commit never chains one."""
    d = Deployment(ids=(1, 2, 3), threshold=2)
    d.keeper(4)
    leader = d.nexus
    follower = d.start()  # configured for (1, 2, 3) like the record, then the leader moves custody to (1, 2, 4)
    d.run_for(1.0)
    d.nexus = leader
    pending = leader.start_rotation(d.now, keeper_ids=[1, 2, 4])
    d.run_for(0.01)
    follower.follow_rotation(pending, d.now)
    d.run_for(60.0, stop=lambda: committed(d))
    d.nexus = follower
    follower.retarget(d.now, [1, 2, 3], 2)  # its configuration says (1, 2, 3): due once the rotation is done
    follower.effects()
    assert follower.initialise(pending.record, d.now, replace=True)
    assert follower.phase is Phase.READY and follower.record == pending.record
    assert follower.rotation is None
    assert not [e for e in follower.effects() if isinstance(e, PersistRotation)]


# ---------------------------------------------------------------- moving custody on a reload


def test_retarget_while_ready_moves_custody_at_once() -> None:
    d = Deployment(ids=(1, 2, 3), threshold=2)
    d.keeper(4), d.keeper(5)
    assert d.nexus.retarget(d.now, [1, 2, 3, 4, 5], 3)
    assert d.nexus.rotation is not None and d.nexus.rotation.keeper_ids == (1, 2, 3, 4, 5)
    d.run_for(120.0, stop=lambda: committed(d) and d.nexus.keeper_ids == (1, 2, 3, 4, 5))
    record = d.nexus.record
    assert record is not None and (record.keeper_ids, record.threshold) == ((1, 2, 3, 4, 5), 3)
    assert not d.nexus.retarget(d.now, [1, 2, 3, 4, 5], 3)  # already there: nothing to do


def test_retarget_during_a_rotation_moves_custody_after_it() -> None:
    d = Deployment(ids=(1, 2, 3), threshold=2)
    d.keeper(4)
    d.nexus.start_rotation(d.now)
    d.run_for(0.01)
    assert d.nexus.retarget(d.now, [1, 2, 3, 4], 2)
    d.run_for(120.0, stop=lambda: committed(d) and d.nexus.keeper_ids == (1, 2, 3, 4))
    record = d.nexus.record
    assert record is not None and record.epoch == 3 and record.keeper_ids == (1, 2, 3, 4)


def test_retarget_while_recovering_moves_custody_once_the_key_is_rebuilt() -> None:
    d = Deployment(ids=(1, 2, 3), threshold=2)
    d.keeper(4)
    d.restart()
    assert d.nexus.phase is Phase.RECOVERING
    assert d.nexus.retarget(d.now, [1, 2, 4], 2)
    assert d.nexus.rotation is None
    d.run_for(120.0, stop=lambda: committed(d) and d.nexus.keeper_ids == (1, 2, 4))
    record = d.nexus.record
    assert record is not None and record.keeper_ids == (1, 2, 4) and d.epochs()[3] == ()


def test_retarget_refuses_bad_parameters_and_changes_nothing() -> None:
    d = Deployment()
    with pytest.raises(ShamirError):
        d.nexus.retarget(d.now, [1, 2], 3)
    assert d.nexus.rotation is None
    d.nexus.start_rotation(d.now)  # the configured set is still (1, 2, 3), threshold 2
    assert d.nexus.rotation is not None and d.nexus.rotation.keeper_ids == (1, 2, 3)


# ---------------------------------------------------------------- another instance's rotation


def test_a_follower_never_deals_and_adopts_the_commit_without_recovering() -> None:
    d = Deployment(go_keepers=frozenset({1, 2, 3}))
    leader = d.nexus
    follower = d.start()  # a second instance on the same store and keepers
    d.nexus = leader
    pending = leader.start_rotation(d.now)
    d.run_for(0.01)
    follower.follow_rotation(pending, d.now)  # the follower is not READY yet: it learns the new key later
    d.nexus = follower
    d.run_for(2.0)
    assert follower.phase is Phase.READY and follower.rotation_key == pending.open_new(d.key)
    assert not [e for e in follower.effects() if isinstance(e, PersistRotation)]
    d.nexus = leader
    d.run_for(60.0, stop=lambda: committed(d))
    d.nexus = follower
    mark = len(d.requests)
    d.run_for(d.interval * 2)
    assert not [r for r in d.requests[mark:] if r.path == KEEPER_CONTRIBUTE_PATH]  # never pushed the old epoch
    assert follower.initialise(pending.record, d.now, replace=True)
    assert follower.phase is Phase.READY and follower.record == pending.record
    assert follower.root_key == pending.open_new(d.key)


# ---------------------------------------------------------------- refusals change nothing


def test_start_rotation_refuses_what_it_cannot_do_and_changes_nothing() -> None:
    d = Deployment()
    d.nexus.forget(d.now)
    with pytest.raises(LocalProtocolError, match="needs the root key"):
        d.nexus.start_rotation(d.now)
    d.run_for(d.interval * 2, stop=lambda: d.nexus.phase is Phase.READY)
    with pytest.raises(ShamirError):
        d.nexus.start_rotation(d.now, keeper_ids=[1, 2], threshold=3)
    d.nexus.start_rotation(d.now)
    with pytest.raises(LocalProtocolError, match="already under way"):
        d.nexus.start_rotation(d.now)
    with pytest.raises(LocalProtocolError, match="not expected"):
        d.nexus.rotation_committed(d.now)


def test_a_tampered_pending_rotation_is_refused() -> None:
    d = Deployment()
    pending = d.nexus.start_rotation(d.now, key=key_of(5))
    with pytest.raises(RemoteProtocolError, match="does not open"):
        pending.open_new(key_of(6))
    flipped = msgspec.structs.replace(pending, new_key=bytes(b ^ 1 for b in pending.new_key))
    with pytest.raises(RemoteProtocolError, match="does not open"):
        flipped.open_new(d.key)
    other, _ = seal_key(key_of(7), epoch=1, threshold=2, keeper_ids=(1, 2, 3))
    assert not pending.starts_from(other)
    with pytest.raises(RemoteProtocolError):
        msgspec.structs.replace(pending, from_epoch=2).validate()
    assert decode(encode(pending), PendingRotation).validate() == pending


def test_a_keeper_removed_by_configuration_is_polled_until_it_is_cleared() -> None:
    d = Deployment(ids=(1, 2, 3), threshold=2)
    d.down.add(3)
    d.nexus.start_rotation(d.now, keeper_ids=[1, 2])
    d.run_for(d.interval * (DEAL_ROUNDS + 3), stop=lambda: committed(d))
    assert committed(d)
    d.run_for(d.interval * 2)
    assert 3 in d.nexus.keeper_ids  # unreachable: still polled
    view = next(v for v in d.nexus.keepers() if v.keeper_id == 3)
    assert view.state is KeeperState.UNREACHABLE
    d.down.clear()
    d.run_for(d.interval * 2, stop=lambda: 3 not in d.nexus.keeper_ids)
    assert 3 not in d.nexus.keeper_ids and d.epochs()[3] == ()


def test_golden_vector_of_the_stored_pending_rotation() -> None:
    """Stored pending rotations are read back by later versions and other instances: these bytes are the format."""
    old, new = RootKey(bytes(range(1, 33))), RootKey(bytes(range(2, 34)))
    old_record, _ = seal_key(old, epoch=1, threshold=2, keeper_ids=[1, 2, 3])
    new_record, _ = seal_key(new, epoch=2, threshold=2, keeper_ids=[1, 2, 3])
    pending = PendingRotation.seal(old, old_record, new, new_record)
    assert pending.new_key.hex() == "136aab0fe6ca8b4b1ea28c33d39483928543281357f5c9f3af29884d7bf84722"
    assert pending.old_key.hex() == "fb6ca86807437c775b140f9f0c907d7c4e6e3b6f25983a260cdb1d3918f71ae2"
    assert pending.record.history == ((0, 1),) and pending.from_check == old_record.check
    stored = encode(pending)
    assert list(msgspec.json.decode(stored)) == ["record", "from_epoch", "from_check", "new_key", "old_key"]
    again = decode(stored, PendingRotation).validate()
    assert again.open_new(old) == new and again.open_old(new) == old


def test_a_read_about_the_new_epoch_in_flight_at_the_commit_still_counts() -> None:
    """Found by the simulation: dropping every request at the commit delayed a re-seed by a whole interval."""
    d = Deployment(hold_store=True)
    d.nexus.start_rotation(d.now)
    d.run_for(0.01)
    d.release()
    d.run_for(d.interval * 2, stop=lambda: bool(d.held))
    [commit] = d.held
    d.held.clear()
    d.restart_keeper(2)  # empty now; its next poll is about epoch 2
    rig_request: SendRequest | None = None
    # Drive by hand: take keeper 2's next poll, acknowledge the commit, then answer the poll.
    while rig_request is None:
        d.now = d.nexus.next_deadline()
        d.nexus.handle_timer(d.now)
        for effect in d.nexus.effects():
            if isinstance(effect, SendRequest) and effect.keeper_id == 2 and effect.kind is RequestKind.POLL:
                rig_request = effect
            elif isinstance(effect, SendRequest):
                d.nexus.receive(d.network(effect), d.now)
    assert rig_request.request_id in d.nexus._inflight
    assert msgspec.json.decode(rig_request.body) == {"epoch": 2}
    assert d.store.commit(commit.pending)
    d.nexus.rotation_committed(d.now, commit.pending)
    d.nexus.effects()
    d.nexus.receive(d.network(rig_request), d.now + 0.01)
    pushes = [e for e in d.nexus.effects() if isinstance(e, SendRequest) and e.kind is RequestKind.PUSH]
    assert [p.keeper_id for p in pushes] == [2]  # re-seeded at once with epoch 2, not at its next poll
    assert decode(pushes[0].body, ShardContribution).epoch == 2
