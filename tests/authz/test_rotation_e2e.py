"""SVID files rotated under a running deployment of real `spike` processes, while reads and polls go on.

tests/identity covers rotation through the Workload API (real processes,
polls and a final read) and a lone keeper following its files.  This adds the
case in between, with traffic: three keepers and a Nexus on SVID files that
are re-issued twice (written atomically, as spiffe-helper does) while

  * a workload with a policy reads a secret without pause, over one kept-alive
    connection and over a new connection per read (each one a handshake with
    the SVIDs of its moment, the workload's own files rotating too);
  * Nexus keeps polling its keepers.

Nothing may fail: no read error, no failed poll, redundancy stays 1; new
connections show the new certificates; a keeper restarted afterwards is
re-seeded by Nexus; the command-line tools work on the rotated files.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from spike.app.api.messages import SECRETS_PATH
from spike.app.commands.client import nexus_connection
from spike.app.commands.devca import CA_KEY, DevIdentity, mint_svid
from spike.transports.blocking import ClientSession
from spike.transports.client import TransportError
from spike.transports.svid_files import SvidFileSource
from spike.transports.tls import client_context
from tests.e2e.harness import Cluster, presented_serial, wait_until

pytestmark = pytest.mark.e2e

TD = "spike.test"
ROTATED = "X.509 SVID rotated"
SERVERS = {"nexus": "/spike/nexus", **{f"keeper-{i}": f"/spike/keeper/{i}" for i in (1, 2, 3)}}
CLIENTS = {"pilot-superuser": "/spike/pilot/role/superuser", "reader": "/workload/reader"}


def reissue(identity: DevIdentity, name: str, path: str) -> int:
    """A new key and certificate for `name` from the same CA, each file replaced atomically; its serial."""
    bundle = (identity.directory / "bundle.pem").read_bytes()
    ca_cert = x509.load_pem_x509_certificate(bundle)
    ca_key = serialization.load_pem_private_key((identity.directory / CA_KEY).read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.UTC)
    cert, key = mint_svid(
        ca_cert,
        ca_key,
        f"spiffe://{TD}{path}",
        not_before=now - dt.timedelta(minutes=1),
        not_after=now + dt.timedelta(hours=1),
    )
    files = identity.files(name)
    for target, data in ((files.key, key), (files.cert, cert + bundle)):
        staged = target.with_name(target.name + ".new")
        staged.write_bytes(data)
        staged.chmod(0o600)
        os.replace(staged, target)
    return x509.load_pem_x509_certificate(cert).serial_number


def presents(port: int, context: ssl.SSLContext, serial: int) -> Callable[[], bool]:
    """A condition: a new connection to `port` is shown the certificate with `serial`."""
    return lambda: presented_serial(port, context) == serial


@dataclass
class Reader:
    """Reads app/db as the workload until stopped; counts answers, keeps every failure."""

    cluster: Cluster
    source: SvidFileSource
    reconnect: bool
    reads: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        body = b'{"path": "app/db"}'
        with ClientSession(self.source.client_context, timeout=5.0) as session:
            nexus = nexus_connection(session, self.cluster.nexus_url, self.cluster.trust)
            while not self.stop.is_set():
                try:
                    status, answer = nexus.post(f"{SECRETS_PATH}?action=get", body)
                except TransportError as exc:
                    self.failures.append(f"no answer: {exc}")
                else:
                    if (status, answer) != (200, b'{"data":{"password":"before-rotation"},"version":1}'):
                        self.failures.append(f"HTTP {status} {answer[:80]!r}")
                    self.reads += 1
                if self.reconnect:
                    nexus.close()  # the next read opens a new connection: a new handshake
                self.stop.wait(0.01)


def keepers(status: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {k["id"]: k for k in status["keepers"]}


def reading(readers: list[Reader], marks: list[int], more: int) -> None:
    """Wait for `more` reads by each reader since `marks`; none may have failed meanwhile."""

    def read_on() -> bool:
        assert [r.failures for r in readers] == [[], []]
        return all(r.reads >= m + more for r, m in zip(readers, marks, strict=True))

    wait_until(read_on, f"{more} more reads by each reader")


def rotate(
    cluster: Cluster, identity: DevIdentity, readers: list[Reader], probe: ssl.SSLContext, round_: int
) -> ssl.SSLContext:
    """Re-issue every SVID; wait until each process and the reader use theirs, and reads went on.

    Returns a client context with the pilot's new SVID, for the next round's probes.
    """
    marks = [r.reads for r in readers]
    serials = {name: reissue(identity, name, path) for name, path in {**SERVERS, **CLIENTS}.items()}
    ports = {"nexus": cluster.nexus_port, **{f"keeper-{i}": cluster.keeper_ports[i] for i in cluster.keeper_ids}}
    # New connections (these probes, the reconnecting reader) make each process look at its files.
    for name, port in ports.items():
        wait_until(presents(port, probe, serials[name]), f"{name} to present its round-{round_} SVID", every=0.1)
        proc = cluster.nexus() if name == "nexus" else cluster.keeper(int(name.removeprefix("keeper-")))
        cluster.wait_log(proc, ROTATED, count=round_, timeout=5)
    wait_until(lambda: readers[1].source.generation == round_ + 1, "the reader's own rotation")
    reading(readers, marks, 20)
    return client_context(identity.files("pilot-superuser"))


def test_rotating_svid_files_under_load_breaks_nothing(dev_identity: DevIdentity, tmp_path: Path) -> None:
    # A private copy of the session's dev identity: these files get rotated.
    identity = DevIdentity(tmp_path / "identity", TD)
    shutil.copytree(dev_identity.directory, identity.directory)
    reissue(identity, "reader", CLIENTS["reader"])
    cluster = Cluster(identity, tmp_path / "cluster", poll_interval=0.5)
    readers: list[Reader] = []
    threads: list[threading.Thread] = []
    try:
        cluster.start_ready()
        assert cluster.run("secret", "put", "app/db", "password=before-rotation").returncode == 0
        policy = cluster.run(
            "policy", "create", "--name", "reader", "--spiffeid-pattern", rf"spiffe://{TD}/workload/reader",
            "--path-pattern", "app/.*", "--permissions", "read",
        )  # fmt: skip
        assert policy.returncode == 0, policy

        for reconnect in (False, True):
            source = SvidFileSource(identity.files("reader")).start()
            readers.append(Reader(cluster, source, reconnect))
        threads = [threading.Thread(target=r.run, name=f"reader-{r.reconnect}", daemon=True) for r in readers]
        for thread in threads:
            thread.start()
        reading(readers, [0, 0], 5)
        baseline = keepers(cluster.wait_status(lambda s: True, "a status")[1])
        probe = client_context(identity.files("pilot-superuser"))

        for round_ in (1, 2):
            probe = rotate(cluster, identity, readers, probe, round_)

        def polled_without_failure(status: dict[str, Any]) -> bool:
            now = keepers(status)
            return status["phase"] == "ready" and all(
                now[i]["polls"] >= baseline[i]["polls"] + 3
                and now[i]["failures"] == baseline[i]["failures"]
                and now[i]["state"] == "holding"
                for i in cluster.keeper_ids
            )

        cluster.wait_status(polled_without_failure, "keepers polled through the rotations without failure")
        for reader in readers:
            reader.stop.set()
        for thread in threads:
            thread.join(10)
        assert [r.failures for r in readers] == [[], []]
        # The kept-alive connection was never dropped (rotation leaves open connections alone), so that
        # reader never looked at its files again; the other made a handshake per read with its current SVID.
        assert readers[0].source.generation == 1
        assert readers[1].source.generation == 3

        # Nexus's client side: a restarted (empty) keeper is re-seeded over a new connection.
        cluster.kill_keeper(2)
        cluster.start_keeper(2)
        cluster.wait_status(
            lambda s: keepers(s)[2]["state"] == "holding" and s["redundancy"] == 1, "keeper 2 re-seeded"
        )
        got = cluster.run("secret", "get", "app/db", "password")
        assert (got.returncode, got.stdout.strip()) == (0, "before-rotation"), got
        status = cluster.run("status")
        assert status.returncode == 0, status
        for proc in cluster.history:
            text = proc.text()
            assert "Traceback" not in text, f"{proc.name}:\n{text}"
            assert " ERROR " not in text, f"{proc.name}:\n{text}"
    finally:
        for reader in readers:
            reader.stop.set()
        for thread in threads:
            thread.join(10)
        for reader in readers:
            reader.source.stop()
        cluster.close()
