"""Identity sources: a real gRPC Workload API server (workload_api.py), SVID files, rotation."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from workload_api import TestCa, WorkloadApi

from spike.app.commands.devca import DevIdentity

# The process tests drive real `spike` processes with the end-to-end harness.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "e2e"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def workload_api(dev_identity: DevIdentity) -> Iterator[WorkloadApi]:
    """A Workload API that signs with the session's dev CA (so its SVID files are trusted too)."""
    api = WorkloadApi(TestCa.of(dev_identity))
    try:
        yield api
    finally:
        api.close()
