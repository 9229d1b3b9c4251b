"""Fixtures for the embedding tier: real `spike keeper` processes for the example drivers.

The processes are started and killed with the end-to-end harness
(tests/e2e/harness.py), so they behave exactly as in the e2e tier.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from spike.app.commands.devca import DevIdentity
from tests.e2e.harness import Cluster


@pytest.fixture
def keepers(dev_identity: DevIdentity, tmp_path: Path) -> Iterator[Cluster]:
    """Keepers 1-3 (no Nexus), started and listening; killed at the end."""
    cluster = Cluster(dev_identity, tmp_path / "cluster", keepers=3)
    try:
        cluster.start(nexus=False)
        yield cluster
    finally:
        cluster.close()
