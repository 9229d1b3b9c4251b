"""Key rotation and rekey with real processes: the CLI, SIGKILL of Nexus between each pair of steps, keepers
killed during a rotation, moving custody from 3 keepers to 5 (threshold 2 to 3), and every secret read back.

Nexus is stopped at a named step by the test build's crash point: started with
``SPIKE_TEST_CRASH_AT=<point>``, it SIGKILLs itself there (spike.app.config.CRASH_POINTS;
read only when spike runs from its sources).  It is then started again without it, and
must come back holding exactly one usable key, the old or the new one, never neither:
READY, every acknowledged secret readable, the rotation either gone or carried to its
commit, and a next rotation possible.
"""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Callable

import pytest

from spike.app.config import CRASH_POINTS
from tests.e2e.harness import Cluster
from tests.e2e.lifecycle_helpers import ROTATION_TIMEOUT, Secrets, settled, writing

pytestmark = pytest.mark.e2e

# ---------------------------------------------------------------- the CLI


def test_operator_rotate_through_the_cli_says_each_step_and_every_secret_reads_back(ready_cluster: Cluster) -> None:
    c = ready_cluster
    book = Secrets()
    book.put(c, 20, "before")
    stop = threading.Event()
    thread = writing(c, book, "during", stop)
    try:
        result = c.rotate()
    finally:
        stop.set()
        thread.join(timeout=10)
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert lines[0].startswith("key rotation 1 -> 2 stored: dealing new shards to keepers 1, 2, 3 at their polls")
    assert lines[-1] == "root key rotated: epoch 2 is in force; keepers forget epoch 1 at their next polls"
    assert result.stderr == ""
    settled(c, 2)
    book.check(c)
    assert len(book.acked) > 20
    # The rotation's lines in Nexus's log: one per step, nothing about key or shard bytes (the hygiene sweep).
    log = c.nexus().text()
    assert log.count("key rotation 1 -> 2 started") == 1 and log.count("root key rotated: epoch 2") == 1
    status_line = c.run("status")
    assert status_line.returncode == 0 and "root key epoch 2" in status_line.stdout


def test_the_cli_says_why_a_rotation_is_refused_and_exits_1(ready_cluster: Cluster) -> None:
    c = ready_cluster
    for k in (2, 3):
        c.keeper(k).pause()  # dealing cannot finish: a rotation stays under way
    try:
        started = c.rotate("--no-wait")
        assert started.returncode == 0, started
        assert started.stdout.splitlines()[-1] == "`spike status` shows its progress"
        again = c.rotate()
        assert again.returncode == 1 and again.stdout == ""
        assert again.stderr.startswith("spike operator: the request conflicts with the current state: a key rotation")
        assert re.search(
            r"1 -> 2 is under way \(dealing: [12] more keeper\(s\) must show their new shard\)", again.stderr
        )
        shown = c.run("status")
        assert "key rotation 1 -> 2: dealing" in shown.stdout
        aborted = c.rotate("--abort")
        assert aborted.returncode == 0, aborted
        assert aborted.stdout.startswith("key rotation given up: epoch 1 stays in force")
    finally:
        for k in (2, 3):
            c.keeper(k).resume()
    not_superuser = c.run("operator", "rotate", identity="pilot-recover")
    assert not_superuser.returncode == 1 and "refused this identity" in not_superuser.stderr
    _, body = c.wait_status(lambda s: s["rotation"] is None, "no rotation")
    assert body["epoch"] == 1 and body["highest_epoch"] == 2
    result = c.rotate()
    assert result.returncode == 0 and "key rotation 1 -> 3 stored" in result.stdout  # epoch 2 is burned


# ---------------------------------------------------------------- SIGKILL of Nexus at every step

# For each crash point: the epoch in force once the restarted Nexus has settled.
AFTER_RESTART = {
    "rotation-store-before": 1,  # nothing stored: as if never asked
    "rotation-stored": 2,  # stored: resumed with the same key, committed
    "rotation-dealing": 2,
    "rotation-commit-before": 2,
    "rotation-committed": 2,  # committed: recovered at epoch 2 from the new shards
    "rotation-retiring": 2,
    "rotation-abandon-before": 2,  # still stored: resumed, and committed once the keepers are back
    "rotation-abandoned": 1,  # gone, its epoch burned; keepers told to forget its shards
}


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_nexus_killed_at_each_step_comes_back_with_one_usable_key(cluster: Cluster, point: str) -> None:
    c = cluster
    c.start_ready()
    book = Secrets()
    book.put(c, 10, "before")
    c.kill("nexus")
    c.start_nexus({"SPIKE_TEST_CRASH_AT": point})
    c.wait_ready(epoch=1)
    abandoning = point.startswith("rotation-abandon")
    if abandoning:
        for k in (2, 3):
            c.keeper(k).pause()  # keeps its shard, answers nothing: only keeper 1 is dealt, dealing stalls
        assert c.rotate("--no-wait").returncode == 0
        c.wait_status(lambda s: s["rotation"] is not None and s["rotation"]["dealt"] == [1], "keeper 1 dealt")
        c.rotate("--abort")  # Nexus dies during it: the command's own outcome does not matter
    else:
        c.rotate()  # likewise
    assert c.wait_exit(c.nexus()) == -signal.SIGKILL
    assert f"stopping with SIGKILL at {point}" in c.nexus().text()
    if abandoning:
        for k in (2, 3):
            c.keeper(k).resume()
    c.start_nexus()
    epoch = AFTER_RESTART[point]
    settled(c, epoch)
    book.check(c)
    # And the deployment goes on: a next rotation commits, above every epoch used.
    book.put(c, 5, "after")
    result = c.rotate()
    assert result.returncode == 0, result
    settled(c, 2 if point == "rotation-store-before" else 3)  # nothing of epoch 2 was stored before the kill
    book.check(c)


# ---------------------------------------------------------------- keepers killed during a rotation


def test_keepers_killed_during_a_rotation_are_reseeded_and_every_secret_reads_back(ready_cluster: Cluster) -> None:
    c = ready_cluster
    book = Secrets()
    book.put(c, 20, "before")
    c.keeper(3).pause()
    assert c.rotate("--no-wait").returncode == 0
    c.wait_status(lambda s: s["rotation"] is not None and len(s["rotation"]["dealt"]) >= 1, "a keeper dealt")
    c.kill_keeper(3)  # killed while it could not be dealt: it comes back empty
    c.start_keeper(3)
    c.kill_keeper(1)  # and one that may already hold both shards
    c.start_keeper(1)
    settled(c, 2)
    book.check(c)
    c.kill_keeper(2)  # after the commit: re-seeded with the new epoch
    c.start_keeper(2)
    settled(c, 2)
    book.check(c)


# ---------------------------------------------------------------- rekey


def _peers(c: Cluster, ids: tuple[int, ...]) -> str:
    return ",".join(f"{i}={c.keeper_url(i)}" for i in ids)


def test_rekey_from_3_keepers_threshold_2_to_5_keepers_threshold_3_by_restarting_nexus(
    make_cluster: Callable[..., Cluster],
) -> None:
    c = make_cluster(keepers=5)
    c.start(keeper_ids=[1, 2, 3, 4, 5], nexus=False)
    old = {"SPIKE_NEXUS_KEEPER_PEERS": _peers(c, (1, 2, 3)), "SPIKE_NEXUS_SHAMIR_SHARES": "3"}
    c.start_nexus(old)
    assert c.bootstrap().returncode == 0
    c.wait_status(lambda s: s["phase"] == "ready" and s["redundancy"] == 1, "ready 2-of-3")
    book = Secrets()
    book.put(c, 20, "before")
    c.kill("nexus")
    c.start_nexus({"SPIKE_NEXUS_SHAMIR_THRESHOLD": "3"})  # the cluster's own: keepers 1-5, shares 5
    assert "custody moves there once the root key is rebuilt (a rekey)" in c.nexus().text()
    _, status = c.wait_status(
        lambda s: s["phase"] == "ready" and s["epoch"] == 2 and s["rotation"] is None,
        "custody moved to 3-of-5",
        ROTATION_TIMEOUT,
    )
    assert (status["threshold"], status["shares"]) == (3, 5)
    settled(c, 2)
    book.check(c)
    # The new threshold holds: with two keepers gone, a restarted Nexus still rebuilds from the other three.
    c.kill_keeper(4)
    c.kill_keeper(5)
    c.kill("nexus")
    c.start_nexus({"SPIKE_NEXUS_SHAMIR_THRESHOLD": "3"})
    c.wait_ready(epoch=2)
    book.check(c)


def test_a_keeper_removed_by_a_reload_is_told_to_forget_and_no_longer_polled(
    make_cluster: Callable[..., Cluster],
) -> None:
    c = make_cluster(keepers=4)
    c.start(keeper_ids=[1, 2, 3, 4], nexus=False)
    config = c.root / "spike.toml"
    config.write_text(f'[nexus]\nkeepers = "{_peers(c, (1, 2, 3))}"\nshares = 3\nthreshold = 2\n')
    # The file decides what a reload may change: the harness's own settings are left out (empty is unset).
    env = {"SPIKE_CONFIG": str(config), **dict.fromkeys(("SPIKE_NEXUS_KEEPER_PEERS", "SPIKE_NEXUS_SHAMIR_SHARES",
                                                         "SPIKE_NEXUS_SHAMIR_THRESHOLD"), "")}  # fmt: skip
    nexus = c.start_nexus(env)
    assert c.bootstrap().returncode == 0
    c.wait_status(lambda s: s["phase"] == "ready" and s["redundancy"] == 1, "ready 2-of-3")
    book = Secrets()
    book.put(c, 10, "before")
    # Keeper 3 leaves, keeper 4 joins: the file changes, then SIGHUP.
    config.write_text(
        f'[nexus]\nkeepers = "{_peers(c, (1, 2, 4))}"\nshares = 3\nthreshold = 2\n'
        f'retiring_keepers = "{_peers(c, (3,))}"\n'
    )
    nexus.popen.send_signal(signal.SIGHUP)
    c.wait_log(nexus, r"SIGHUP: configuration reloaded: keepers \[1, 2, 4\], threshold 2")
    c.wait_log(nexus, r"keeper 3 .* is no longer in the keeper set and holds nothing", timeout=ROTATION_TIMEOUT)
    _, status = c.wait_status(lambda s: s["epoch"] == 2 and s["rotation"] is None, "custody moved")
    assert sorted(k["id"] for k in status["keepers"]) == [1, 2, 4]
    assert c.held_epochs(3) == ()  # told to forget: it holds nothing usable
    settled(c, 2, keepers=(1, 2, 4))
    book.check(c)


def test_data_key_rotation_and_rewrap_through_the_cli(ready_cluster: Cluster) -> None:
    c = ready_cluster
    book = Secrets()
    book.put(c, 20, "before")
    result = c.rotate("--data-key", "--rewrap")
    assert result.returncode == 0, result
    said = result.stdout.splitlines()
    assert re.fullmatch(r"data key rotated: new values are sealed under term \d+; older terms stay readable", said[0])
    assert said[1].startswith("stored values are re-wrapped to term ")
    term = int(said[0].split("term ")[1].split(";")[0])
    _, status = c.wait_status(
        lambda s: s["keyring"] is not None and s["keyring"]["rewrap_remaining"] == 0, "the re-wrap done", 30.0
    )
    assert status["keyring"]["term"] == term
    assert {int(t) for t in status["keyring"]["values_by_term"]} == {term}  # every value moved to the new term
    shown = c.run("status")
    assert f"data key term {term}" in shown.stdout
    book.check(c)
    both = c.rotate("--abort", "--data-key")
    assert both.returncode == 2 and "not with --data-key" in both.stderr


def test_a_rekey_without_enough_of_the_old_keepers_says_so_once_and_waits(
    make_cluster: Callable[..., Cluster],
) -> None:
    """Keepers 2 and 3 leave without their URLs: the record's threshold of its keepers cannot be reached."""
    c = make_cluster(keepers=4)
    c.start(keeper_ids=[1, 2, 3, 4], nexus=False)
    c.start_nexus({"SPIKE_NEXUS_KEEPER_PEERS": _peers(c, (1, 2, 3)), "SPIKE_NEXUS_SHAMIR_SHARES": "3"})
    assert c.bootstrap().returncode == 0
    c.wait_status(lambda s: s["phase"] == "ready" and s["redundancy"] == 1, "ready 2-of-3")
    book = Secrets()
    book.put(c, 10, "before")
    c.kill("nexus")
    new_set = {"SPIKE_NEXUS_KEEPER_PEERS": _peers(c, (1, 4)), "SPIKE_NEXUS_SHAMIR_SHARES": "2"}
    nexus = c.start_nexus(new_set)
    c.wait_log(nexus, r"the key record needs 2 of keepers \[1, 2, 3\] to rebuild the root key, and only 1 of them")
    _, status = c.wait_status(lambda s: all(k["polls"] >= 4 for k in s["keepers"]), "a few rounds of polls")
    assert status["phase"] == "recovering" and status["epoch"] == 1  # waiting, as for keepers that are down
    assert {k["id"]: k["url"] for k in status["keepers"]}[2] == "no URL configured"
    assert len(re.findall("the key record needs 2 of keepers", nexus.text())) == 1  # said once
    # The URLs of the leaving keepers: the key is rebuilt and custody moves to keepers 1 and 4.
    c.kill("nexus")
    c.start_nexus({**new_set, "SPIKE_NEXUS_RETIRING_KEEPER_PEERS": _peers(c, (2, 3))})
    c.wait_status(lambda s: s["epoch"] == 2 and s["rotation"] is None and s["shares"] == 2, "custody moved", 30.0)
    settled(c, 2, keepers=(1, 4))
    assert c.held_epochs(2) == () and c.held_epochs(3) == ()  # told to forget
    book.check(c)
