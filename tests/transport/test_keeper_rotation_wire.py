"""The keeper's rotation extension over real mTLS: reads by epoch, keep, forget (docs/key-lifecycle.md section 2).

The keeper server here is the real one (machine, app handler, spike's HTTP
server); requests go through spike's own client and through the standard
library, so what is checked is what a Nexus on the network gets.
"""

from __future__ import annotations

import json

import pytest

from spike.app.commands.devca import DevIdentity
from spike.transports.client import HttpsConnection
from spike.transports.tls import client_context, keeper_check
from tests.transport.transport_rig import TRUST, in_thread, keeper_server, raw_client_context, raw_request

pytestmark = pytest.mark.anyio

OLD = list(range(1, 33))
NEW = list(range(2, 34))


def contribution(shard: list[int], epoch: int, keep: int | None = None) -> bytes:
    body: dict[str, object] = {"shard": shard, "id": 1, "epoch": epoch}
    if keep is not None:
        body["keep"] = keep
    return json.dumps(body).encode()


async def test_nexus_deals_a_new_epoch_reads_both_and_retires_the_old(dev_identity: DevIdentity) -> None:
    async with keeper_server(dev_identity, 1) as k:
        connection = HttpsConnection(k.served.url, client_context(dev_identity.files("nexus")), keeper_check(TRUST, 1))
        try:
            assert await connection.request("POST", "/v1/store/contribute", contribution(OLD, 7)) == (200, b"{}")
            assert await connection.request("POST", "/v1/store/contribute", contribution(NEW, 8, keep=7)) == (
                200,
                b"{}",
            )
            status, body = await connection.request("POST", "/v1/store/shard", b'{"epoch":7}')
            assert (status, json.loads(body)) == (
                200,
                {"shard": OLD, "id": 1, "epoch": 7, "other_epoch": 8, "slots": 2},
            )
            status, body = await connection.request("POST", "/v1/store/shard", b"{}")
            assert (status, json.loads(body)) == (200, {"shard": NEW, "id": 1, "epoch": 8})  # SPIKE's read
            assert await connection.request("POST", "/v1/store/forget", b'{"epoch":7}') == (200, b"{}")
            status, body = await connection.request("POST", "/v1/store/shard", b'{"epoch":7}')
            assert json.loads(body) == {"shard": NEW, "id": 1, "epoch": 8, "slots": 2}
            assert await connection.request("POST", "/v1/store/forget", b'{"all":true}') == (200, b"{}")
            assert await connection.request("POST", "/v1/store/shard", b'{"epoch":8}') == (
                404,
                b'{"err":"api_not_found"}',
            )
        finally:
            await connection.aclose()
        assert not k.keeper.holds_shard


async def test_bootstrap_cannot_make_a_keeper_forget_and_bad_bodies_are_400(dev_identity: DevIdentity) -> None:
    bundle = dev_identity.files("nexus").bundle
    bootstrap = raw_client_context(dev_identity.files("bootstrap"), bundle)
    nexus = raw_client_context(dev_identity.files("nexus"), bundle)
    async with keeper_server(dev_identity, 1) as k:
        port = k.served.port
        stored = await in_thread(lambda: raw_request(port, bootstrap, "/v1/store/contribute", contribution(OLD, 7)))
        assert stored is not None and stored.status == 200
        refused = await in_thread(lambda: raw_request(port, bootstrap, "/v1/store/forget", b'{"all":true}'))
        assert refused is not None
        assert (refused.status, json.loads(refused.body)) == (401, {"err": "access_unauthorized"})
        for body in (b"{}", b'{"epoch":7,"all":true}', b"not json"):
            bad = await in_thread(lambda body=body: raw_request(port, nexus, "/v1/store/forget", body))
            assert bad is not None
            assert (bad.status, json.loads(bad.body)) == (400, {"err": "api_bad_request"})
        assert k.keeper.epochs == (7,)
        positive = await in_thread(lambda: raw_request(port, nexus, "/v1/store/forget", b'{"epoch":7}'))
        assert positive is not None and positive.status == 200
        assert not k.keeper.holds_shard
