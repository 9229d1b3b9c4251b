"""Fixtures shared by every test tier: development identities minted once per run."""

from __future__ import annotations

import pytest

from spike.app.commands.devca import DevIdentity, mint_dev_identity

TRUST_DOMAIN = "spike.test"
KEEPER_IDS = range(1, 10)


@pytest.fixture(scope="session")
def dev_identity(tmp_path_factory: pytest.TempPathFactory) -> DevIdentity:
    """A CA for spiffe://spike.test and SVIDs for every role and keepers 1-9."""
    return mint_dev_identity(tmp_path_factory.mktemp("identity"), TRUST_DOMAIN, KEEPER_IDS)


@pytest.fixture(scope="session")
def foreign_identity(tmp_path_factory: pytest.TempPathFactory) -> DevIdentity:
    """The same names under a different CA (and trust domain): must be refused everywhere."""
    return mint_dev_identity(tmp_path_factory.mktemp("foreign"), "other.test", KEEPER_IDS)


@pytest.fixture(scope="session")
def same_domain_foreign_ca(tmp_path_factory: pytest.TempPathFactory) -> DevIdentity:
    """Same trust domain and IDs, but signed by a CA nobody trusts."""
    return mint_dev_identity(tmp_path_factory.mktemp("rogue"), TRUST_DOMAIN, KEEPER_IDS)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run long tests (chaos, soak)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="long run: pass --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
