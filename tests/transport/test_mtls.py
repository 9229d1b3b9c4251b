"""mTLS on a real keeper server: who is refused at the handshake, who gets 401, who gets the shard.

Every negative case talks to the server with the standard library's `ssl`
module, so the refusal is the server's doing; every test ends with a
positive control on the same server, so a server that refuses everyone
cannot pass.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import ssl
from pathlib import Path

import pytest

from spike.app.commands.devca import DevIdentity
from spike.transports.client import HttpsConnection
from spike.transports.tls import SvidFiles, client_context, keeper_check
from tests.transport.transport_rig import (
    NEXUS_ID,
    TRUST,
    in_thread,
    keeper_server,
    mint_files,
    raw_client_context,
    raw_request,
    refused,
    wait_for,
)

pytestmark = pytest.mark.anyio

SHARD = list(range(1, 33))
CONTRIBUTION = json.dumps({"shard": SHARD, "id": 1, "epoch": 7}).encode()
NOT_FOUND = {"err": "api_not_found"}
UNAUTHORIZED = {"err": "access_unauthorized"}


@pytest.fixture(scope="module")
def odd_svids(dev_identity: DevIdentity, tmp_path_factory: pytest.TempPathFactory) -> dict[str, SvidFiles]:
    """Nexus SVIDs from the trusted dev CA that must still be refused, and one that must not."""
    directory = tmp_path_factory.mktemp("odd-svids")
    now = dt.datetime.now(dt.UTC)
    day = dt.timedelta(days=1)
    return {
        "expired": mint_files(
            dev_identity, directory, "expired", NEXUS_ID, not_before=now - 2 * day, not_after=now - day
        ),
        "not-yet-valid": mint_files(
            dev_identity, directory, "future", NEXUS_ID, not_before=now + day, not_after=now + 2 * day
        ),
        "other-domain-nexus": mint_files(
            dev_identity,
            directory,
            "other-domain",
            "spiffe://other.test/spike/nexus",
            not_before=now - day,
            not_after=now + day,
        ),
        "look-alike-nexus": mint_files(
            dev_identity,
            directory,
            "look-alike",
            f"{NEXUS_ID}/extra",
            not_before=now - day,
            not_after=now + day,
        ),
        "fresh-nexus": mint_files(
            dev_identity, directory, "fresh", NEXUS_ID, not_before=now - day, not_after=now + day
        ),
    }


def bundle(identity: DevIdentity) -> Path:
    return identity.files("nexus").bundle


def nexus_raw(identity: DevIdentity) -> ssl.SSLContext:
    return raw_client_context(identity.files("nexus"), bundle(identity))


# ---------------------------------------------------------------------- the happy path


async def test_nexus_gets_404_then_the_contributed_shard(dev_identity: DevIdentity) -> None:
    nexus = nexus_raw(dev_identity)
    bootstrap = raw_client_context(dev_identity.files("bootstrap"), bundle(dev_identity))
    async with keeper_server(dev_identity, 1) as k:
        port = k.served.port
        empty = await in_thread(lambda: raw_request(port, nexus))
        assert (empty.status, json.loads(empty.body)) == (404, NOT_FOUND)
        assert empty.headers["content-type"] == "application/json"

        stored = await in_thread(lambda: raw_request(port, bootstrap, "/v1/store/contribute", CONTRIBUTION))
        assert (stored.status, json.loads(stored.body)) == (200, {})
        assert k.keeper.holds_shard

        answer = await in_thread(lambda: raw_request(port, nexus))
        assert answer.status == 200
        assert json.loads(answer.body) == {"shard": SHARD, "id": 1, "epoch": 7}


async def test_our_client_reads_the_shard_over_mtls(dev_identity: DevIdentity) -> None:
    async with keeper_server(dev_identity, 1) as k:
        connection = HttpsConnection(k.served.url, client_context(dev_identity.files("nexus")), keeper_check(TRUST, 1))
        try:
            assert await connection.request("POST", "/v1/store/shard", b"{}") == (404, b'{"err":"api_not_found"}')
            assert await connection.request("POST", "/v1/store/contribute", CONTRIBUTION) == (200, b"{}")
            status, body = await connection.request("POST", "/v1/store/shard", b"{}")
        finally:
            await connection.aclose()
        assert status == 200
        assert json.loads(body)["shard"] == SHARD


# ---------------------------------------------------------------------- refused at the handshake


@pytest.mark.parametrize(
    ("case", "logged"),
    [
        ("no-certificate", "TLS handshake failed: SSLError"),
        ("same-domain-rogue-ca", "TLS handshake failed: SSLCertVerificationError"),
        ("foreign-domain", "TLS handshake failed: SSLCertVerificationError"),
        ("expired", "TLS handshake failed: SSLCertVerificationError"),
        ("not-yet-valid", "TLS handshake failed: SSLCertVerificationError"),
    ],
)
async def test_client_certificate_refused_at_handshake(
    case: str,
    logged: str,
    caplog: pytest.LogCaptureFixture,
    dev_identity: DevIdentity,
    odd_svids: dict[str, SvidFiles],
    same_domain_foreign_ca: DevIdentity,
    foreign_identity: DevIdentity,
) -> None:
    presented = {
        "no-certificate": None,
        "same-domain-rogue-ca": same_domain_foreign_ca.files("nexus"),  # spiffe://spike.test/spike/nexus
        "foreign-domain": foreign_identity.files("nexus"),  # spiffe://other.test/spike/nexus
        "expired": odd_svids["expired"],
        "not-yet-valid": odd_svids["not-yet-valid"],
    }[case]
    ctx = raw_client_context(presented, bundle(dev_identity))  # the client trusts the keeper
    async with keeper_server(dev_identity, 1) as k:
        port = k.served.port
        with caplog.at_level(logging.DEBUG, logger="spike.transports.server"):
            await in_thread(lambda: refused(port, ctx))
            # The refusal is the handshake's: no HTTP answer came, and the server says so.
            await wait_for(lambda: k.served.server.open_connections == 0, 2)
        assert logged in [r.getMessage() for r in caplog.records]
        # The server still serves a valid Nexus, on a new connection.
        answer = await in_thread(lambda: raw_request(port, nexus_raw(dev_identity)))
        assert answer.status == 404


async def test_fresh_svid_from_the_same_ca_is_accepted(
    dev_identity: DevIdentity, odd_svids: dict[str, SvidFiles]
) -> None:
    """Control for the expired and not-yet-valid cases: minted the same way, valid now."""
    ctx = raw_client_context(odd_svids["fresh-nexus"], bundle(dev_identity))
    async with keeper_server(dev_identity, 1) as k:
        answer = await in_thread(lambda: raw_request(k.served.port, ctx))
        assert (answer.status, json.loads(answer.body)) == (404, NOT_FOUND)


@pytest.mark.parametrize("path", ["/v1/store/shard", "/v1/store/contribute"])
async def test_another_domains_id_minted_by_our_ca_is_refused_at_the_handshake(
    path: str, dev_identity: DevIdentity, odd_svids: dict[str, SvidFiles]
) -> None:
    """Our CA vouches for our trust domain only: its SVID for spiffe://other.test/... is no SVID at all
    (trust per domain, issue 14 H1).  It used to be authenticated and then refused by route (401)."""
    forged = raw_client_context(odd_svids["other-domain-nexus"], bundle(dev_identity))
    bootstrap = raw_client_context(dev_identity.files("bootstrap"), bundle(dev_identity))
    async with keeper_server(dev_identity, 1) as k:
        port = k.served.port
        await in_thread(lambda: raw_request(port, bootstrap, "/v1/store/contribute", CONTRIBUTION))
        await in_thread(lambda: refused(port, forged, path, json.dumps({"shard": [9] * 32}).encode()))
        assert k.served.server.refused_peers == 1
        read = await in_thread(lambda: raw_request(port, nexus_raw(dev_identity)))
        assert (read.status, json.loads(read.body)["shard"]) == (200, SHARD)


# ---------------------------------------------------------------------- authenticated, not authorised


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("keeper-2", "/v1/store/shard"),
        ("keeper-1", "/v1/store/shard"),
        ("pilot-superuser", "/v1/store/shard"),
        ("bootstrap", "/v1/store/shard"),
        ("look-alike-nexus", "/v1/store/shard"),
        ("keeper-2", "/v1/store/contribute"),
        ("pilot-superuser", "/v1/store/contribute"),
    ],
)
async def test_wrong_spiffe_id_gets_401(
    name: str, path: str, dev_identity: DevIdentity, odd_svids: dict[str, SvidFiles]
) -> None:
    files = odd_svids[name] if name in odd_svids else dev_identity.files(name)
    ctx = raw_client_context(files, bundle(dev_identity))
    bootstrap = raw_client_context(dev_identity.files("bootstrap"), bundle(dev_identity))
    async with keeper_server(dev_identity, 1) as k:
        port = k.served.port
        # Seeded, so a wrongly granted read would leak the shard and a wrongly granted
        # contribution would replace it.
        await in_thread(lambda: raw_request(port, bootstrap, "/v1/store/contribute", CONTRIBUTION))
        other = json.dumps({"shard": [9] * 32}).encode()
        answer = await in_thread(lambda: raw_request(port, ctx, path, other))
        assert (answer.status, json.loads(answer.body)) == (401, UNAUTHORIZED)
        read = await in_thread(lambda: raw_request(port, nexus_raw(dev_identity)))
        assert (read.status, json.loads(read.body)["shard"]) == (200, SHARD)
