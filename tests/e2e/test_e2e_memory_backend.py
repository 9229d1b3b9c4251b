"""The memory backend on a real process (SPIKE_NEXUS_BACKEND_STORE=memory, issue 17 section 4).

Write, read, SIGKILL, start again: the data is gone, and no file was ever made in the process's
home, temporary directory or working directory (the in-memory database has no file to leave behind).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.harness import Cluster

pytestmark = pytest.mark.e2e


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if not p.is_dir())


def test_memory_nexus_serves_secrets_keeps_nothing_and_leaves_no_file(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    c = make_cluster()
    home = tmp_path / "memory-home"
    nexus = c.start_memory_nexus(home)
    assert "NOTHING IS KEPT" in nexus.text()
    assert c.run("secret", "put", "app/db", "pw=kept-nowhere").returncode == 0
    got = c.run("secret", "get", "app/db", "pw")
    assert (got.returncode, got.stdout) == (0, "kept-nowhere\n"), got
    status = c.run("status")
    assert status.returncode == 0 and "memory backend, NOTHING IS KEPT" in status.stdout, status
    recover = c.run("operator", "recover", "--dir", str(tmp_path / "recovery"), identity="pilot-recover")
    assert recover.returncode != 0 and len(recover.stderr.splitlines()) == 1, recover
    assert "memory backend" in recover.stderr
    assert not (tmp_path / "recovery").exists() or files_under(tmp_path / "recovery") == []
    assert files_under(home) == []  # while it runs, too

    c.kill("nexus")  # SIGKILL: no shutdown code runs
    assert files_under(home) == []
    c.start_memory_nexus(home)
    gone = c.run("secret", "get", "app/db", "pw")
    assert gone.returncode != 0 and gone.stdout == "", gone
    listed = c.run("secret", "list", "--format", "json")
    assert listed.returncode == 0 and "app/db" not in listed.stdout, listed
    assert files_under(home) == []
