"""Trust per domain (issue 14, H1): with two trust domains trusted, neither CA can mint the other's IDs.

The audit's deployment: Nexus, keepers and bootstrap in spike.test, the
pilots in other.test (``SPIKE_TRUST_ROOT_PILOT=other.test``), so every
process trusts both CAs.  Each CA mints SVIDs that claim the *other*
domain's IDs.  The TLS handshake accepts them (both CAs are trusted: that
is the first filter) and each must still be refused, because an SVID is
verified against the bundle of its own trust domain only:

* by a keeper and by Nexus, on every route: the connection is closed with
  no HTTP answer, and one log line names the claimed ID, its domain and why;
* by Nexus's client (to keepers) and the CLI's (to Nexus) when a server
  presents one: nothing is sent to it.

Both ways of saying which CA serves which domain are covered: one bundle file
whose CAs name their domain in a ``spiffe://`` URI SAN (as `spike
dev-identity`'s and SPIRE's CAs do), and a bundle file per domain
(``SPIKE_TRUST_BUNDLES``).  Every test ends with positive controls on the
same server: the genuine IDs still get through, and the other domain's CA
still vouches for its own domain's IDs.  Real TLS on loopback, the standard
library's client for the server side (so a refusal is the server's doing).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import socket
import ssl
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from spike.app.commands.client import NexusClient, NexusError
from spike.app.commands.devca import CA_CERT, DevIdentity, new_ca
from spike.app.keeper import KeeperHandler
from spike.app.nexus.server import NEXUS_LIMITS
from spike.protocol import Keeper
from spike.protocol.api import ApiRequest, ApiResponse
from spike.protocol.identity import TrustDomains
from spike.transports.client import HttpsConnection, PeerIdentityError
from spike.transports.svid_files import StaticSource
from spike.transports.tls import IdentityError, SvidFiles, client_context, keeper_check, server_context
from tests.api.api_helpers import Node
from tests.transport.transport_rig import in_thread, mint_files, raw_client_context, raw_request, refused, serving

pytestmark = pytest.mark.anyio

OURS = "spike.test"  # tests/conftest.py's dev_identity
THEIRS = "other.test"  # and foreign_identity's
TRUST = TrustDomains(nexus=OURS, keeper=OURS, bootstrap=OURS, pilot=THEIRS)
SHARD = list(range(1, 33))
CONTRIBUTION = json.dumps({"shard": SHARD, "id": 1, "epoch": 1}).encode()
UNAUTHORIZED = {"err": "access_unauthorized"}

# Cross-minted SVIDs: (CA that signs, the SPIFFE ID it claims), the claim in the other domain.
CROSS = {
    "nexus": (THEIRS, f"spiffe://{OURS}/spike/nexus"),
    "bootstrap": (THEIRS, f"spiffe://{OURS}/spike/bootstrap"),
    "keeper-1": (THEIRS, f"spiffe://{OURS}/spike/keeper/1"),
    "our-superuser": (THEIRS, f"spiffe://{OURS}/spike/pilot/role/superuser"),
    "their-superuser": (OURS, f"spiffe://{THEIRS}/spike/pilot/role/superuser"),
}


class Domains:
    """The two dev CAs, the cross-minted SVIDs, and the two ways to configure both bundles."""

    def __init__(self, ours: DevIdentity, theirs: DevIdentity, directory: Path) -> None:
        self.ours, self.theirs = ours, theirs
        self.our_ca = ours.directory / CA_CERT
        self.their_ca = theirs.directory / CA_CERT
        self.both = directory / "both-domains.pem"  # one file: each CA names its domain in its URI SAN
        self.both.write_bytes(self.our_ca.read_bytes() + self.their_ca.read_bytes())
        by = {OURS: ours, THEIRS: theirs}
        self.cross = {
            name: mint_files(by[ca], directory, f"cross-{name}", spiffe_id) for name, (ca, spiffe_id) in CROSS.items()
        }

    def layout(self, name: str, files: SvidFiles) -> SvidFiles:
        """`files`' SVID with both domains' bundles, configured the way `name` says."""
        if name == "one labelled file":  # also what the code before the fix was given: its union of CAs
            return SvidFiles(files.cert, files.key, self.both)
        return SvidFiles(files.cert, files.key, self.our_ca, ((THEIRS, self.their_ca),))

    def trusting_both(self, files: SvidFiles | None) -> ssl.SSLContext:
        """A plain stdlib client that trusts both CAs (so the server's refusal is the server's doing)."""
        return raw_client_context(files, self.both)


@pytest.fixture(scope="module")
def domains(
    dev_identity: DevIdentity, foreign_identity: DevIdentity, tmp_path_factory: pytest.TempPathFactory
) -> Domains:
    return Domains(dev_identity, foreign_identity, tmp_path_factory.mktemp("two-domains"))


LAYOUTS = ["one labelled file", "a bundle file per domain"]


def refusal_lines(caplog: pytest.LogCaptureFixture, claimed: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "spike.transports.trust" and f"presenting {claimed} (trust domain " in r.getMessage()
    ]


def assert_refusal_logged(caplog: pytest.LogCaptureFixture, claimed: str, signer: str) -> None:
    domain = claimed.split("/")[2]
    lines = refusal_lines(caplog, claimed)
    assert lines, f"no log line for {claimed}: {[r.getMessage() for r in caplog.records]}"
    assert f"(trust domain {domain})" in lines[0]
    assert f"ends at 'CN=spike dev CA for {signer}', a CA of {signer}" in lines[0], lines[0]
    assert f"not in the trust bundle of {domain}" in lines[0], lines[0]


# ---------------------------------------------------------------------- servers


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_keeper_refuses_ids_minted_by_the_other_domains_ca_on_every_route(
    layout: str, domains: Domains, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "spike.transports.trust")
    keeper = Keeper(TRUST)
    context = server_context(domains.layout(layout, domains.ours.keeper(1)))
    genuine_nexus = domains.trusting_both(domains.ours.files("nexus"))
    genuine_bootstrap = domains.trusting_both(domains.ours.files("bootstrap"))
    async with serving(context, KeeperHandler(keeper)) as served:
        port = served.port
        seeded = await in_thread(lambda: raw_request(port, genuine_bootstrap, "/v1/store/contribute", CONTRIBUTION))
        assert seeded is not None and seeded.status == 200
        attempts = 0
        for name in ("nexus", "bootstrap", "our-superuser", "their-superuser"):
            forged = domains.trusting_both(domains.cross[name])
            for path, body in (("/v1/store/shard", b"{}"), ("/v1/store/contribute", json.dumps({"shard": [9] * 32}))):
                payload = body if isinstance(body, bytes) else body.encode()
                await in_thread(partial(refused, port, forged, path, payload))  # no HTTP answer
                attempts += 1
        assert served.server.refused_peers == attempts
        for name in ("nexus", "bootstrap", "our-superuser"):
            assert_refusal_logged(caplog, CROSS[name][1], THEIRS)
        assert_refusal_logged(caplog, CROSS["their-superuser"][1], OURS)
        # Controls: the shard is the seeded one and Nexus still reads it; the other domain's
        # CA still vouches for its own domain's IDs (a genuine other.test pilot is authenticated,
        # and then not authorised: 401, an HTTP answer).
        read = await in_thread(lambda: raw_request(port, genuine_nexus))
        assert read is not None and (read.status, json.loads(read.body)["shard"]) == (200, SHARD)
        pilot = domains.trusting_both(domains.theirs.files("pilot-superuser"))
        answer = await in_thread(lambda: raw_request(port, pilot))
        assert answer is not None and (answer.status, json.loads(answer.body)) == (401, UNAUTHORIZED)
        assert served.server.refused_peers == attempts


@pytest.fixture
def nexus_node(tmp_path: Path) -> Iterator[Node]:
    node = Node(tmp_path / "nexus-data")
    node.unlock()
    try:
        yield node
    finally:
        node.close()


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_nexus_refuses_ids_minted_by_the_other_domains_ca_on_every_route(
    layout: str, domains: Domains, nexus_node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "spike.transports.trust")
    context = server_context(domains.layout(layout, domains.ours.files("nexus")))
    routes = sorted(nexus_node.api.routes)
    assert len(routes) > 10
    async with serving(context, nexus_node.api, NEXUS_LIMITS) as served:
        port = served.port
        attempts = 0
        for name in ("our-superuser", "nexus", "bootstrap", "their-superuser"):
            forged = domains.trusting_both(domains.cross[name])
            for path, action in routes:
                target = f"{path}?action={action}" if action else path
                await in_thread(partial(refused, port, forged, target))
                attempts += 1
        assert served.server.refused_peers == attempts
        for name in ("our-superuser", "nexus", "bootstrap"):
            assert_refusal_logged(caplog, CROSS[name][1], THEIRS)
        assert_refusal_logged(caplog, CROSS["their-superuser"][1], OURS)
        # Control: the genuine superuser is answered on the same server.
        superuser = domains.trusting_both(domains.ours.files("pilot-superuser"))
        status = await in_thread(lambda: raw_request(port, superuser, "/v1/operator/status"))
        assert status is not None and status.status == 200, status
        assert served.server.refused_peers == attempts


# ---------------------------------------------------------------------- clients


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_nexus_client_sends_nothing_to_a_keeper_minted_by_the_other_domains_ca(
    layout: str, domains: Domains
) -> None:
    """A push carries the keeper's shard: it must never reach a server that only claims to be that keeper."""
    nexus = client_context(domains.layout(layout, domains.ours.files("nexus")))
    forged_files = domains.layout(layout, domains.cross["keeper-1"])
    keeper = Keeper(TRUST)
    async with serving(server_context(forged_files), KeeperHandler(keeper)) as served:
        connection = HttpsConnection(f"https://127.0.0.1:{served.port}", nexus, keeper_check(TRUST, 1))
        with pytest.raises(PeerIdentityError) as caught:
            await connection.request("POST", "/v1/store/contribute", CONTRIBUTION)
        await connection.aclose()
        message = str(caught.value)
        assert f"peer presented {CROSS['keeper-1'][1]} (trust domain {OURS}), refused:" in message
        assert f"'CN=spike dev CA for {THEIRS}', a CA of {THEIRS}, which is not in the trust bundle of {OURS}" in (
            message
        )
        assert not keeper.holds_shard
        assert served.server.accepted == 1
    # Control: the same client context pushes to the genuine keeper.
    genuine = Keeper(TRUST)
    async with serving(server_context(domains.layout(layout, domains.ours.keeper(1))), KeeperHandler(genuine)) as ok:
        connection = HttpsConnection(f"https://127.0.0.1:{ok.port}", nexus, keeper_check(TRUST, 1))
        assert (await connection.request("POST", "/v1/store/contribute", CONTRIBUTION))[0] == 200
        await connection.aclose()
        assert genuine.holds_shard


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_cli_client_refuses_a_nexus_minted_by_the_other_domains_ca(
    layout: str, domains: Domains, nexus_node: Node
) -> None:
    """The operator's client (what `spike secret`, `spike status`, `spike bootstrap` use) to a forged Nexus."""
    forged = server_context(domains.layout(layout, domains.cross["nexus"]))
    seen: list[str] = []

    def handler(request: ApiRequest) -> ApiResponse:
        seen.append(request.path)
        return ApiResponse(200, b"{}")

    pilot = domains.layout(layout, domains.ours.files("pilot-superuser"))
    async with serving(forged, handler, NEXUS_LIMITS) as served:
        url = f"https://127.0.0.1:{served.port}"

        def status() -> NexusError:
            with NexusClient(url, pilot, TRUST, timeout=5) as nexus, pytest.raises(NexusError) as caught:
                nexus.call_bytes("/v1/operator/status", b"{}")
            return caught.value

        error = await in_thread(status)
    assert f"is unreachable: peer presented {CROSS['nexus'][1]} (trust domain {OURS}), refused:" in str(error)
    assert f"a CA of {THEIRS}, which is not in the trust bundle of {OURS}" in str(error)
    assert seen == []
    # Control: the same client reaches the genuine Nexus.
    async with serving(server_context(domains.layout(layout, domains.ours.files("nexus"))), nexus_node.api) as ok:
        url = f"https://127.0.0.1:{ok.port}"

        def genuine() -> bytes:
            with NexusClient(url, pilot, TRUST, timeout=5) as nexus:
                return nexus.call_bytes("/v1/operator/status", b"{}")

        assert json.loads(await in_thread(genuine))


# ---------------------------------------------------------------------- configuration data, never a guess


def test_an_unlabelled_ca_in_a_bundle_of_several_domains_is_refused_at_load(domains: Domains, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    ca, _ = new_ca("x", "unlabelled CA", not_before=now, not_after=now + dt.timedelta(days=1), names_trust_domain=False)
    plain = ca.public_bytes(serialization.Encoding.PEM)
    mixed = tmp_path / "mixed.pem"
    mixed.write_bytes(domains.both.read_bytes() + plain)
    files = SvidFiles(domains.ours.files("nexus").cert, domains.ours.files("nexus").key, mixed)
    with pytest.raises(IdentityError) as caught:
        StaticSource(files).start()
    message = str(caught.value)
    assert message.startswith(f"trust bundle {mixed}: CA certificate 'CN=unlabelled CA for x' has no spiffe://")
    assert f"several trust domains ({THEIRS}, {OURS})" in message
    assert "\n" not in message
    # Alone with its own domain's labelled CA, an unlabelled CA serves the workload's own domain.
    single = tmp_path / "single.pem"
    single.write_bytes(domains.our_ca.read_bytes() + plain)
    loaded = StaticSource(SvidFiles(files.cert, files.key, single)).start().current
    assert loaded.bundles.domains == (OURS,)
    assert len(loaded.bundles.authorities(OURS)) == 2


def test_a_per_domain_bundle_whose_ca_names_another_domain_is_refused_at_load(domains: Domains) -> None:
    nexus = domains.ours.files("nexus")
    swapped = SvidFiles(nexus.cert, nexus.key, domains.our_ca, ((THEIRS, domains.our_ca),))
    with pytest.raises(IdentityError) as caught:
        StaticSource(swapped).start()
    assert str(caught.value) == (
        f"trust bundle of {THEIRS} ({domains.our_ca}): CA certificate 'CN=spike dev CA for {OURS}' "
        f"in the bundle of {THEIRS} names trust domain {OURS} (URI SAN)"
    )


# ---------------------------------------------------------------------- resumed TLS sessions


def _tls12_client(files: SvidFiles, bundle: Path) -> ssl.SSLContext:
    context = raw_client_context(files, bundle)
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # session-ID resumption, no tickets to wait for
    return context


def _two_connections(port: int, context: ssl.SSLContext, between: Callable[[], None]) -> list[tuple[bool, int]]:
    """Two requests on two connections, the second resuming the first's TLS session: (resumed, status)."""
    results: list[tuple[bool, int]] = []
    session = None
    for _ in range(2):
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls,
        ):
            tls.sendall(b"POST /v1/store/shard HTTP/1.1\r\nHost: k\r\nContent-Length: 2\r\n\r\n{}")
            try:
                data = tls.recv(65536)
            except OSError:
                data = b""  # refused: cut off without an answer
            results.append((tls.session_reused, int(data.split(b" ", 2)[1]) if data else 0))
            session = tls.session
            with contextlib.suppress(OSError):
                tls.unwrap()  # a clean close keeps the session resumable
        between()
    return results


async def test_a_resumed_session_is_let_in_only_for_a_certificate_already_checked(domains: Domains) -> None:
    """A resumed session carries no chain to check: only a certificate whose chain was seen to end in
    its own domain's bundle (by this context's verifier) may resume; any other is refused."""
    from spike.transports.peer_trust import PeerVerifier, attach, verifier_of

    context = server_context(domains.layout(LAYOUTS[0], domains.ours.keeper(1)))
    nexus = _tls12_client(domains.ours.files("nexus"), domains.both)
    async with serving(context, KeeperHandler(Keeper(TRUST))) as served:
        port = served.port
        # Remembered: the full handshake was checked, the resumption is let in.
        assert await in_thread(lambda: _two_connections(port, nexus, lambda: None)) == [(False, 404), (True, 404)]
        assert served.server.refused_peers == 0

        # Forgotten (a verifier with no memory, as after a rotation of the bundles): the resumed
        # session cannot be checked, and is refused.
        def forget() -> None:
            attach(context, PeerVerifier(verifier_of(context).bundles))

        assert await in_thread(lambda: _two_connections(port, nexus, forget)) == [(False, 404), (True, 0)]
        assert served.server.refused_peers == 1


def test_bundles_of_a_loaded_identity_keep_each_ca_with_its_domain(domains: Domains) -> None:
    from spike.protocol.trust import TrustBundles

    for layout in LAYOUTS:
        loaded = StaticSource(domains.layout(layout, domains.ours.files("nexus"))).start().current
        assert loaded.bundles.domains == (THEIRS, OURS)
        assert loaded.authorities == 2
        bundles = loaded.bundles
        assert bundles == TrustBundles({OURS: bundles.authorities(OURS), THEIRS: bundles.authorities(THEIRS)})
        assert bundles.authorities(OURS).isdisjoint(bundles.authorities(THEIRS))
