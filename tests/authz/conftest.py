"""Fixtures for the authorisation tier: an in-process deployment (three keepers, Nexus) on loopback mTLS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from spike.app.commands.devca import DevIdentity
from tests.authz.deployment import Deployment, running


@pytest.fixture
def deployment(dev_identity: DevIdentity, tmp_path: Path) -> Iterator[Deployment]:
    """A fresh deployment per test, READY (the root key rebuilt from its keepers)."""
    with running(dev_identity, tmp_path / "deployment") as started:
        yield started
