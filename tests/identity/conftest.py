"""Identity sources: a real gRPC Workload API server (workload_api.py), SVID files, rotation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from spike.app.commands.devca import DevIdentity
from tests.identity.workload_api import TestCa, WorkloadApi


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
