"""The example drivers in examples/ keep real `spike keeper` processes seeded.

Each driver runs as its users would run it (a subprocess, SVID files from
the dev identity, keeper URLs on the command line).  Acting as Nexus with the
nexus SVID, the test reads every keeper's shard back and compares it with the
share the key must give that keeper; it kills a keeper with SIGKILL, starts it
again empty on the same port, and waits for the driver to put the same shard
back.  Nothing sleeps for a fixed time: every wait polls a condition.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spike.app.commands.devca import CA_CERT, DevIdentity
from spike.protocol import (
    KEEPER_CONTRIBUTE_PATH,
    KEEPER_SHARD_PATH,
    MAX_KEEPER_BODY,
    RootKey,
    ShardAnswer,
    Share,
    TrustDomains,
    deal,
    decode,
)
from spike.transports.blocking import BlockingConnection, ClientSession
from spike.transports.client import TransportError
from spike.transports.tls import SvidFiles, client_context, keeper_check
from tests.e2e.harness import Cluster, base_env, find_secrets, pick_port, wait_until
from tests.transport.transport_rig import mint_files, raw_client_context, raw_request, refused

ROOT = Path(__file__).resolve().parent.parent.parent
DRIVERS = ["stdlib_driver.py", "asyncio_driver.py"]
KEY = RootKey(bytes(range(1, 33)))  # a fixed key, so the expected shards are known
EPOCH = 7
INTERVAL = 0.5  # each request may take up to this long: generous for a loaded machine
TRUST = TrustDomains.single("spike.test")  # as in tests/conftest.py
EXIT_TIMEOUT = 10.0


@dataclass
class Driver:
    popen: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self, pattern: str) -> list[str]:
        return [line for line in self.text().splitlines() if re.search(pattern, line)]

    def wait_exit(self) -> int:
        try:
            return self.popen.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"driver did not exit; output:\n{self.text()}") from None


RunDriver = Callable[..., Driver]


@pytest.fixture
def run_driver(tmp_path: Path) -> Iterator[RunDriver]:
    started: list[Driver] = []

    def run(script: str, cluster: Cluster, peers: dict[int, str], *args: str, stdin: bytes = b"") -> Driver:
        log = tmp_path / f"{script}.{len(started) + 1}.log"
        command = [
            sys.executable,
            str(ROOT / "examples" / script),
            "--identity",
            str(cluster.identity.directory),
            "--trust-domain",
            cluster.identity.trust_domain,
            "--interval",
            str(INTERVAL),
            *args,
            *(f"{keeper_id}={url}" for keeper_id, url in peers.items()),
        ]
        with log.open("wb") as out:
            popen = subprocess.Popen(
                command, env=base_env(), stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT
            )
        assert popen.stdin is not None
        popen.stdin.write(stdin)
        popen.stdin.close()
        driver = Driver(popen, log)
        started.append(driver)
        return driver

    try:
        yield run
    finally:
        for driver in started:
            if driver.popen.poll() is None:
                driver.popen.kill()
            driver.popen.wait(timeout=EXIT_TIMEOUT)


def all_peers(cluster: Cluster) -> dict[int, str]:
    return {keeper_id: cluster.keeper_url(keeper_id) for keeper_id in cluster.keeper_ids}


class NexusReader:
    """Reads keepers' shards as Nexus would, over one kept-alive connection per keeper."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.session = ClientSession(client_context(cluster.identity.files("nexus")), timeout=1.0)
        self.connections: dict[int, BlockingConnection] = {}

    def shard(self, keeper_id: int) -> Share | None:
        """The keeper's shard, or None if it is empty; raises `TransportError` if it does not answer."""
        connection = self.connections.get(keeper_id)
        if connection is None:
            url = self.cluster.keeper_url(keeper_id)
            connection = self.connections[keeper_id] = self.session.connect(url, keeper_check(TRUST, keeper_id))
        status, body = connection.post(KEEPER_SHARD_PATH)
        if status == 404:
            return None
        assert status == 200, (keeper_id, status, body)
        answer = decode(body, ShardAnswer)
        return Share(keeper_id, answer.epoch or 0, answer.shard_bytes())

    def shards(self, keeper_ids: list[int]) -> dict[int, Share | None] | None:
        """Every keeper's shard (None: empty); None if one of them did not answer this time."""
        try:
            return {keeper_id: self.shard(keeper_id) for keeper_id in keeper_ids}
        except TransportError:
            return None

    def close(self) -> None:
        self.session.close()


@pytest.fixture
def reader(keepers: Cluster) -> Iterator[NexusReader]:
    nexus = NexusReader(keepers)
    try:
        yield nexus
    finally:
        nexus.close()


def reseeds(driver: Driver, keeper_id: int, pushes: int) -> None:
    """The driver reported re-seeding `keeper_id`, and not more often than it had reason to push.

    A push is reported once it is confirmed by reading the shard back; on a slow
    machine a confirmation can miss its deadline, and the next poll then finds the
    shard in place without a report: hence "at least once", not "exactly".
    """
    count = len(driver.lines(rf"keeper {keeper_id} re-seeded \(was empty\)"))
    assert 1 <= count <= pushes, f"keeper {keeper_id} re-seeded {count} times, expected 1..{pushes}:\n{driver.text()}"


def driver_saw_holding(driver: Driver, keeper_id: int, times: int) -> None:
    """Wait until the driver has seen `keeper_id` holding its shard `times` times.

    A reader can find a pushed shard before the driver has read it back; a test
    that stops the driver (or kills the keeper) right then would leave the push
    unconfirmed, so it first waits for the driver's own view.
    """
    pattern = rf"keeper {keeper_id}: \S+ -> holding"
    wait_until(lambda: len(driver.lines(pattern)) >= times, f"driver to see keeper {keeper_id} holding", every=0.05)


def holds(reader: NexusReader, expected: dict[int, Share], driver: Driver, what: str) -> None:
    def check() -> bool:
        if driver.popen.poll() is not None:
            raise AssertionError(f"driver exited with {driver.popen.returncode}:\n{driver.text()}")
        return reader.shards(sorted(expected)) == expected

    try:
        wait_until(check, what, every=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\ndriver output:\n{driver.text()}") from None


@pytest.mark.parametrize("script", DRIVERS)
def test_driver_seeds_keepers_and_reseeds_one_killed_and_restarted_empty(
    script: str, keepers: Cluster, reader: NexusReader, run_driver: RunDriver
) -> None:
    expected = deal(KEY, epoch=EPOCH, threshold=2, ids=keepers.keeper_ids)
    key_hex = KEY.secret_bytes().hex().encode() + b"\n"
    driver = run_driver(script, keepers, all_peers(keepers), "--key-stdin", "--epoch", str(EPOCH), stdin=key_hex)

    holds(reader, expected, driver, "every keeper to hold its shard of the given key")
    for keeper_id in keepers.keeper_ids:
        driver_saw_holding(driver, keeper_id, 1)

    keepers.kill_keeper(2)  # SIGKILL: its shard is gone with its memory
    keepers.start_keeper(2)  # same port, empty
    holds(reader, expected, driver, "keeper 2 to be re-seeded after its restart")
    driver_saw_holding(driver, 2, 2)

    driver.popen.send_signal(signal.SIGINT)
    assert driver.wait_exit() == 0, driver.text()
    assert driver.lines(r"stopped$"), driver.text()
    # Each keeper was seeded once at the start, keeper 2 once more after its restart; nothing else.
    for keeper_id, pushes in {1: 1, 2: 2, 3: 1}.items():
        reseeds(driver, keeper_id, pushes)
    assert not driver.lines("misbehaved"), driver.text()
    secrets = {f"shard {i}": share.secret_bytes() for i, share in expected.items()}
    secrets["root key"] = KEY.secret_bytes()
    assert find_secrets([driver.log], secrets) == []


@pytest.mark.parametrize("script", DRIVERS)
def test_driver_sends_nothing_to_a_server_that_is_not_the_keeper_and_stops_after_its_duration(
    script: str, keepers: Cluster, reader: NexusReader, run_driver: RunDriver
) -> None:
    peers = all_peers(keepers)
    peers[3] = keepers.keeper_url(2)  # keeper 3's entry points at keeper 2
    driver = run_driver(script, keepers, peers, "--duration", "1.5")

    assert driver.wait_exit() == 0, driver.text()
    assert driver.lines(r"stopped$"), driver.text()
    refused = (
        r"keeper 3: unknown -> unreachable \(peer is spiffe://spike\.test/spike/keeper/2, "
        r"expected spiffe://spike\.test/spike/keeper/3\)"
    )
    assert driver.lines(refused), driver.text()
    # Keeper 2 got only its own shard: had keeper 3's reached it, the driver would have
    # found the wrong shard there ("misbehaved") and pushed again.
    reseeds(driver, 1, 1)
    reseeds(driver, 2, 1)
    assert not driver.lines("misbehaved"), driver.text()
    shards = wait_until(lambda: reader.shards([1, 2, 3]), "an answer from every keeper")
    assert shards[3] is None  # the real keeper 3 was never contacted
    assert shards[1] is not None and shards[1].epoch == 1
    assert shards[2] is not None and shards[2].epoch == 1


@dataclass
class StdlibKeeper:
    popen: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def stdlib_keeper(tmp_path: Path) -> Iterator[Callable[[Cluster, int, int], StdlibKeeper]]:
    started: list[StdlibKeeper] = []

    def start(cluster: Cluster, keeper_id: int, port: int) -> StdlibKeeper:
        log = tmp_path / f"stdlib-keeper-{keeper_id}.{len(started) + 1}.log"
        command = [
            sys.executable,
            str(ROOT / "examples" / "stdlib_keeper.py"),
            "--identity",
            str(cluster.identity.directory),
            "--trust-domain",
            cluster.identity.trust_domain,
            "--keeper-id",
            str(keeper_id),
            "--listen",
            f"127.0.0.1:{port}",
        ]
        with log.open("wb") as out:
            popen = subprocess.Popen(
                command, env=base_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        keeper = StdlibKeeper(popen, log)
        started.append(keeper)

        def listening() -> bool:
            if popen.poll() is not None:
                raise AssertionError(f"stdlib keeper exited with {popen.returncode}:\n{keeper.text()}")
            return "listening on" in keeper.text()

        wait_until(listening, "the stdlib keeper to listen")
        return keeper

    try:
        yield start
    finally:
        for keeper in started:
            if keeper.popen.poll() is None:
                keeper.popen.kill()
            keeper.popen.wait(timeout=EXIT_TIMEOUT)


def test_asyncio_driver_keeps_the_stdlib_keeper_seeded_and_it_answers_only_nexus(
    dev_identity: DevIdentity,
    tmp_path: Path,
    run_driver: RunDriver,
    stdlib_keeper: Callable[[Cluster, int, int], StdlibKeeper],
) -> None:
    """Keepers 1 and 2 are `spike keeper`, keeper 3 is examples/stdlib_keeper.py."""
    cluster = Cluster(dev_identity, tmp_path / "cluster", keepers=2)
    reader = NexusReader(cluster)
    try:
        cluster.start(nexus=False)
        port = pick_port()
        cluster.keeper_ports[3] = port  # the stdlib keeper is keeper 3 (for `keeper_url(3)`)
        keeper = stdlib_keeper(cluster, 3, port)
        expected = deal(KEY, epoch=EPOCH, threshold=2, ids=[1, 2, 3])
        key_hex = KEY.secret_bytes().hex().encode() + b"\n"
        peers = {i: cluster.keeper_url(i) for i in (1, 2, 3)}
        driver = run_driver("asyncio_driver.py", cluster, peers, "--key-stdin", "--epoch", str(EPOCH), stdin=key_hex)

        holds(reader, expected, driver, "every keeper, the stdlib one too, to hold its shard")
        driver_saw_holding(driver, 3, 1)

        keeper.popen.kill()  # SIGKILL, then the same port again, empty
        keeper.popen.wait(timeout=EXIT_TIMEOUT)
        keeper = stdlib_keeper(cluster, 3, port)
        holds(reader, expected, driver, "the stdlib keeper to be re-seeded")
        driver_saw_holding(driver, 3, 2)

        # Anyone but Nexus is refused, by the machine's rule, before the body is looked at.
        with ClientSession(client_context(dev_identity.files("pilot-superuser")), timeout=5.0) as session:
            connection = session.connect(cluster.keeper_url(3), keeper_check(cluster.trust, 3))
            status, body = connection.post(KEEPER_SHARD_PATH)
            too_big, _ = connection.post(KEEPER_CONTRIBUTE_PATH, b"{" + b" " * MAX_KEEPER_BODY + b"}")
        assert (status, body) == (401, b'{"err":"access_unauthorized"}')
        assert too_big == 413  # refused before it reaches the machine
        assert "refused /v1/store/shard from spiffe://spike.test/spike/pilot/role/superuser" in keeper.text()

        driver.popen.send_signal(signal.SIGINT)
        assert driver.wait_exit() == 0, driver.text()
        reseeds(driver, 3, 2)
        assert not driver.lines("misbehaved"), driver.text()

        keeper.popen.send_signal(signal.SIGTERM)
        assert keeper.popen.wait(timeout=EXIT_TIMEOUT) == 0, keeper.text()
        assert "its shard is gone from memory" in keeper.text()
        secrets = {f"shard {i}": share.secret_bytes() for i, share in expected.items()}
        assert find_secrets([keeper.log, driver.log], secrets) == []
    finally:
        reader.close()
        cluster.close()


# ---------------------------------------------------------------------- trust per domain (issue 14, H1)


def two_domain_identity(ours: DevIdentity, theirs: DevIdentity, directory: Path) -> DevIdentity:
    """A copy of `ours` whose bundle.pem also holds `theirs`'s CA (each CA names its domain)."""
    shutil.copytree(ours.directory, directory)
    both = (ours.directory / CA_CERT).read_bytes() + (theirs.directory / CA_CERT).read_bytes()
    (directory / CA_CERT).write_bytes(both)
    return DevIdentity(directory, ours.trust_domain)


def forged(by: DevIdentity, directory: Path, name: str, spiffe_id: str) -> SvidFiles:
    """An SVID `by`'s CA mints for `spiffe_id` (of another trust domain than its own)."""
    now = dt.datetime.now(dt.UTC)
    hour = dt.timedelta(hours=1)
    return mint_files(by, directory, name, spiffe_id, not_before=now - hour, not_after=now + hour)


def test_stdlib_keeper_refuses_a_nexus_minted_by_another_domains_ca_in_its_bundle(
    dev_identity: DevIdentity,
    foreign_identity: DevIdentity,
    tmp_path: Path,
    stdlib_keeper: Callable[[Cluster, int, int], StdlibKeeper],
) -> None:
    identity = two_domain_identity(dev_identity, foreign_identity, tmp_path / "id")
    cluster = Cluster(identity, tmp_path / "cluster", keepers=0)
    port = pick_port()
    keeper = stdlib_keeper(cluster, 3, port)
    both = identity.directory / CA_CERT
    bootstrap = raw_client_context(identity.files("bootstrap"), both)
    stored = raw_request(port, bootstrap, KEEPER_CONTRIBUTE_PATH, b'{"shard": [' + b"7," * 31 + b"7]}")
    assert stored is not None and stored.status == 200
    nexus = forged(foreign_identity, tmp_path, "forged-nexus", "spiffe://spike.test/spike/nexus")
    refused(port, raw_client_context(nexus, both))  # no HTTP answer (it was 200 with the shard)
    answer = raw_request(port, raw_client_context(identity.files("nexus"), both))  # control
    assert answer is not None and answer.status == 200
    assert keeper.text().count("connection from 127.0.0.1 failed") == 1, keeper.text()


@pytest.mark.parametrize("script", DRIVERS)
def test_driver_sends_nothing_to_a_keeper_minted_by_another_domains_ca_in_its_bundle(
    script: str,
    dev_identity: DevIdentity,
    foreign_identity: DevIdentity,
    tmp_path: Path,
    run_driver: RunDriver,
    stdlib_keeper: Callable[[Cluster, int, int], StdlibKeeper],
) -> None:
    identity = two_domain_identity(dev_identity, foreign_identity, tmp_path / "id")
    # Keeper 1 presents spiffe://spike.test/spike/keeper/1 from other.test's CA; keeper 2 is genuine.
    impostor = two_domain_identity(dev_identity, foreign_identity, tmp_path / "impostor-id")
    files = forged(foreign_identity, tmp_path, "forged-keeper-1", "spiffe://spike.test/spike/keeper/1")
    shutil.copyfile(files.cert, impostor.keeper(1).cert)
    shutil.copyfile(files.key, impostor.keeper(1).key)
    cluster = Cluster(identity, tmp_path / "cluster", keepers=0)
    ports = {1: pick_port(), 2: pick_port()}
    fake = stdlib_keeper(Cluster(impostor, tmp_path / "impostor"), 1, ports[1])
    real = stdlib_keeper(cluster, 2, ports[2])
    peers = {i: f"https://127.0.0.1:{port}" for i, port in ports.items()}
    driver = run_driver(script, cluster, peers, "--duration", "2")
    assert driver.wait_exit() == 0, driver.text()
    assert driver.lines(r"keeper 1: unknown -> unreachable \(TLS: CERTIFICATE_VERIFY_FAILED\)"), driver.text()
    assert "shard stored" not in fake.text(), fake.text()
    assert "shard stored (from spiffe://spike.test/spike/nexus)" in real.text(), real.text()
