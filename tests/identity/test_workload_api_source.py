"""`WorkloadApiSource` against a real gRPC Workload API server (workload_api.py).

Start, rotation pushed mid-run (a new SVID, a new CA added to the bundle, the
old one removed), updates that cannot be used, a stream the package gives up
on, start-up failures, and threads that end with the source.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from spiffe import WorkloadApiClient
from spiffe._proto import workload_pb2, workload_pb2_grpc

from spike.app.commands.devca import DevIdentity
from spike.protocol.identity import SpiffeId
from spike.transports.identity import LoadedIdentity
from spike.transports.tls import IdentityError, client_context
from spike.transports.workload_api import WorkloadApiSource
from tests.identity.tls_probe import handshake, wait_for
from tests.identity.workload_api import TestCa, WorkloadApi

TD = "spike.test"
KEEPER = f"spiffe://{TD}/spike/keeper/1"
NEXUS = f"spiffe://{TD}/spike/nexus"


@pytest.fixture
def pair(workload_api: WorkloadApi) -> Iterator[tuple[WorkloadApiSource, WorkloadApiSource]]:
    """A keeper and a Nexus, each with its own Workload API socket, started."""
    workload_api.add("keeper-1", KEEPER)
    workload_api.add("nexus", NEXUS)
    keeper = WorkloadApiSource(workload_api.address("keeper-1"), timeout=5, restart_delay=0.05)
    nexus = WorkloadApiSource(workload_api.address("nexus"), timeout=5, restart_delay=0.05)
    with keeper, nexus:
        yield keeper, nexus


def test_start_loads_the_svid_and_bundle_the_agent_streams(
    workload_api: WorkloadApi, pair: tuple[WorkloadApiSource, WorkloadApiSource]
) -> None:
    keeper, nexus = pair
    assert keeper.spiffe_id == SpiffeId.parse(KEEPER)
    assert nexus.spiffe_id == SpiffeId.parse(NEXUS)
    assert keeper.generation == nexus.generation == 1
    assert keeper.current.serial == workload_api.serial("keeper-1")
    seen = handshake(keeper.server_context(), nexus.client_context())
    assert (seen.client_saw, seen.server_saw, seen.error) == (
        workload_api.serial("keeper-1"),
        workload_api.serial("nexus"),
        "",
    )
    # The package called the way a SPIRE agent requires (with the security header).
    service = workload_api.workloads["keeper-1"].service
    assert service.svid_streams >= 1
    assert service.refused_calls == 0


def test_a_rotated_svid_is_presented_by_the_next_connection(
    workload_api: WorkloadApi, pair: tuple[WorkloadApiSource, WorkloadApiSource]
) -> None:
    keeper, nexus = pair
    rotations: list[LoadedIdentity] = []
    keeper.subscribe(rotations.append)
    old_server = keeper.server_context()
    first = workload_api.serial("keeper-1")

    second = workload_api.issue("keeper-1")
    wait_for(lambda: keeper.generation == 2, "the keeper to take the new SVID")

    assert second != first
    assert [r.serial for r in rotations] == [second]
    assert handshake(keeper.server_context(), nexus.client_context()).client_saw == second
    # A context handed out before the rotation is left as it was (connections made with it keep it).
    assert handshake(old_server, nexus.client_context()).client_saw == first
    assert nexus.generation == 1


def test_ca_rotation_new_ca_added_then_svids_reissued_then_old_ca_removed(
    workload_api: WorkloadApi, pair: tuple[WorkloadApiSource, WorkloadApiSource], dev_identity: DevIdentity
) -> None:
    keeper, nexus = pair
    old_ca = workload_api.signing_ca
    new_ca = TestCa.new(TD, "next CA")

    # 1. The new CA joins the bundle: both sides trust both, SVIDs unchanged.
    workload_api.set_bundle([old_ca, new_ca])
    wait_for(lambda: keeper.current.authorities == nexus.current.authorities == 2, "both to trust two CAs")
    # 2. The keeper is re-issued by the new CA first: old and new SVIDs still meet.
    new_keeper = workload_api.issue("keeper-1", new_ca)
    wait_for(lambda: keeper.current.serial == new_keeper, "the keeper's new-CA SVID")
    seen = handshake(keeper.server_context(), nexus.client_context())
    assert (seen.client_saw, seen.server_saw, seen.error) == (new_keeper, workload_api.serial("nexus"), "")
    # 3. Everyone on the new CA, and the old CA leaves the bundle.
    workload_api.issue_all(new_ca)
    workload_api.set_bundle([new_ca])
    wait_for(
        lambda: (
            keeper.current.authorities == nexus.current.authorities == 1
            and nexus.current.serial == workload_api.serial("nexus")
        ),
        "both on the new CA alone",
    )
    seen = handshake(keeper.server_context(), nexus.client_context())
    assert (seen.client_saw, seen.server_saw, seen.error) == (
        workload_api.serial("keeper-1"),
        workload_api.serial("nexus"),
        "",
    )
    # The old CA is really gone: a client with an old-CA SVID is refused by the keeper now.
    stale = handshake(keeper.server_context(), client_context(dev_identity.files("nexus")))
    assert stale.server_saw is None
    assert stale.error


def test_an_update_that_does_not_load_keeps_the_identity_and_is_logged_once(
    workload_api: WorkloadApi,
    pair: tuple[WorkloadApiSource, WorkloadApiSource],
    caplog: pytest.LogCaptureFixture,
) -> None:
    keeper, nexus = pair
    caplog.set_level(logging.WARNING, "spike.transports.identity")
    good = workload_api.serial("keeper-1")
    workload = workload_api.workloads["keeper-1"]
    # A key that belongs to another SVID: the package passes it on, OpenSSL refuses the pair.
    _, other_key = workload_api.signing_ca.mint(KEEPER)
    mismatched = workload_api.response(workload)
    mismatched.svids[0].x509_svid_key = _pkcs8_der(other_key)
    for _ in range(3):
        before = keeper.rejected
        workload_api.send("keeper-1", mismatched)
        wait_for(lambda before=before: keeper.rejected > before, "the broken update to arrive")

    assert keeper.current.serial == good
    assert keeper.generation == 1
    assert handshake(keeper.server_context(), nexus.client_context()).client_saw == good
    warnings = [r.getMessage() for r in caplog.records if "cannot be used" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "KEY_VALUES_MISMATCH" in warnings[0]

    fixed = workload_api.issue("keeper-1")
    wait_for(lambda: keeper.current.serial == fixed, "the next good SVID")


def test_a_stream_the_package_gives_up_on_is_opened_again(
    workload_api: WorkloadApi,
    pair: tuple[WorkloadApiSource, WorkloadApiSource],
    caplog: pytest.LogCaptureFixture,
) -> None:
    keeper, _ = pair
    caplog.set_level(logging.WARNING, "spike.transports.identity")
    good = workload_api.serial("keeper-1")
    service = workload_api.workloads["keeper-1"].service
    streams = service.svid_streams
    # An empty bundle fails inside the package, which then ends the stream for good.
    workload_api.send("keeper-1", workload_api.response(workload_api.workloads["keeper-1"], bundle=b""))
    wait_for(lambda: any("stream failed" in r.getMessage() for r in caplog.records), "the stream to fail")
    assert keeper.current.serial == good

    fixed = workload_api.issue("keeper-1")
    wait_for(lambda: keeper.current.serial == fixed, "the SVID from the reopened stream")
    assert service.svid_streams > streams


def test_bundles_of_other_trust_domains_are_trusted_only_when_configured(workload_api: WorkloadApi) -> None:
    workload_api.add("keeper-1", KEEPER)
    workload_api.federate("partner.test", [TestCa.new("partner.test")])
    with (
        WorkloadApiSource(workload_api.address("keeper-1"), timeout=5, trust_domains={TD}) as limited,
        WorkloadApiSource(workload_api.address("keeper-1"), timeout=5, trust_domains={TD, "partner.test"}) as wider,
        WorkloadApiSource(workload_api.address("keeper-1"), timeout=5) as everything,
    ):
        assert limited.current.authorities == 1
        assert wider.current.authorities == 2
        assert everything.current.authorities == 2


def test_the_fixture_serves_fetch_x509_bundles_and_requires_the_security_header(workload_api: WorkloadApi) -> None:
    workload = workload_api.add("keeper-1", KEEPER)
    with WorkloadApiClient(workload.address) as client:
        bundles = client.fetch_x509_bundles(timeout=5)
        assert [len(b.x509_authorities) for b in bundles.bundles] == [1]
        workload_api.set_bundle([workload_api.signing_ca, TestCa.new(TD)])
        bundles = client.fetch_x509_bundles(timeout=5)
        assert [len(b.x509_authorities) for b in bundles.bundles] == [2]
    with grpc.insecure_channel(f"unix:{workload.socket}") as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=5))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------------- start-up failures


def test_no_socket_is_one_clear_error(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(IdentityError, match=r"^no SPIFFE Workload API socket at /\S+/agent\.sock"):
        WorkloadApiSource(f"unix://{tmp_path}/agent.sock", timeout=5).start()


def test_a_path_that_is_not_a_socket_is_refused(tmp_path: os.PathLike[str]) -> None:
    path = f"{tmp_path}/agent.sock"
    with open(path, "w"):
        pass
    with pytest.raises(IdentityError, match="is not a socket"):
        WorkloadApiSource(path, timeout=5).start()


def test_an_unregistered_workload_fails_after_the_timeout_with_the_agents_reason(workload_api: WorkloadApi) -> None:
    workload_api.add("stranger", f"spiffe://{TD}/stranger", register=False)
    started = time.monotonic()
    with pytest.raises(IdentityError, match=r"sent no X\.509 SVID within 0\.3s .*no identity issued"):
        WorkloadApiSource(workload_api.address("stranger"), timeout=0.3).start()
    assert time.monotonic() - started < 3


def test_a_silent_socket_fails_after_the_timeout(tmp_path: os.PathLike[str]) -> None:
    path = f"{tmp_path}/agent.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)  # bound but never accepting: the agent hangs
    try:
        with pytest.raises(IdentityError, match=r"sent no X\.509 SVID within 0\.3s"):
            WorkloadApiSource(path, timeout=0.3).start()
    finally:
        listener.close()


def test_a_missing_bundle_is_one_clear_error(workload_api: WorkloadApi) -> None:
    workload = workload_api.add("keeper-1", KEEPER)
    workload_api.send("keeper-1", workload_api.response(workload, bundle=b""))
    with pytest.raises(IdentityError, match="sent no usable trust bundle"):
        WorkloadApiSource(workload.address, timeout=5).start()


def test_stop_ends_the_package_threads(workload_api: WorkloadApi) -> None:
    workload_api.add("keeper-1", KEEPER)

    def ours() -> set[threading.Thread]:  # leaving out the fixture server's own worker threads
        return {t for t in threading.enumerate() if not t.name.startswith("wlapi-")}

    before = ours()
    source = WorkloadApiSource(workload_api.address("keeper-1"), timeout=5).start()
    assert ours() - before, "the package streams in a thread of its own"
    source.stop()
    source.stop()  # twice is fine
    wait_for(lambda: not (ours() - before), "the stream's threads to end")
    # What was handed out stays usable: a connection being set up during stop is not broken.
    assert source.current.spiffe_id == SpiffeId.parse(KEEPER)


def _pkcs8_der(key_pem: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(key_pem, None)
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
