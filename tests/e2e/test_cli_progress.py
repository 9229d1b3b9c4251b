"""What the commands that take a while say as they go (issue 18): `spike dev`, and a re-wrap followed to its end.

Real processes, as a user runs them: `spike dev --data-dir DIR` twice (the
first run bootstraps, the second restores from the recovery shards the first
wrote), and `spike operator rotate --data-key --rewrap --wait`, which returns
only once every stored value is sealed under the new term.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.harness import Cluster, dev_until_ready

pytestmark = pytest.mark.e2e


def test_spike_dev_says_what_it_starts_and_restores(tmp_path: Path) -> None:
    first = dev_until_ready(tmp_path / "dev")
    assert "spike dev: starting 3 keepers and Nexus" in first
    assert any("bootstrap complete: Nexus rebuilt and verified root key epoch 1" in line for line in first), first
    second = dev_until_ready(tmp_path / "dev")
    assert "spike dev: starting 3 keepers and Nexus" in second
    restoring = f"  restoring the root key from the recovery shards in {tmp_path / 'dev' / 'recovery'}"
    assert restoring in second, second
    assert any(line.startswith("  root key epoch 1 restored from") for line in second), second


def test_a_rewrap_with_wait_returns_once_every_value_is_under_the_new_term(ready_cluster: Cluster) -> None:
    c = ready_cluster
    for i in range(3):
        put = c.run("secret", "put", f"rewrap/{i}", f"value=v{i}")
        assert put.returncode == 0, put
    result = c.rotate("--data-key", "--rewrap", "--wait")
    assert result.returncode == 0 and result.stderr == "", result
    said = result.stdout.splitlines()
    term = int(said[0].split("term ")[1].split(";")[0])
    assert said[-1] == f"re-wrap done: every stored value is sealed under term {term} or newer", said
    code, status = c.status()  # at once: the command returned only when it was done
    assert code == 0 and {int(t) for t, n in status["keyring"]["values_by_term"].items() if n} == {term}
    assert status["keyring"]["rewrap_remaining"] == 0
    alone = c.rotate("--wait")
    assert alone.returncode == 2 and alone.stderr.strip().endswith("--wait follows a re-wrap: only with --rewrap")
