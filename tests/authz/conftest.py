"""Fixtures for the authorisation tier: an in-process deployment (three keepers, Nexus) on loopback mTLS."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from deployment import Deployment, running

from spike.app.commands.devca import DevIdentity

# The rotation test drives real `spike` processes with the end-to-end harness.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "e2e"))


@pytest.fixture
def deployment(dev_identity: DevIdentity, tmp_path: Path) -> Iterator[Deployment]:
    """A fresh deployment per test, READY (the root key rebuilt from its keepers)."""
    with running(dev_identity, tmp_path / "deployment") as started:
        yield started
