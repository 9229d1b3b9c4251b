"""A whole deployment of real `spike` processes whose identities come from the Workload API, rotated mid-run.

Three keepers and a Nexus (the end-to-end harness), plus `spike bootstrap`,
`spike status` and `spike secret` runs, each with SPIFFE_ENDPOINT_SOCKET
pointing at its own socket of the test's Workload API server and no SVID file
anywhere.  While Nexus polls every half second, the server re-issues every
SVID, then rotates the CA the way SPIRE does (the new CA joins the bundle,
SVIDs are re-issued from it, the old CA leaves).  Every step is checked on the
wire: the certificate a new connection is shown, polls that carry on with no
failure, a restarted keeper that only trusts the new CA being re-seeded by
Nexus (so Nexus's *client* side presents the new SVID too), and a client with
an old-CA SVID being refused.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from spike.app.commands.client import fetch_status, nexus_connection
from spike.app.commands.devca import DevIdentity
from spike.transports.blocking import ClientSession
from spike.transports.client import TransportError
from spike.transports.tls import SvidFiles, client_context
from spike.transports.workload_api import WorkloadApiSource
from tests.e2e.harness import Cluster, HarnessError, presented_serial, wait_until
from tests.identity.workload_api import TestCa, WorkloadApi

pytestmark = pytest.mark.e2e

TD = "spike.test"
WORKLOADS = {
    "nexus": "/spike/nexus",
    "keeper-1": "/spike/keeper/1",
    "keeper-2": "/spike/keeper/2",
    "keeper-3": "/spike/keeper/3",
    "bootstrap": "/spike/bootstrap",
    "pilot-superuser": "/spike/pilot/role/superuser",
}
ROTATED = "X.509 SVID rotated"


@dataclass
class WorkloadApiCluster(Cluster):
    """The harness's cluster, with SPIFFE_ENDPOINT_SOCKET instead of SVID files for every process."""

    api: Any = None

    def _env(self, files: SvidFiles, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = super()._env(files, extra)
        for name in ("SPIKE_SVID_CERT", "SPIKE_SVID_KEY", "SPIKE_SVID_BUNDLE"):
            env.pop(name)
        env["SPIFFE_ENDPOINT_SOCKET"] = self.api.address(files.cert.stem)  # nexus.pem -> the nexus socket
        return env


@pytest.fixture
def cluster(dev_identity: DevIdentity, workload_api: WorkloadApi, tmp_path: Path) -> Iterator[WorkloadApiCluster]:
    for name, path in WORKLOADS.items():
        # Nexus registered as with SPIRE's `-dns localhost -dns 127.0.0.1`: Vault clients dial it by name.
        names = ("localhost", "127.0.0.1") if name == "nexus" else ()
        workload_api.add(name, f"spiffe://{TD}{path}", server_names=names)
    deployment = WorkloadApiCluster(dev_identity, tmp_path / "cluster", api=workload_api)
    try:
        yield deployment
    finally:
        deployment.close()


class Pilot:
    """The test's own operator client, also on the Workload API (and so rotated along with everyone)."""

    def __init__(self, cluster: Cluster, source: WorkloadApiSource) -> None:
        self.source = source
        self.session = ClientSession(source.client_context, timeout=5.0)
        self.nexus = nexus_connection(self.session, cluster.nexus_url, cluster.trust)

    def status(self) -> dict[str, Any]:
        return msgspec.to_builtins(fetch_status(self.nexus))  # type: ignore[no-any-return]

    def wait(self, predicate: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        last: list[Any] = [None]

        def check() -> dict[str, Any] | None:
            try:
                body = last[0] = self.status()
            except TransportError as exc:
                last[0] = str(exc)
                return None
            return body if predicate(body) else None

        try:
            found: dict[str, Any] = wait_until(check, what, timeout=20)
        except HarnessError as exc:
            raise HarnessError(f"{exc}; last status: {last[0]}") from None
        return found


def keepers(status: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {k["id"]: k for k in status["keepers"]}


def test_a_deployment_on_the_workload_api_survives_svid_and_ca_rotation(
    cluster: WorkloadApiCluster, workload_api: WorkloadApi, dev_identity: DevIdentity
) -> None:
    cluster.start()
    boot = cluster.bootstrap()
    assert boot.returncode == 0, boot
    with WorkloadApiSource(workload_api.address("pilot-superuser"), timeout=5, trust_domains={TD}) as source:
        pilot = Pilot(cluster, source)
        try:
            _scenario(cluster, workload_api, pilot, dev_identity)
        finally:
            pilot.session.close()


def _scenario(cluster: WorkloadApiCluster, api: WorkloadApi, pilot: Pilot, dev_identity: DevIdentity) -> None:
    pilot.wait(lambda s: s["phase"] == "ready" and s["redundancy"] == 1, "ready, every keeper holding")
    status = cluster.run("status", "--format", "json")
    assert status.returncode == 0, status
    put = cluster.run("secret", "put", "apps/db", "password=before-rotation")
    assert put.returncode == 0, put
    processes = [cluster.nexus(), *(cluster.keeper(i) for i in cluster.keeper_ids)]
    rotations = 0

    def everyone_rotated(what: str) -> None:
        nonlocal rotations
        rotations += 1
        for proc in processes:
            cluster.wait_log(proc, ROTATED, count=rotations, timeout=10)
        wait_until(lambda: pilot.source.generation == rotations + 1, f"the pilot to take {what}")

    def new_connections_show_current_svids() -> None:
        ctx = pilot.source.client_context()
        for keeper_id in cluster.keeper_ids:
            assert presented_serial(cluster.keeper_ports[keeper_id], ctx) == api.serial(f"keeper-{keeper_id}")
        assert presented_serial(cluster.nexus_port, ctx) == api.serial("nexus")

    def polling_goes_on(since: dict[int, dict[str, Any]], ids: list[int]) -> dict[str, Any]:
        """A few more polls of each keeper, none failed, all still holding their shard."""
        return pilot.wait(
            lambda s: (
                all(
                    keepers(s)[i]["polls"] >= since[i]["polls"] + 3
                    and keepers(s)[i]["failures"] == since[i]["failures"]
                    and keepers(s)[i]["state"] == "holding"
                    for i in ids
                )
                and s["phase"] == "ready"
            ),
            f"keepers {ids} polled without failure",
        )

    baseline = keepers(pilot.status())

    # 1. Every SVID re-issued by the same CA.
    first_serials = {name: api.serial(name) for name in WORKLOADS}
    api.issue_all()
    everyone_rotated("the re-issued SVIDs")
    assert all(api.serial(name) != first_serials[name] for name in WORKLOADS)
    new_connections_show_current_svids()
    polling_goes_on(baseline, cluster.keeper_ids)

    # 2. A CA rotation: the new CA joins the bundle, SVIDs move to it, the old CA leaves.
    old_ca, new_ca = api.signing_ca, TestCa.new(TD, "next CA")
    api.set_bundle([old_ca, new_ca])
    everyone_rotated("the new CA in the bundle")
    api.issue_all(new_ca)
    everyone_rotated("SVIDs from the new CA")
    new_connections_show_current_svids()
    api.set_bundle([new_ca])
    everyone_rotated("the bundle without the old CA")
    new_connections_show_current_svids()
    after = keepers(polling_goes_on(baseline, cluster.keeper_ids))
    assert all(after[i]["failures"] == baseline[i]["failures"] for i in cluster.keeper_ids)

    # 3. Nexus's client side: a keeper restarted now trusts the new CA alone, so Nexus
    #    re-seeds it only if it presents its new SVID on the new connection.
    cluster.kill_keeper(3)
    cluster.start_keeper(3)
    processes[-1] = cluster.keeper(3)
    pilot.wait(
        lambda s: keepers(s)[3]["state"] == "holding" and s["redundancy"] == 1,
        "the restarted keeper re-seeded over a new-CA connection",
    )
    cluster.wait_log(cluster.nexus(), r"keeper 3 .*re-seeded", timeout=10)

    # 4. The old CA is really out: a client holding an old-CA SVID is refused by Nexus.
    stale = client_context(dev_identity.files("pilot-superuser"))
    with (
        pytest.raises((ssl.SSLError, OSError)),
        socket.create_connection(("127.0.0.1", cluster.nexus_port), timeout=5) as raw,
        stale.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"POST /v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        if not tls.recv(1):
            raise OSError("closed by Nexus")

    # 5. The command-line tools, on the rotated identities.
    got = cluster.run("secret", "get", "apps/db", "password")
    assert (got.returncode, got.stdout.strip()) == (0, "before-rotation"), got
    final = cluster.run("status", "--format", "json")
    assert final.returncode == 0, final
    assert final.json()["redundancy"] == 1

    for proc in processes:
        text = proc.text()
        assert "Traceback" not in text, f"{proc.name}:\n{text}"
        assert " ERROR " not in text, f"{proc.name}:\n{text}"


def test_a_workload_api_svid_with_dns_names_serves_vault_clients(
    cluster: WorkloadApiCluster, workload_api: WorkloadApi, dev_identity: DevIdentity
) -> None:
    """Nexus serves its Workload API SVID with the DNS/IP SANs it came with, as it is, through every rotation:
    a Vault client (hvac, checking the host name it dials) talks to it, before and after a rotation."""
    import hvac

    cluster.start_ready()
    pilot = dev_identity.files("pilot-superuser")

    def vault_clients_work(value: str) -> None:
        for host in ("127.0.0.1", "localhost"):
            client = hvac.Client(
                url=f"https://{host}:{cluster.nexus_port}",
                cert=(str(pilot.cert), str(pilot.key)),
                verify=str(pilot.bundle),
            )
            client.token = None
            kv = client.secrets.kv.v2
            kv.create_or_update_secret("app/wl", secret={"v": value}, mount_point="secret")
            assert kv.read_secret_version("app/wl", raise_on_deleted_version=True, mount_point="secret")["data"][
                "data"
            ] == {"v": value}
            client.adapter.close()

    vault_clients_work("before")
    serial = workload_api.issue("nexus")
    ctx = client_context(SvidFiles(pilot.cert, pilot.key, pilot.bundle))
    wait_until(lambda: presented_serial(cluster.nexus_port, ctx) == serial, "the rotated SVID presented")
    vault_clients_work("after")
