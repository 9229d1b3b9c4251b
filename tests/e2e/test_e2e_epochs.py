"""Shards labelled with a key epoch the deployment never had (issue 14, L2), with real processes.

The bootstrap identity may contribute a shard to any keeper, with any label.
One labelled with epoch 2^63-1 used to make Nexus believe a newer key
existed somewhere: it never overwrote that keeper again, and once two of
three keepers held such shards, a restarted Nexus could only be helped by
`spike operator restore`.  Now Nexus knows the deployment never had that
epoch (its record is the newest, and with SQLite nobody else writes it), so
it reports the keeper and re-seeds it with its real shard; with PostgreSQL it
reads the stored record first.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from spike.protocol.wire import ShardContribution
from tests import pg_server
from tests.e2e.harness import Cluster, wait_until

pytestmark = pytest.mark.e2e

NEVER_HAD = 2**63 - 1  # the largest epoch the wire allows


def garbage(keeper_id: int, seed: int) -> ShardContribution:
    return ShardContribution(shard=list(random.Random(seed).randbytes(31) + b"\x01"), id=keeper_id, epoch=NEVER_HAD)


def keeper(status: dict[str, Any], keeper_id: int) -> dict[str, Any]:
    (view,) = [k for k in status["keepers"] if k["id"] == keeper_id]
    return view


def reseeded_since(before: dict[str, Any], keeper_ids: tuple[int, ...]) -> Callable[[dict[str, Any]], bool]:
    def check(status: dict[str, Any]) -> bool:
        return all(
            keeper(status, k)["state"] == "holding" and keeper(status, k)["reseeds"] > keeper(before, k)["reseeds"]
            for k in keeper_ids
        )

    return check


def test_a_never_had_epoch_is_reported_and_reseeded_and_a_restart_still_recovers(ready_cluster: Cluster) -> None:
    c = ready_cluster
    _, before = c.status()
    mark = len(c.nexus().text())
    for keeper_id in (2, 3):
        assert c.contribute(keeper_id, garbage(keeper_id, keeper_id)) == 200
    _, after = c.wait_status(reseeded_since(before, (2, 3)), "keepers 2 and 3 re-seeded with their real shards")
    assert after["redundancy"] == 1
    shards = c.read_shards()
    assert {k: s.epoch for k, s in shards.items()} == {1: 1, 2: 1, 3: 1}
    for keeper_id in (2, 3):
        said = re.escape(f"{c.keeper_label(keeper_id)}: holds a shard labelled key epoch {NEVER_HAD}, which this")
        c.wait_log(c.nexus(), said + " deployment never had", start=mark)
    # What used to need `spike operator restore`: a Nexus restarted now rebuilds the key from the keepers.
    c.kill("nexus")
    c.start_nexus()
    c.wait_ready(epoch=1)


def test_several_instances_check_the_stored_record_before_reseeding(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(database_url=pg_server.server().database("e2e_epochs"), nexus_count=2)
    c.start()
    assert c.bootstrap().returncode == 0
    before = {}
    for index in (1, 2):
        _, before[index] = c.wait_status(
            lambda s: s["phase"] == "ready" and s["redundancy"] == 1, "ready, all holding", nexus=index
        )
    assert c.contribute(3, garbage(3, 3)) == 200

    def reseeds() -> int:
        total = 0
        for index in (1, 2):
            _, status = c.wait_status(lambda s: True, "a status", nexus=index)
            total += keeper(status, 3)["reseeds"] - keeper(before[index], 3)["reseeds"]
        return total

    # Whichever instance sees it first reads the database, finds its own record, and re-seeds keeper 3.
    wait_until(lambda: reseeds() >= 1, "keeper 3 re-seeded by one of the instances")
    said = re.escape(f"{c.keeper_label(3)}: holds a shard labelled key epoch {NEVER_HAD}, which this deployment")
    wait_until(
        lambda: any(re.search(said, c.nexus(index).text()) for index in (1, 2)), "'never had' in an instance's log"
    )
    # Neither instance took the label for another instance's newer key, and they do not fight over keeper 3.
    deadline = time.monotonic() + 4 * c.poll_interval
    while time.monotonic() < deadline:
        assert {s.epoch for s in c.read_shards().values()} == {1}
        time.sleep(0.1)
    for index in (1, 2):
        _, status = c.wait_status(lambda s: s["redundancy"] == 1, "all holding", nexus=index)
        assert status["epoch"] == 1
