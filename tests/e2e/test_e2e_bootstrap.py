"""`spike bootstrap` against a running deployment.

One deployment's life: bootstrapped once it is ready with a spare shard
(acceptance criterion 1); a second run is refused and changes nothing, and
`--force` replaces the key (criterion 5).
"""

from __future__ import annotations

import os
import pty
import subprocess
import threading
from collections.abc import Callable

import pytest

from tests.e2e.harness import CLI_TIMEOUT, SPIKE, Cluster, wait_until

pytestmark = pytest.mark.e2e

EXIT_READY = 0


def lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def shard_lines(c: Cluster) -> dict[int, int]:
    """How many times each keeper's current incarnation has logged storing or replacing a shard."""
    return {
        i: sum("shard stored" in line or "shard replaced" in line for line in c.keeper(i).text().splitlines())
        for i in c.keeper_ids
    }


def test_bootstrap_once_then_refuses_a_second_run_and_force_replaces_the_key(cluster: Cluster) -> None:
    c = cluster
    c.start()

    # 1. Three keepers, a Nexus (2-of-3), one bootstrap: ready, redundancy 1, exit code 0.
    result = c.bootstrap()
    assert result.returncode == 0, result
    assert "bootstrap complete: Nexus rebuilt and verified root key epoch 1" in result.stdout
    c.wait_status(lambda s: s["phase"] == "ready" and s["redundancy"] == 1, "every keeper holding")
    code, before = c.status()
    assert code == EXIT_READY
    assert (before["epoch"], before["threshold"], before["shares"], before["shards_needed"]) == (1, 2, 3, 0)
    assert [k["state"] for k in before["keepers"]] == ["holding"] * 3
    human = c.run("status")
    assert human.returncode == EXIT_READY, human
    assert "ready: root key epoch 1, 2-of-3" in human.stdout
    assert "shard redundancy: 1" in human.stdout
    nexus = c.nexus()
    log = nexus.text()
    assert len(lines_with(log, "Nexus is ready: it holds the verified root key")) == 1
    rebuilt = lines_with(log, "root key (epoch 1) rebuilt from the shards of keepers")
    assert len(rebuilt) == 1 and rebuilt[0].endswith("and verified")
    assert "Traceback" not in log

    # 5. A second run is refused with one line, and nothing changes.
    shards_before = c.read_shards()
    assert sorted(shards_before) == [1, 2, 3]
    stored_before = shard_lines(c)
    mark = len(nexus.text())

    refused = c.bootstrap()
    assert refused.returncode == 1, refused
    assert refused.stdout == ""
    assert len(refused.stderr.splitlines()) == 1, refused
    assert refused.stderr.startswith("spike bootstrap: Nexus is already initialised (key epoch 1, ready)")
    assert "--force" in refused.stderr and "Traceback" not in refused.stderr

    code, after = c.status()
    assert code == EXIT_READY and after["phase"] == "ready" and after["epoch"] == before["epoch"] == 1
    assert c.read_shards() == shards_before  # the same shards in the same keepers
    assert shard_lines(c) == stored_before  # nobody was sent one
    assert "installed" not in nexus.text()[mark:]

    # `--force` makes a new key: epoch + 1, new shards everywhere, ready again.
    forced = c.bootstrap("--force")
    assert forced.returncode == 0, forced
    assert "bootstrap complete: Nexus rebuilt and verified root key epoch 2" in forced.stdout
    c.wait_status(lambda s: s["phase"] == "ready" and s["epoch"] == 2 and s["redundancy"] == 1, "epoch 2 ready")
    code, status = c.status()
    assert code == EXIT_READY and status["epoch"] == 2 and status["redundancy"] == 1
    shards_after = c.read_shards()
    assert sorted(shards_after) == [1, 2, 3]
    for keeper_id, share in shards_after.items():
        assert share.epoch == 2
        assert share.secret_bytes() != shards_before[keeper_id].secret_bytes()
    assert "key record for epoch 2 installed" in nexus.text()[mark:]

    # And the new key is just as protected against a plain second run.
    again = c.bootstrap()
    assert again.returncode == 1 and "key epoch 2" in again.stderr, again


def test_bootstrap_has_nexus_read_the_keepers_at_once_rather_than_at_their_next_polls(
    make_cluster: Callable[..., Cluster],
) -> None:
    """Nexus polls every keeper when the record is installed, before bootstrap deals the shards; bootstrap
    then says they are dealt (issue 18) and Nexus reads them again at once. With a poll interval of two
    minutes and bootstrap giving up after 20 s, it succeeds only that way: the next polls are far away."""
    c = make_cluster(poll_interval=120.0)
    c.start()
    result = c.bootstrap("--timeout", "20s")
    assert result.returncode == 0, result
    assert "bootstrap complete: Nexus rebuilt and verified root key epoch 1" in result.stdout
    assert result.stderr == ""  # no terminal: no progress line
    code, status = c.status()
    assert code == EXIT_READY and [k["polls"] for k in status["keepers"]] == [2, 2, 2]  # at start, at install


def test_bootstrap_shows_what_it_waits_for_on_a_terminal_and_erases_it(cluster: Cluster) -> None:
    """A live line on stderr when that is a terminal (as gh does); stdout keeps only the result lines."""
    c = cluster
    c.start(nexus=False)
    controller, terminal = pty.openpty()
    env = c._env(c.files("bootstrap"), {"SPIKE_NEXUS_API_URL": c.nexus_url})
    process = subprocess.Popen(
        [*SPIKE, "bootstrap"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal
    )
    os.close(terminal)
    seen = bytearray()

    def read_terminal() -> None:
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the process closed its end
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    wait_until(lambda: b"waiting for Nexus at" in seen, "the progress line while Nexus is down")
    c.start_nexus()
    stdout, _ = process.communicate(timeout=CLI_TIMEOUT)
    reader.join(timeout=5)
    os.close(controller)
    assert process.returncode == 0, (stdout, bytes(seen))
    text = seen.decode()
    assert f"spike bootstrap: waiting for Nexus at {c.nexus_url} to answer" in text
    assert text.endswith("\r\x1b[K"), text[-200:]  # erased at the end
    out = stdout.decode()
    assert "\x1b" not in out and "waiting" not in out
    assert "bootstrap complete" in out.splitlines()[-1]
