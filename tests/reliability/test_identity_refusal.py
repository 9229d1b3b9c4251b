"""Identity, against real processes: every bad certificate refused on every route of a keeper and of Nexus.

The in-process authorisation matrix (tests/authz/test_authz_matrix.py) is the
full table for Nexus, every caller by every route, and now has a not-yet-valid
column; tests/transport/test_mtls.py does the same for a keeper server.  This
runs the same refusals against the real `spike keeper` and `spike nexus`
processes, configured as an operator would, with the standard library's TLS
client (so the refusal is the server's):

* no certificate, an SVID from a CA nobody trusts (same trust domain and ID),
  one from another trust domain, an expired one and a not-yet-valid one:
  refused at the handshake, no HTTP answer, on every route;
* valid SVIDs with the wrong SPIFFE ID: 401 ``access_unauthorized`` on every
  route they may not use (Nexus and a workload at a keeper, another keeper,
  a keeper and Nexus itself and a workload without policies at Nexus);
* and, as controls, the right callers get the routes' normal answers.
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
from collections.abc import Iterator

import pytest

from spike.app.commands.devca import DevIdentity
from spike.protocol.wire import KEEPER_CONTRIBUTE_PATH, KEEPER_SHARD_PATH
from spike.transports.tls import SvidFiles
from tests.authz.deployment import ROUTES
from tests.reliability.fuzz_client import RawClient, request
from tests.reliability.reliability_rig import REPORT, LeakWatch, ProxiedCluster, ready_cluster
from tests.transport.transport_rig import mint_files, raw_client_context

pytestmark = pytest.mark.e2e

# SPIKE's keeper body, unchanged; Nexus adds the reason every refused identity gets (it says nothing of the path).
UNAUTHORIZED = {"err": "access_unauthorized"}
NEXUS_UNAUTHORIZED = {**UNAUTHORIZED, "reason": "no role or policy lets this identity make this request"}


@pytest.fixture(scope="module")
def running(
    dev_identity: DevIdentity, tmp_path_factory: pytest.TempPathFactory, leak_watch: LeakWatch
) -> Iterator[ProxiedCluster]:
    with ready_cluster(dev_identity, tmp_path_factory.mktemp("identity-procs"), leak_watch, "identity") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def svids(dev_identity: DevIdentity, tmp_path_factory: pytest.TempPathFactory) -> dict[str, SvidFiles]:
    directory = tmp_path_factory.mktemp("identity-svids")
    now = dt.datetime.now(dt.UTC)
    day = dt.timedelta(days=1)
    td = dev_identity.trust_domain

    def make(name: str, path: str, start: dt.datetime, end: dt.datetime) -> SvidFiles:
        return mint_files(dev_identity, directory, name, f"spiffe://{td}{path}", not_before=start, not_after=end)

    return {
        "expired-nexus": make("expired-nexus", "/spike/nexus", now - 2 * day, now - day),
        "future-nexus": make("future-nexus", "/spike/nexus", now + day, now + 2 * day),
        "expired-super": make("expired-super", "/spike/pilot/role/superuser", now - 2 * day, now - day),
        "future-super": make("future-super", "/spike/pilot/role/superuser", now + day, now + 2 * day),
        "workload": make("workload", "/workload/nobody", now - day, now + day),
    }


def handshake_refusals(
    dev_identity: DevIdentity,
    svids: dict[str, SvidFiles],
    rogue: DevIdentity,
    foreign: DevIdentity,
    role: str,
) -> dict[str, ssl.SSLContext]:
    """Client contexts that trust the server but present a certificate it must refuse (or none)."""
    bundle = dev_identity.files("nexus").bundle
    who = "nexus" if role == "keeper" else "pilot-superuser"
    short = "nexus" if role == "keeper" else "super"
    return {
        "no certificate": raw_client_context(None, bundle),
        "another CA, same ID": raw_client_context(rogue.files(who), bundle),
        "another trust domain": raw_client_context(foreign.files(who), bundle),
        "expired": raw_client_context(svids[f"expired-{short}"], bundle),
        "not yet valid": raw_client_context(svids[f"future-{short}"], bundle),
    }


def refused_everywhere(port: int, contexts: dict[str, ssl.SSLContext], paths: list[str]) -> int:
    checked = 0
    for name, context in contexts.items():
        for path in paths:
            # No HTTP answer at all: `refused` fails on any answer or a hang.
            refused_on(port, context, path, name)
            checked += 1
    return checked


def refused_on(port: int, context: ssl.SSLContext, path: str, name: str) -> None:
    client = RawClient(port, context)
    try:
        outcome = client.send(request(path), wait=5)
    finally:
        client.close()
    assert outcome.answer is None and outcome.closed, (name, path, outcome)


def unauthorized_everywhere(
    port: int,
    contexts: dict[str, ssl.SSLContext],
    calls: list[tuple[str, bytes]],
    expected: dict[str, str] = UNAUTHORIZED,
) -> int:
    checked = 0
    for name, context in contexts.items():
        client = RawClient(port, context)
        try:
            for path, body in calls:
                outcome = client.send(request(path, body), wait=5)
                assert outcome.answer is not None, (name, path, outcome)
                assert (outcome.answer.status, json.loads(outcome.answer.body)) == (401, expected), (name, path)
                checked += 1
        finally:
            client.close()
    return checked


def test_bad_identities_are_refused_by_real_keepers(
    running: ProxiedCluster,
    dev_identity: DevIdentity,
    svids: dict[str, SvidFiles],
    same_domain_foreign_ca: DevIdentity,
    foreign_identity: DevIdentity,
) -> None:
    port = running.keeper_ports[1]
    paths = [KEEPER_SHARD_PATH, KEEPER_CONTRIBUTE_PATH]
    contexts = handshake_refusals(dev_identity, svids, same_domain_foreign_ca, foreign_identity, "keeper")
    at_handshake = refused_everywhere(port, contexts, paths)
    bundle = dev_identity.files("nexus").bundle
    wrong = {
        name: raw_client_context(dev_identity.files(name), bundle)
        for name in ("keeper-2", "pilot-superuser", "pilot-recover")
    }
    wrong["workload"] = raw_client_context(svids["workload"], bundle)
    shard = json.dumps({"shard": [9] * 32, "id": 1, "epoch": 1}).encode()
    by_401 = unauthorized_everywhere(port, wrong, [(KEEPER_SHARD_PATH, b"{}"), (KEEPER_CONTRIBUTE_PATH, shard)])
    # Nexus may read and write; the shard was not replaced by any refused contribution.
    nexus = raw_client_context(dev_identity.files("nexus"), bundle)
    client = RawClient(port, nexus)
    try:
        outcome = client.send(request(KEEPER_SHARD_PATH), wait=5)
    finally:
        client.close()
    assert outcome.answer is not None and outcome.answer.status == 200
    assert json.loads(outcome.answer.body)["shard"] != [9] * 32
    REPORT.append(f"identity (keeper process): {at_handshake} refused at the handshake, {by_401} answered 401")


def test_bad_identities_are_refused_by_real_nexus(
    running: ProxiedCluster,
    dev_identity: DevIdentity,
    svids: dict[str, SvidFiles],
    same_domain_foreign_ca: DevIdentity,
    foreign_identity: DevIdentity,
) -> None:
    port = running.nexus_port
    targets = [f"{path}?action={action}" if action else path for path, action in ROUTES.values()]
    contexts = handshake_refusals(dev_identity, svids, same_domain_foreign_ca, foreign_identity, "nexus")
    at_handshake = refused_everywhere(port, contexts, targets)
    bundle = dev_identity.files("nexus").bundle
    wrong = {name: raw_client_context(dev_identity.files(name), bundle) for name in ("keeper-1", "nexus")}
    wrong["workload without policies"] = raw_client_context(svids["workload"], bundle)
    by_401 = unauthorized_everywhere(port, wrong, [(t, b"{}") for t in targets], NEXUS_UNAUTHORIZED)
    # Control: the superuser is served.
    client = RawClient(port, raw_client_context(dev_identity.files("pilot-superuser"), bundle))
    try:
        outcome = client.send(request(targets[0]), wait=5)
    finally:
        client.close()
    assert outcome.answer is not None and outcome.answer.status == 200
    REPORT.append(
        f"identity (Nexus process): {at_handshake} refused at the handshake, {by_401} answered 401, "
        f"over {len(targets)} routes"
    )
