"""The `node` fixture of the ops tests: an in-process Nexus with the key record of ops_helpers.RECORD."""

from __future__ import annotations

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
