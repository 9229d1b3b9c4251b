"""Two Nexus instances on one PostgreSQL rotating the root key at once: exactly one rotates, the other follows.

Real processes (three keepers, two Nexus, tests/pg_server.py's database).  Both
instances are asked to rotate in the same instant: the store's compare-and-set
lets exactly one rotation in; the other instance's request is refused with the
reason, it follows the stored rotation (never dealing, never pushing its old epoch
over a keeper's new one), and it takes the committed record without a restart.
Writers go through both instances meanwhile, and everything acknowledged reads back
from both.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import msgspec
import pytest

from spike.app.api.messages import ROTATE_PATH, RotateRequest, RotateResponse
from spike.app.commands.client import NexusError
from tests import pg_server
from tests.e2e.harness import Cluster
from tests.e2e.lifecycle_helpers import ROTATION_TIMEOUT, Secrets, settled, writing

pytestmark = pytest.mark.e2e


@pytest.fixture
def pair(make_cluster: Callable[..., Cluster]) -> Cluster:
    if pg_server.find_bindir() is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    cluster = make_cluster(database_url=pg_server.server().database("rot"), nexus_count=2)
    cluster.start()
    return cluster


def test_two_instances_asked_to_rotate_at_once_make_one_rotation(pair: Cluster) -> None:
    c = pair
    assert c.bootstrap().returncode == 0
    c.wait_ready(nexus=1)
    c.wait_ready(nexus=2)
    book = Secrets()
    book.put(c, 10, "one", nexus=1)
    book.put(c, 10, "two", nexus=2)
    stop = threading.Event()
    writers = [writing(c, book, f"during-{i}", stop, nexus=i) for i in (1, 2)]
    # Both requests in the same instant (in this process: a CLI process takes most of a second to start).
    results: dict[int, tuple[int, dict[str, object]]] = {}
    gate = threading.Barrier(2)

    def ask(nexus: int) -> None:
        with c.client(nexus=nexus, timeout=30.0) as client:
            gate.wait()
            try:
                answer = client.call(ROTATE_PATH, RotateRequest(), RotateResponse)
            except NexusError as exc:
                results[nexus] = (exc.status, {"error": str(exc)})
            else:
                results[nexus] = (200, msgspec.to_builtins(answer))

    askers = [threading.Thread(target=ask, args=(i,)) for i in (1, 2)]
    try:
        for thread in askers:
            thread.start()
        for thread in askers:
            thread.join(timeout=60)
        won = [i for i, (status, _) in results.items() if status == 200]
        lost = [i for i, (status, _) in results.items() if status != 200]
        assert len(won) == 1 and len(lost) == 1, results
        status, body = results[lost[0]]
        assert status == 409, results
        assert "not started: another key rotation is stored" in str(body["error"]) or (
            "is under way (carried out by another Nexus instance)" in str(body["error"])
        ), results
        for i in (1, 2):
            settled(c, 2, nexus=i)
    finally:
        stop.set()
        for thread in writers:
            thread.join(timeout=10)
    # The other instance followed: it took the new key as it was (no recovery, so no moment without it),
    # and never dealt or pushed its old epoch over a keeper's new one.
    follower = c.nexus(lost[0]).text()
    assert "key rotation 1 -> 2 committed through another Nexus instance: its key, already held" in follower
    assert "recovering the new one from keepers" not in follower
    assert "dealing the new shards" not in follower and "re-seeded" not in follower
    for i in (1, 2):
        book.check(c, nexus=i)
    assert len(book.acked) > 20


def test_the_follower_takes_the_commit_without_a_restart_and_rotates_next(pair: Cluster) -> None:
    c = pair
    assert c.bootstrap().returncode == 0
    c.wait_ready(nexus=1)
    c.wait_ready(nexus=2)
    book = Secrets()
    book.put(c, 10, "before")
    assert c.rotate(nexus=1).returncode == 0
    settled(c, 2, nexus=2)
    book.check(c, nexus=2)
    result = c.rotate(nexus=2)  # the other instance rotates next, from the epoch it took over
    assert result.returncode == 0 and "key rotation 2 -> 3 stored" in result.stdout, result
    c.wait_status(lambda s: s["epoch"] == 3 and s["rotation"] is None, "instance 1 at epoch 3", ROTATION_TIMEOUT, 1)
    book.put(c, 5, "after", nexus=2)
    book.check(c, nexus=1)
    book.check(c, nexus=2)
