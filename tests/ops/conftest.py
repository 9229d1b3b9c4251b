"""The ops tests' fixtures: `node`, an in-process Nexus with the key record of ops_helpers.RECORD, and a
clean environment for the configuration tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ops.ops_helpers import RECORD, Node


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """A Nexus with its key record, waiting for shards (as after a restart with every keeper lost)."""
    n = Node(tmp_path / "data", record=RECORD)
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No SPIKE_* variable (nor the Workload API socket) of the machine running the tests, and an empty HOME."""
    for name in list(os.environ):
        if name.startswith("SPIKE_") or name == "SPIFFE_ENDPOINT_SOCKET":
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    yield
