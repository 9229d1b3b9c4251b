"""Fixtures for the API tier: an in-process Nexus on a real SQLite file, locked or unlocked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.api_helpers import Node


@pytest.fixture
def locked_node(tmp_path: Path) -> Iterator[Node]:
    """A Nexus that has its key record but not yet its key (waiting for shards)."""
    node = Node(tmp_path / "data")
    try:
        yield node
    finally:
        node.close()


@pytest.fixture
def node(locked_node: Node) -> Node:
    """A Nexus holding its verified root key."""
    locked_node.unlock()
    return locked_node
