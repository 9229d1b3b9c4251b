"""Fixtures for the end-to-end tier: clusters of real `spike` processes.

Every cluster is killed in its fixture's finalizer, whatever the test did.
Before that, the shards its live keepers hold are read back (acting as
Nexus) and kept, with the cluster's log directory, for the log-hygiene test,
which runs after every other e2e test and greps every log for them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spike.app.commands.devca import DevIdentity
from tests.e2e.harness import Cluster, SecretsSeen, swept


@pytest.fixture(scope="session")
def secrets_seen() -> SecretsSeen:
    return SecretsSeen()


@pytest.fixture
def make_cluster(
    dev_identity: DevIdentity, tmp_path: Path, secrets_seen: SecretsSeen, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Cluster]]:
    with contextlib.ExitStack() as clusters:
        made = 0

        def make(**options: Any) -> Cluster:
            nonlocal made
            made += 1
            cluster = Cluster(dev_identity, tmp_path / f"cluster-{made}", **options)
            return clusters.enter_context(swept(cluster, secrets_seen, f"{request.node.name}#{made}"))

        yield make


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    """Three keepers and a Nexus (2-of-3), not started yet."""
    return make_cluster()


@pytest.fixture
def ready_cluster(cluster: Cluster) -> Cluster:
    """Three keepers and a Nexus, bootstrapped once (epoch 1) and ready with redundancy 1."""
    cluster.start_ready()
    return cluster


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The log-hygiene sweep looks at what every other e2e test left behind: run it last."""
    last = [item for item in items if item.get_closest_marker("after_all_e2e")]
    for item in last:
        items.remove(item)
    items.extend(last)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "after_all_e2e: run after every other test of the session")
