"""SPIKE's one keeper SPIFFE ID (spiffe://<td>/spike/keeper) over real mTLS: refused by default, accepted as an option.

SPIKE's Go deployments register every keeper under one ID; spike's Nexus
wants ``/spike/keeper/<id>``.  With ``KeeperIdentity.SPIKE`` the URL dialled
says which keeper it is, and any keeper SVID answers for any id (the cost,
shown below); a per-id SVID at another keeper's URL is still refused.
Our keeper itself serves with SPIKE's ID unchanged: it only checks who calls it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator

import pytest

from spike.app.commands.devca import DevIdentity
from spike.app.keeper import KeeperHandler
from spike.protocol import Keeper, KeeperIdentity, Role, SpiffeId, TrustDomains
from spike.transports.client import HttpsConnection, PeerIdentityError
from spike.transports.tls import SvidFiles, client_context, keeper_check, server_context
from tests.transport.transport_rig import TRUST, Served, mint_files, serving

pytestmark = pytest.mark.anyio

SPIKE_TRUST = dataclasses.replace(TRUST, keeper_identity=KeeperIdentity.SPIKE)
SPIKE_KEEPER_ID = f"spiffe://{TRUST.keeper}/spike/keeper"
CONTRIBUTION = json.dumps({"shard": list(range(1, 33))}).encode()  # what SPIKE's Go Nexus sends


@pytest.fixture(scope="module")
def spike_keeper_svid(dev_identity: DevIdentity, tmp_path_factory: pytest.TempPathFactory) -> SvidFiles:
    return mint_files(dev_identity, tmp_path_factory.mktemp("spike-keeper"), "keeper", SPIKE_KEEPER_ID)


@contextlib.asynccontextmanager
async def keeper_serving(files: SvidFiles) -> AsyncIterator[tuple[Keeper, Served]]:
    keeper = Keeper(TRUST)
    async with serving(server_context(files), KeeperHandler(keeper)) as served:
        yield keeper, served
    keeper.forget()


async def read_as_keeper(
    dev_identity: DevIdentity, served: Served, trust: TrustDomains, keeper_id: int
) -> tuple[int, bytes]:
    connection = HttpsConnection(
        served.url,
        client_context(dev_identity.files("nexus")),
        keeper_check(trust, keeper_id),
        expected_peer=str(trust.id_of(Role.KEEPER, keeper_id)),
    )
    try:
        return await connection.request("POST", "/v1/store/shard", b"{}")
    finally:
        await connection.aclose()


async def test_spike_keeper_id_is_refused_by_default(dev_identity: DevIdentity, spike_keeper_svid: SvidFiles) -> None:
    async with keeper_serving(spike_keeper_svid) as (_, served):
        with pytest.raises(
            PeerIdentityError, match=r"presented spiffe://spike\.test/spike/keeper, expected .*/keeper/1"
        ):
            await read_as_keeper(dev_identity, served, TRUST, 1)
        # Positive control on the same server: the option makes it a keeper.
        assert await read_as_keeper(dev_identity, served, SPIKE_TRUST, 1) == (404, b'{"err":"api_not_found"}')


async def test_with_spike_identity_our_keeper_under_spikes_id_is_seeded_and_read(
    dev_identity: DevIdentity, spike_keeper_svid: SvidFiles
) -> None:
    async with keeper_serving(spike_keeper_svid) as (keeper, served):
        connection = HttpsConnection(
            served.url, client_context(dev_identity.files("nexus")), keeper_check(SPIKE_TRUST, 2)
        )
        try:
            assert await connection.request("POST", "/v1/store/contribute", CONTRIBUTION) == (200, b"{}")
            status, body = await connection.request("POST", "/v1/store/shard", b"{}")
        finally:
            await connection.aclose()
        assert keeper.holds_shard
        assert status == 200 and json.loads(body)["shard"] == list(range(1, 33))


async def test_the_cost_any_spike_keeper_svid_answers_for_any_id(
    dev_identity: DevIdentity, spike_keeper_svid: SvidFiles
) -> None:
    async with keeper_serving(spike_keeper_svid) as (_, served):
        for keeper_id in (1, 2, 7):
            status, _ = await read_as_keeper(dev_identity, served, SPIKE_TRUST, keeper_id)
            assert status == 404


async def test_with_spike_identity_a_per_id_keeper_still_answers_only_for_its_own_id(
    dev_identity: DevIdentity,
) -> None:
    async with keeper_serving(dev_identity.keeper(2)) as (_, served):
        assert (await read_as_keeper(dev_identity, served, SPIKE_TRUST, 2))[0] == 404
        with pytest.raises(PeerIdentityError, match=r"presented spiffe://spike\.test/spike/keeper/2"):
            await read_as_keeper(dev_identity, served, SPIKE_TRUST, 1)


def test_roles_of_spikes_keeper_id() -> None:
    peer = SpiffeId.parse(SPIKE_KEEPER_ID)
    assert TRUST.role_of(peer) is None
    assert SPIKE_TRUST.role_of(peer) is Role.KEEPER
    assert SPIKE_TRUST.role_of(SpiffeId.parse("spiffe://other.test/spike/keeper")) is None
    assert not SPIKE_TRUST.is_keeper(SpiffeId.parse("spiffe://other.test/spike/keeper"), 1)
    assert not SPIKE_TRUST.is_keeper(SpiffeId.parse(f"{SPIKE_KEEPER_ID}/x"), 1)
    assert str(SPIKE_TRUST.id_of(Role.KEEPER, 3)) == SPIKE_KEEPER_ID
    assert str(TRUST.id_of(Role.KEEPER, 3)) == f"{SPIKE_KEEPER_ID}/3"
