"""Several Nexus instances: a keeper's newer epoch is adopted or refuted by what the database held (issue 14 L2).

`ClusterWatch.apply` gets the stored state and when the read of it began.  A
record newer than this instance's is adopted; this instance's own record
means no newer epoch existed then, so a keeper seen with one *before* the
read began holds garbage: the custody machine reports and re-seeds it.  A
sighting after the read began is left for the next read.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from spike.app.nexus.cluster_watch import ClusterWatch
from spike.app.store.backend import ClusterState
from spike.protocol import KeeperState, NewerKeySeen, Phase, RequestKind, Share
from tests.ops.ops_helpers import SHARES, Node, sealed, shard_answer


@pytest.fixture
def node(tmp_path: Path) -> Node:
    node = Node(tmp_path / "data")
    node.driver.submit_shard(SHARES[1])
    node.driver.submit_shard(SHARES[2])
    assert node.custody.phase is Phase.READY
    return node


def watch_of(node: Node) -> ClusterWatch:
    return ClusterWatch(node.store, node.api, node.driver, node.authorizer, 1.0)  # type: ignore[arg-type]


def keeper_3_shows(node: Node, watch: ClusterWatch, epoch: int) -> float:
    node.driver.tick(0.0)
    mark = len(node.reports)
    node.driver.answer(3, 200, shard_answer(Share(3, epoch, SHARES[3].secret_bytes())))
    for report in node.reports[mark:]:
        watch.report(report)
    [seen] = [r for r in node.reports[mark:] if isinstance(r, NewerKeySeen)]
    return seen.at


def state(node: Node) -> KeeperState:
    return next(v.state for v in node.custody.keepers() if v.keeper_id == 3)


def test_the_own_record_read_after_the_sighting_makes_it_garbage(node: Node) -> None:
    watch = watch_of(node)
    seen_at = keeper_3_shows(node, watch, 2**63 - 1)
    assert state(node) is KeeperState.NEWER_EPOCH and 3 not in node.driver.pending
    watch.apply(ClusterState(node.custody.record, 0), checked_at=seen_at - 0.001)  # began before: proves nothing
    assert state(node) is KeeperState.NEWER_EPOCH and 3 not in node.driver.pending
    watch.apply(ClusterState(node.custody.record, 0), checked_at=seen_at)
    assert state(node) is KeeperState.WRONG_SHARD
    assert node.driver.pending[3].kind is RequestKind.PUSH


def test_a_newer_record_in_the_database_is_adopted_not_refuted(node: Node) -> None:
    watch = watch_of(node)
    newer, _ = sealed(epoch=2)
    newer = newer.succeeding(node.custody.record)  # type: ignore[arg-type]
    seen_at = keeper_3_shows(node, watch, 2)
    mark = len(node.driver.sent)
    watch.apply(ClusterState(newer, 0), checked_at=seen_at + 0.5)
    assert node.custody.record == newer and node.custody.phase is Phase.RECOVERING
    assert [r.kind for r in node.driver.sent[mark:] if r.keeper_id == 3] == []  # polled again at once, not pushed
    node.driver.tick()
    assert [r.kind for r in node.driver.sent[mark:] if r.keeper_id == 3] == [RequestKind.POLL]
