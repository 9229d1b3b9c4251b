"""Several Nexus instances on one PostgreSQL: real processes, real keepers, a real database server.

Two Nexus processes share one database (tests/pg_server.py) and three keepers.
What one acknowledges, the other reads once the read cache's staleness bound
has passed (docs/postgresql.md; the default 20 ms, waited out here), and with
no wait at all when its cache is off; check-and-set holds across
them; policies changed through one are in force on the other within a couple
of seconds; a bootstrap through one is picked up by the other on its own, and
`bootstrap --force` through one moves the other to the new key without a fight
over what the keepers hold.  Writers go through both instances while one is
killed with SIGKILL and while PostgreSQL is restarted (a crash: immediate
mode): the other keeps serving, every instance serves again without a restart
once the database is back, and nothing acknowledged is lost.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from spike.app.api.messages import (
    POLICY_PATH,
    SECRETS_METADATA_PATH,
    SECRETS_PATH,
    SecretGetRequest,
    SecretGetResponse,
    SecretMetadataResponse,
    SecretMetadataUpdate,
    SecretPutRequest,
    SecretPutResponse,
    SecretVersionsRequest,
)
from spike.app.commands.client import Empty, NexusClient, NexusError
from spike.app.commands.devca import CA_KEY, mint_svid
from spike.app.config import READ_CACHE_STALENESS
from spike.transports.tls import SvidFiles
from tests import pg_server
from tests.e2e.harness import Cluster, wait_until

pytestmark = pytest.mark.e2e

MARK = "multi-value"


@pytest.fixture
def pair(make_cluster: Callable[..., Cluster]) -> Cluster:
    """Three keepers and two Nexus instances on a fresh PostgreSQL database, all started at once."""
    cluster = make_cluster(database_url=pg_server.server().database("e2e"), nexus_count=2)
    cluster.start()
    return cluster


def get(cluster: Cluster, nexus: int, path: str, version: int = 0) -> tuple[int, dict[str, str]] | int:
    """(version, data), or the HTTP status of a refusal."""
    with cluster.client(nexus=nexus) as client:
        try:
            got = client.call(
                SECRETS_PATH, SecretGetRequest(path=path, version=version), SecretGetResponse, action="get"
            )
        except NexusError as exc:
            return exc.status
    return got.version, got.data


@dataclass
class Ledger:
    acked: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    acked_at: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time after the answer, version)
    in_doubt: dict[str, set[str]] = field(default_factory=dict)
    not_ready: int = 0
    refused: int = 0

    def total(self) -> int:
        return sum(len(v) for v in self.acked.values())


def writer(cluster: Cluster, nexus: int, number: int, ledger: Ledger, stop: threading.Event) -> None:
    path = f"multi/w{number}"
    n = 0
    while not stop.is_set():
        with cluster.client(nexus=nexus, timeout=5.0) as client:
            while not stop.is_set():
                value = f"{MARK}-{number}-{n}"
                n += 1
                try:
                    answer = client.call(
                        SECRETS_PATH, SecretPutRequest(path=path, values={"v": value}), SecretPutResponse
                    )
                except NexusError as exc:
                    if exc.code == "state_not_ready":
                        ledger.not_ready += 1  # certainly not written
                    elif exc.status == 0 and "connection refused" in str(exc):
                        ledger.refused += 1
                    else:  # a broken connection or an unknown outcome: may or may not be there
                        ledger.in_doubt.setdefault(path, set()).add(value)
                    stop.wait(0.05)
                    if exc.status == 0:
                        break  # a new connection (the instance may have been restarted)
                else:
                    ledger.acked.setdefault(path, []).append((answer.version, value))
                    ledger.acked_at.append((time.monotonic(), answer.version))


def stale_reads(cluster: Cluster, nexus: int, path: str, ledger: Ledger, stop: threading.Event) -> list[str]:
    """Read `path` through `nexus` until `stop`, while another instance writes it: each answer must be at least
    the newest version acknowledged READ_CACHE_STALENESS or more before the read was sent (the read cache's
    promise), whatever fails meanwhile (a dead instance, a database restart: those reads fail, or are
    answered within the bound)."""
    wrong: list[str] = []
    while not stop.is_set():
        try:
            with cluster.client(nexus=nexus, timeout=5.0) as client:
                while not stop.is_set():
                    sent = time.monotonic()
                    got = client.call(SECRETS_PATH, SecretGetRequest(path=path), SecretGetResponse, action="get")
                    due = max((v for at, v in list(ledger.acked_at) if at <= sent - READ_CACHE_STALENESS), default=0)
                    if got.version < due:
                        wrong.append(f"read v{got.version} at {sent:.4f}, v{due} acknowledged before the bound")
        except NexusError:
            stop.wait(0.05)
    return wrong


READER_ID = "spiffe://spike.test/workload/reader"


def workload_svid(cluster: Cluster, directory: Path, name: str) -> SvidFiles:
    """An SVID for spiffe://spike.test/workload/<name> from the test CA."""
    bundle = cluster.identity.directory / "bundle.pem"
    ca_cert = x509.load_pem_x509_certificate(bundle.read_bytes())
    ca_key = serialization.load_pem_private_key((cluster.identity.directory / CA_KEY).read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.UTC)
    cert, key = mint_svid(
        ca_cert, ca_key, f"spiffe://{cluster.identity.trust_domain}/workload/{name}",
        not_before=now - dt.timedelta(minutes=5), not_after=now + dt.timedelta(hours=1),
    )  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.pem").write_bytes(cert)
    (directory / f"{name}-key.pem").write_bytes(key)
    return SvidFiles(directory / f"{name}.pem", directory / f"{name}-key.pem", bundle)


def workload_get(cluster: Cluster, svid: SvidFiles, nexus: int, path: str) -> int:
    with NexusClient(cluster.nexus_url_of(nexus), svid, cluster.trust, timeout=5.0) as client:
        try:
            client.call(SECRETS_PATH, SecretGetRequest(path=path), SecretGetResponse, action="get")
        except NexusError as exc:
            return exc.status
    return 200


def test_two_instances_one_database_through_a_crash_and_a_database_restart(pair: Cluster, tmp_path: Path) -> None:
    c = pair
    assert c.bootstrap().returncode == 0
    first = c.wait_ready(nexus=1)
    # Instance 2 was not bootstrapped: it found the record in the database and rebuilt the key itself.
    second = c.wait_ready(nexus=2)
    assert first["epoch"] == second["epoch"] == 1
    c.wait_log(c.nexus(2), "installed through another Nexus instance")

    # What one acknowledges, the other reads once the staleness bound has passed: puts, deletes, destroys,
    # purges.  Each is read before the write as well, so that the other instance's cache holds the old answer.
    with c.client(nexus=1) as one, c.client(nexus=2) as two:
        for n in range(10):
            get(c, 2, "x/rw")
            put = one.call(SECRETS_PATH, SecretPutRequest(path="x/rw", values={"n": str(n)}), SecretPutResponse)
            time.sleep(READ_CACHE_STALENESS)
            assert get(c, 2, "x/rw") == (put.version, {"n": str(n)})
        get(c, 1, "x/rw")
        two.call(SECRETS_PATH, SecretVersionsRequest(path="x/rw", versions=[]), Empty, action="delete")
        time.sleep(READ_CACHE_STALENESS)
        assert get(c, 1, "x/rw") == 404
        get(c, 1, "x/rw", 9)
        one.call(SECRETS_PATH, SecretVersionsRequest(path="x/rw", versions=[9]), Empty, action="destroy")
        two.call(SECRETS_PATH, SecretVersionsRequest(path="x/rw", versions=[9]), Empty, action="undelete")
        time.sleep(READ_CACHE_STALENESS)
        assert get(c, 1, "x/rw", 9) == 404  # destroyed through one, for good on both
        two.call(SECRETS_METADATA_PATH, SecretGetRequest(path="x/rw"), Empty, action="delete")
        time.sleep(READ_CACHE_STALENESS)
        assert get(c, 1, "x/rw") == 404

        # Check-and-set across instances: of two puts with the same cas, exactly one wins.
        for current in range(5):
            outcomes: list[object] = [None, None]
            barrier = threading.Barrier(2)

            def race(
                i: int, cas: int = current, barrier: threading.Barrier = barrier, outcomes: list[object] = outcomes
            ) -> None:
                client = (one, two)[i]
                barrier.wait(5)
                try:
                    outcomes[i] = client.call(
                        SECRETS_PATH, SecretPutRequest(path="x/cas", values={"by": str(i)}, cas=cas), SecretPutResponse
                    ).version
                except NexusError as exc:
                    outcomes[i] = exc.status

            threads = [threading.Thread(target=race, args=(i,)) for i in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
            assert sorted(outcomes, key=str) == sorted([current + 1, 409], key=str), outcomes

    # Policies changed through one instance are in force on the other within about a second.
    reader = workload_svid(c, tmp_path, "reader")
    with c.client(nexus=1) as one:
        one.call(SECRETS_PATH, SecretPutRequest(path="team/a", values={"k": "v"}), SecretPutResponse)
        assert workload_get(c, reader, 2, "team/a") == 401  # no policy yet; instance 2 caches that
        one.call(
            POLICY_PATH,
            {"name": "readers", "spiffeidPattern": READER_ID, "pathPattern": "team/.*", "permissions": ["read"]},
            dict,
        )
    started = time.monotonic()
    wait_until(lambda: workload_get(c, reader, 2, "team/a") == 200, "the new policy in force on instance 2", 10)
    granted_after = time.monotonic() - started
    assert workload_get(c, reader, 1, "team/a") == 200  # at once where it was written
    with c.client(nexus=2) as two:
        two.call(POLICY_PATH, {"id": "readers"}, dict, action="delete")
    started = time.monotonic()
    wait_until(lambda: workload_get(c, reader, 1, "team/a") == 401, "the deletion in force on instance 1", 10)
    revoked_after = time.monotonic() - started
    assert granted_after < 3.0 and revoked_after < 3.0, (granted_after, revoked_after)

    # Writers through both instances; keep every version so that every acknowledgement can be read back.
    with c.client(nexus=1) as admin:
        for w in range(4):
            admin.call(
                SECRETS_METADATA_PATH, SecretMetadataUpdate(path=f"multi/w{w}", max_versions=1000), Empty, action="put"
            )
    ledgers = [Ledger() for _ in range(4)]
    stop = threading.Event()
    threads = [threading.Thread(target=writer, args=(c, 1 + w % 2, w, ledgers[w], stop), daemon=True) for w in range(4)]
    # And a reader of writer 0's path (written through instance 1) through instance 2, where the cache serves it.
    stale: list[str] = []
    threads.append(
        threading.Thread(target=lambda: stale.extend(stale_reads(c, 2, "multi/w0", ledgers[0], stop)), daemon=True)
    )
    for thread in threads:
        thread.start()

    def acked(*writers: int) -> int:
        return sum(ledgers[w].total() for w in writers)

    try:
        wait_until(lambda: acked(0, 2) >= 20 and acked(1, 3) >= 20, "writes through both instances", timeout=20)
        # Kill instance 1: instance 2 keeps serving.
        c.kill("nexus")
        target = acked(1, 3) + 30
        wait_until(lambda: acked(1, 3) >= target, "writes through instance 2 with instance 1 dead", timeout=20)

        # PostgreSQL crashes and comes back: 503 meanwhile, then instance 2 serves again, without a restart.
        server = pg_server.server()
        server.stop("immediate")
        try:
            assert get(c, 2, "multi/w1") == 503
            time.sleep(1.0)
            assert get(c, 2, "multi/w1") == 503
        finally:
            server.start()
        target = acked(1, 3) + 30
        wait_until(lambda: acked(1, 3) >= target, "writes through instance 2 after the database restart", timeout=30)

        # Instance 1 comes back on the same database and keepers.
        c.start_nexus(index=1)
        c.wait_ready(nexus=1)
        target = acked(0, 2) + 20
        wait_until(lambda: acked(0, 2) >= target, "writes through the restarted instance 1", timeout=30)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)

    context = ", ".join(
        f"writer {w}: {ledger.total()} acknowledged, {sum(map(len, ledger.in_doubt.values()))} in doubt, "
        f"{ledger.not_ready} not ready, {ledger.refused} refused"
        for w, ledger in enumerate(ledgers)
    )
    assert sum(ledger.not_ready for ledger in ledgers) > 0, context  # the outage was seen, as 503s
    lost = []
    for instance in (1, 2):
        with c.client(nexus=instance) as reader:
            for ledger in ledgers:
                for path, acks in ledger.acked.items():
                    versions = [v for v, _ in acks]
                    assert versions == sorted(set(versions)), (path, context)
                    meta = reader.call(
                        SECRETS_METADATA_PATH, SecretGetRequest(path=path), SecretMetadataResponse, action="get"
                    )
                    present = set(meta.versions)
                    assert set(versions) <= present, (path, instance, context)
                    for version, value in acks:
                        got = reader.call(
                            SECRETS_PATH, SecretGetRequest(path=path, version=version), SecretGetResponse, action="get"
                        )
                        if got.data != {"v": value}:
                            lost.append(f"{path} v{version} on {instance}: wrote {value!r}, read {got.data!r}")
                    for version in sorted(present - set(versions)):  # landed without an answer: was in flight
                        got = reader.call(
                            SECRETS_PATH, SecretGetRequest(path=path, version=version), SecretGetResponse, action="get"
                        )
                        assert got.data["v"] in ledger.in_doubt.get(path, set()), (path, version, context)
    assert not lost, f"{context}\n" + "\n".join(lost)
    assert not stale, "\n".join(stale[:20])

    # The outage was logged once by the instance that lived through it, and its end once.
    log = c.nexus(2).text()
    assert log.count("is unavailable") == 1, log
    assert log.count("available again") == 1, log
    assert server.password not in log
    for proc in c.history:
        assert MARK not in proc.text(), proc.log


def test_bootstraps_through_two_instances_at_once_agree_and_force_moves_both(pair: Cluster) -> None:
    c = pair
    results: list[object] = [None, None]

    def bootstrap(i: int) -> None:
        results[i] = c.run("bootstrap", identity="bootstrap", env={"SPIKE_NEXUS_API_URL": c.nexus_url_of(i + 1)})

    threads = [threading.Thread(target=bootstrap, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    codes = sorted(r.returncode for r in results)  # type: ignore[attr-defined]
    assert codes[0] == 0 and codes[1] != 0, results  # exactly one key was made and installed
    assert c.wait_ready(nexus=1)["epoch"] == c.wait_ready(nexus=2)["epoch"] == 1
    with c.client(nexus=1) as one:
        one.call(SECRETS_PATH, SecretPutRequest(path="before/force", values={"k": "v"}), SecretPutResponse)
    assert get(c, 2, "before/force") == (1, {"k": "v"})

    # bootstrap --force through instance 2: instance 1 drops its key and takes the new one from the keepers.
    forced = c.run("bootstrap", "--force", identity="bootstrap", env={"SPIKE_NEXUS_API_URL": c.nexus_url_of(2)})
    assert forced.returncode == 0, forced
    c.wait_ready(epoch=2, nexus=2)
    c.wait_ready(epoch=2, nexus=1)
    c.wait_log(c.nexus(1), r"key record replaced through another Nexus instance \(epoch 1 -> 2\)")
    # Nobody fights over the keepers: for several poll rounds every keeper holds its epoch-2 shard.
    deadline = time.monotonic() + 4 * c.poll_interval
    while time.monotonic() < deadline:
        shards = c.read_shards()
        assert {s.epoch for s in shards.values()} == {2}, shards
        time.sleep(0.1)
    with c.client(nexus=1) as one:
        one.call(SECRETS_PATH, SecretPutRequest(path="after/force", values={"k": "w"}), SecretPutResponse)
    assert get(c, 2, "after/force") == (1, {"k": "w"})


def test_without_the_read_cache_what_one_acknowledges_the_other_reads_at_once(
    make_cluster: Callable[..., Cluster],
) -> None:
    """--read-cache-staleness 0: every GET asks the database, so no wait is needed after another instance's write."""
    c = make_cluster(
        database_url=pg_server.server().database("e2e"),
        nexus_count=2,
        nexus_env={"SPIKE_NEXUS_READ_CACHE_STALENESS": "0"},
    )
    c.start()
    assert c.bootstrap().returncode == 0
    c.wait_ready(nexus=1)
    c.wait_ready(nexus=2)
    with c.client(nexus=1) as one, c.client(nexus=2) as two:
        for n in range(20):
            if n:  # its old answer read first: a cache would have it
                two.call(SECRETS_PATH, SecretGetRequest(path="strict"), SecretGetResponse, action="get")
            put = one.call(SECRETS_PATH, SecretPutRequest(path="strict", values={"n": str(n)}), SecretPutResponse)
            got = two.call(SECRETS_PATH, SecretGetRequest(path="strict"), SecretGetResponse, action="get")
            assert (got.version, got.data) == (put.version, {"n": str(n)})
