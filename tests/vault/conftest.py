"""Fixtures: one spike deployment and one OpenBao for the whole tier, and `target` running each test on both.

The same test body runs against spike and against OpenBao: what it expects is
what Vault's clients get from Vault.  Where spike legitimately differs, the test
says so and checks each server's own answer.
"""

from __future__ import annotations

from collections.abc import Iterator

import hvac
import pytest

from spike.app.commands.devca import DevIdentity
from tests.vault.clients import hvac_client
from tests.vault.deployments import BaoDeployment, SpikeDeployment, Target


@pytest.fixture(scope="session")
def spike_deployment(dev_identity: DevIdentity, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpikeDeployment]:
    deployment = SpikeDeployment(dev_identity, tmp_path_factory.mktemp("vault-spike"))
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.close()


@pytest.fixture(scope="session")
def bao_deployment(dev_identity: DevIdentity, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BaoDeployment]:
    deployment = BaoDeployment(dev_identity, tmp_path_factory.mktemp("vault-openbao"))
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.close()


@pytest.fixture(params=["spike", "openbao"])
def target(request: pytest.FixtureRequest) -> Target:
    deployment = request.getfixturevalue(f"{request.param if request.param == 'spike' else 'bao'}_deployment")
    assert isinstance(deployment, SpikeDeployment | BaoDeployment)
    return deployment.target


@pytest.fixture
def vault(target: Target) -> hvac.Client:
    """`web`, logged in with its certificate (Vault's cert auth): a token on every request."""
    return hvac_client(target)


@pytest.fixture
def unique(request: pytest.FixtureRequest, target: Target) -> str:
    """A secret path of this test's own under app/ (the servers live for the whole session)."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:80]
    return f"app/{name}"
