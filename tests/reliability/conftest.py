"""Fixtures for the reliability tier: deployments of real processes under faults, fuzzers, the final leak sweep.

The end-to-end harness (tests/e2e/harness.py), the in-process deployment of
tests/authz and the transport rig are reused by their package paths.  Every
secret value, shard and key a test here uses is registered with the
session's `LeakWatch`; `test_secrets_sweep.py` runs after every other
test of the session (see `pytest_collection_modifyitems` below) and greps
every file those tests wrote for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spike.app.commands.devca import DevIdentity
from tests.reliability.reliability_rig import REPORT, LeakWatch, ProxiedCluster


@pytest.fixture(scope="session")
def leak_watch(tmp_path_factory: pytest.TempPathFactory) -> LeakWatch:
    return LeakWatch(tmp_path_factory.getbasetemp())


@pytest.fixture
def make_rcluster(
    dev_identity: DevIdentity, tmp_path: Path, leak_watch: LeakWatch, request: pytest.FixtureRequest
) -> Iterator[Callable[..., ProxiedCluster]]:
    """Clusters of real processes (optionally behind fault proxies); killed at teardown, their secrets kept."""
    clusters: list[ProxiedCluster] = []

    def make(**options: Any) -> ProxiedCluster:
        cluster = ProxiedCluster(dev_identity, tmp_path / f"cluster-{len(clusters) + 1}", **options)
        clusters.append(cluster)
        leak_watch.add_dir(cluster.root)
        return cluster

    try:
        yield make
    finally:
        for number, cluster in enumerate(clusters, start=1):
            try:
                leak_watch.add_cluster(cluster, f"{request.node.name}#{number}")
            finally:
                cluster.close()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The secrets sweep looks at what every other test left behind: it runs last of all.

    `trylast` puts this after the e2e tier's own reordering (its log-hygiene
    test), so the sweep is the very last test of the session.
    """
    last = [item for item in items if item.get_closest_marker("after_everything")]
    for item in last:
        items.remove(item)
    items.extend(last)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "after_everything: run after every other test of the session")
    config.addinivalue_line("markers", "reliability: faults, fuzzing and leak sweeps against real servers")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The counts the reliability tests report (chaos runs, fuzzers, sweeps), after the run."""
    if not REPORT:
        return
    terminalreporter.write_sep("-", "reliability counts")
    for line in REPORT:
        terminalreporter.write_line(line)
