"""SPIKE's wider Nexus ID at our keeper (issue 17 section 2), over real mTLS: refused by default, opt-in.

SPIKE's Go keeper takes for Nexus `spiffe://<td>/spike/nexus` and every ID below it
(spike-sdk-go `spiffeid.IsNexus`: equal to the base ID, or starting with it and "/").  Ours takes only
the exact ID unless started with `--nexus-identity spike` (`NexusIdentity.SPIKE`): who may read a shard
is not widened by default.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from spike.app import cli
from spike.app import config as cfg
from spike.app.commands.devca import DevIdentity
from spike.app.keeper import KeeperHandler
from spike.protocol import Keeper, NexusIdentity, Role, SpiffeId
from spike.transports.client import HttpsConnection
from spike.transports.tls import SvidFiles, client_context, keeper_check, server_context
from tests.transport.transport_rig import TRUST, Served, mint_files, serving

SPIKE_TRUST = dataclasses.replace(TRUST, nexus_identity=NexusIdentity.SPIKE)
BELOW = f"spiffe://{TRUST.nexus}/spike/nexus/instance-0"
CONTRIBUTION = json.dumps({"shard": list(range(1, 33))}).encode()


@pytest.fixture(scope="module")
def nexus_below_svid(dev_identity: DevIdentity, tmp_path_factory: pytest.TempPathFactory) -> SvidFiles:
    return mint_files(dev_identity, tmp_path_factory.mktemp("nexus-below"), "nexus-0", BELOW)


@contextlib.asynccontextmanager
async def keeper_serving(dev_identity: DevIdentity, keeper: Keeper) -> AsyncIterator[Served]:
    async with serving(server_context(dev_identity.keeper(1)), KeeperHandler(keeper)) as served:
        yield served
    keeper.forget()


async def as_caller(served: Served, files: SvidFiles, path: str, body: bytes) -> tuple[int, bytes]:
    connection = HttpsConnection(served.url, client_context(files), keeper_check(TRUST, 1))
    try:
        return await connection.request("POST", path, body)
    finally:
        await connection.aclose()


@pytest.mark.anyio
async def test_an_id_below_nexus_is_refused_by_default(dev_identity: DevIdentity, nexus_below_svid: SvidFiles) -> None:
    keeper = Keeper(TRUST)
    async with keeper_serving(dev_identity, keeper) as served:
        assert (await as_caller(served, dev_identity.files("nexus"), "/v1/store/contribute", CONTRIBUTION))[0] == 200
        assert (await as_caller(served, nexus_below_svid, "/v1/store/shard", b"{}"))[0] == 401
        assert (await as_caller(served, nexus_below_svid, "/v1/store/contribute", CONTRIBUTION))[0] == 401
        # Positive control: the exact ID reads it.
        status, body = await as_caller(served, dev_identity.files("nexus"), "/v1/store/shard", b"{}")
        assert status == 200 and json.loads(body)["shard"] == list(range(1, 33))


@pytest.mark.anyio
async def test_with_the_option_an_id_below_nexus_seeds_and_reads_the_shard(
    dev_identity: DevIdentity, nexus_below_svid: SvidFiles
) -> None:
    keeper = Keeper(SPIKE_TRUST)
    async with keeper_serving(dev_identity, keeper) as served:
        assert (await as_caller(served, nexus_below_svid, "/v1/store/shard", b"{}"))[0] == 404  # empty: a Nexus
        assert (await as_caller(served, nexus_below_svid, "/v1/store/contribute", CONTRIBUTION))[0] == 200
        status, body = await as_caller(served, nexus_below_svid, "/v1/store/shard", b"{}")
        assert status == 200 and json.loads(body)["shard"] == list(range(1, 33))


def test_the_rule_is_spikes_is_nexus() -> None:
    for text in (f"spiffe://{TRUST.nexus}/spike/nexus", BELOW, f"spiffe://{TRUST.nexus}/spike/nexus/a/b"):
        assert SPIKE_TRUST.role_of(SpiffeId.parse(text)) is Role.NEXUS, text
    assert TRUST.role_of(SpiffeId.parse(BELOW)) is None
    for text in (
        f"spiffe://{TRUST.nexus}/spike/nexus-2",  # a prefix of the path that is not "/"
        f"spiffe://{TRUST.nexus}/spike/nexusx/a",
        f"spiffe://{TRUST.nexus}/other/spike/nexus/a",
        "spiffe://other.test/spike/nexus/a",  # another trust domain
    ):
        assert SPIKE_TRUST.role_of(SpiffeId.parse(text)) is None, text
    # Only Nexus's rule widens: the other roles stay exact.
    assert SPIKE_TRUST.role_of(SpiffeId.parse(f"spiffe://{TRUST.bootstrap}/spike/bootstrap/a")) is None


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setenv("HOME", str(tmp_path))
    yield


def test_the_keepers_option_by_flag_variable_and_file(
    dev_identity: DevIdentity, tmp_path: Path, clean_environment: None
) -> None:
    files = dev_identity.keeper(1)
    env = {
        "SPIKE_SVID_CERT": str(files.cert),
        "SPIKE_SVID_KEY": str(files.key),
        "SPIKE_SVID_BUNDLE": str(files.bundle),
        "SPIKE_TRUST_ROOT": dev_identity.trust_domain,
    }

    def identity(argv: list[str], more: dict[str, str]) -> NexusIdentity:
        args: argparse.Namespace = cli.build_parser().parse_args(["keeper", *argv])
        return cfg.keeper(args, {**env, **more}).common.trust.nexus_identity

    assert identity([], {}) is NexusIdentity.EXACT
    assert identity(["--nexus-identity", "spike"], {}) is NexusIdentity.SPIKE
    assert identity([], {"SPIKE_KEEPER_NEXUS_IDENTITY": "spike"}) is NexusIdentity.SPIKE
    assert identity(["--nexus-identity", "exact"], {"SPIKE_KEEPER_NEXUS_IDENTITY": "spike"}) is NexusIdentity.EXACT
    toml = tmp_path / "keeper.toml"
    toml.write_text('[keeper]\nnexus_identity = "spike"\n')
    assert identity([], cfg.load_config_file(toml)) is NexusIdentity.SPIKE
    with pytest.raises(cfg.ConfigError, match=r"^Nexus identity must be exact .* not 'wide'$"):
        identity([], {"SPIKE_KEEPER_NEXUS_IDENTITY": "wide"})
