"""Trust per domain with the Workload API (issue 14, H1): a federated domain's CA mints no SVID of ours.

A SPIRE agent streams this workload's own trust domain's bundle and the
bundles of the domains it federates with, each marked with its domain.  The
keeper and Nexus here get both (spike.test, their own, and other.test, whose
pilots they serve) from the real gRPC Workload API of workload_api.py.
other.test's CA then mints SVIDs claiming spike.test IDs: the TLS handshake
accepts them (both bundles are trusted) and the keeper must still refuse the
forged Nexus, and Nexus the forged keeper, because each SVID is verified
against the bundle of its own trust domain.  Controls: the genuine peers get
through, and other.test's CA still vouches for other.test's IDs.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketAttribute

from spike.app.commands.devca import CA_CERT, DevIdentity
from spike.app.keeper import KeeperHandler
from spike.protocol.identity import TrustDomains
from spike.protocol.keeper import Keeper
from spike.transports.client import HttpsConnection, PeerIdentityError
from spike.transports.server import HttpsServer
from spike.transports.tls import keeper_check
from spike.transports.workload_api import WorkloadApiSource
from tests.identity.workload_api import TestCa, WorkloadApi
from tests.transport.transport_rig import raw_request, refused

pytestmark = pytest.mark.anyio

OURS = "spike.test"
THEIRS = "other.test"
TRUST = TrustDomains(nexus=OURS, keeper=OURS, bootstrap=OURS, pilot=THEIRS)
KEEPER = f"spiffe://{OURS}/spike/keeper/1"
NEXUS = f"spiffe://{OURS}/spike/nexus"
CONTRIBUTION = json.dumps({"shard": list(range(1, 33)), "id": 1, "epoch": 1}).encode()


def client_presenting(ca: TestCa, spiffe_id: str, trusting: Path, directory: Path) -> ssl.SSLContext:
    """A plain stdlib client with an SVID `ca` mints for `spiffe_id`, trusting the CA file `trusting`."""
    cert, key = ca.mint(spiffe_id)
    name = spiffe_id.rsplit("/", 1)[-1] + "-by-" + ca.trust_domain
    (directory / f"{name}.pem").write_bytes(cert + ca.pem)
    (directory / f"{name}-key.pem").write_bytes(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cafile=str(trusting))
    context.load_cert_chain(str(directory / f"{name}.pem"), str(directory / f"{name}-key.pem"))
    return context


@asynccontextmanager
async def keeper_serving(source: WorkloadApiSource, keeper: Keeper) -> AsyncIterator[tuple[int, HttpsServer]]:
    server = HttpsServer(source.server_context, KeeperHandler(keeper))
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = int(listener.listeners[0].extra(SocketAttribute.local_port))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, listener)
        try:
            yield port, server
        finally:
            tg.cancel_scope.cancel()


def sources(workload_api: WorkloadApi) -> tuple[WorkloadApiSource, WorkloadApiSource]:
    workload_api.add("keeper-1", KEEPER)
    workload_api.add("nexus", NEXUS)
    both = {OURS, THEIRS}
    keeper = WorkloadApiSource(workload_api.address("keeper-1"), timeout=5, trust_domains=both)
    nexus = WorkloadApiSource(workload_api.address("nexus"), timeout=5, trust_domains=both)
    return keeper, nexus


async def test_keeper_refuses_a_nexus_minted_by_a_federated_domains_ca(
    workload_api: WorkloadApi, dev_identity: DevIdentity, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "spike.transports.trust")
    theirs = TestCa.new(THEIRS, "partner CA")
    workload_api.federate(THEIRS, [theirs])
    keeper_source, nexus_source = sources(workload_api)
    ours = dev_identity.directory / CA_CERT  # the Workload API's signing CA
    with keeper_source, nexus_source:
        keeper = Keeper(TRUST)
        async with keeper_serving(keeper_source, keeper) as (port, server):
            nexus = HttpsConnection(f"https://127.0.0.1:{port}", nexus_source.client_context, keeper_check(TRUST, 1))
            assert (await nexus.request("POST", "/v1/store/contribute", CONTRIBUTION))[0] == 200
            forged = client_presenting(theirs, NEXUS, ours, tmp_path)
            for path in ("/v1/store/shard", "/v1/store/contribute"):
                await anyio.to_thread.run_sync(partial(refused, port, forged, path, CONTRIBUTION))
            assert server.refused_peers == 2
            lines = [r.getMessage() for r in caplog.records if r.name == "spike.transports.trust"]
            assert lines and f"presenting {NEXUS} (trust domain {OURS}): its certificate chain ends at " in lines[0]
            assert (
                f"'CN=partner CA for {THEIRS}', a CA of {THEIRS}, which is not in the trust bundle of {OURS}"
                in (lines[0])
            )
            # Controls: the genuine Nexus reads the shard; other.test's CA vouches for its own IDs (a
            # pilot there is authenticated, then not authorised at a keeper: 401, an HTTP answer).
            status, body = await nexus.request("POST", "/v1/store/shard", b"{}")
            assert (status, json.loads(body)["shard"]) == (200, list(range(1, 33)))
            await nexus.aclose()
            pilot = client_presenting(theirs, f"spiffe://{THEIRS}/spike/pilot/role/superuser", ours, tmp_path)
            answer = await anyio.to_thread.run_sync(partial(raw_request, port, pilot))
            assert answer is not None and answer.status == 401
            assert server.refused_peers == 2
        assert keeper_source.current.bundles.domains == (THEIRS, OURS)


async def test_nexus_refuses_a_keeper_whose_svid_a_federated_domains_ca_issued(workload_api: WorkloadApi) -> None:
    theirs = TestCa.new(THEIRS, "partner CA")
    workload_api.federate(THEIRS, [theirs])
    keeper_source, nexus_source = sources(workload_api)
    with keeper_source, nexus_source:
        keeper = Keeper(TRUST)
        forged = workload_api.issue("keeper-1", ca=theirs)  # spiffe://spike.test/spike/keeper/1, other.test's CA
        for _ in range(500):
            if keeper_source.current.serial == forged:
                break
            await anyio.sleep(0.01)
        assert keeper_source.current.serial == forged
        async with keeper_serving(keeper_source, keeper) as (port, _):
            nexus = HttpsConnection(f"https://127.0.0.1:{port}", nexus_source.client_context, keeper_check(TRUST, 1))
            with pytest.raises(PeerIdentityError) as caught:
                await nexus.request("POST", "/v1/store/contribute", CONTRIBUTION)
            await nexus.aclose()
            assert f"peer presented {KEEPER} (trust domain {OURS}), refused:" in str(caught.value)
            assert f"a CA of {THEIRS}, which is not in the trust bundle of {OURS}" in str(caught.value)
            assert not keeper.holds_shard
            # Control: re-issued by its own domain's CA, the same keeper is Nexus's again.
            genuine = workload_api.issue("keeper-1")
            for _ in range(500):
                if keeper_source.current.serial == genuine:
                    break
                await anyio.sleep(0.01)
            assert (await nexus.request("POST", "/v1/store/contribute", CONTRIBUTION))[0] == 200
            await nexus.aclose()
            assert keeper.holds_shard


async def test_a_federated_bundles_ca_serves_that_domain_only_whatever_its_uri_san_says(
    workload_api: WorkloadApi, dev_identity: DevIdentity, tmp_path: Path
) -> None:
    """The agent says whose bundle is whose.  A CA in other.test's bundle that names spike.test in its
    URI SAN still serves other.test only (and the update is used: a federated partner's odd CA must not
    stop this workload's rotation)."""
    impostor = TestCa.new(OURS, "impostor")  # labelled spiffe://spike.test, federated as other.test's
    workload_api.federate(THEIRS, [impostor])
    keeper_source, nexus_source = sources(workload_api)
    with keeper_source, nexus_source:
        async with keeper_serving(keeper_source, Keeper(TRUST)) as (port, server):
            forged = client_presenting(impostor, NEXUS, dev_identity.directory / CA_CERT, tmp_path)
            await anyio.to_thread.run_sync(partial(refused, port, forged))
            assert server.refused_peers == 1
        assert impostor.der in keeper_source.current.bundles.authorities(THEIRS)
        assert impostor.der not in keeper_source.current.bundles.authorities(OURS)
