"""A stale or hostile keeper, at process level: named by its id, never part of a used key, re-seeded.

Keepers 1 and 2 are real `spike keeper` processes; keeper 3 is a fake keeper
in this process on real mTLS with keeper 3's SVID (Nexus cannot tell it from
a real one).  It answers like a real keeper until told to lie: a shard of
another key, random bytes, keeper 1's shard under its own id, a shard of
another epoch, or a body that is not JSON at all.

While Nexus holds its key, each lie is named (keeper 3 and the problem, in
the log and the status) and answered with a push of keeper 3's own shard
(the fake records it: the true bytes); keeper 3, now telling the truth, is
re-seeded and confirmed.  Then, for some lies (all with ``--run-slow``),
Nexus (a real process) is restarted with keeper 2 down, so the only shards
on offer are keeper 1's (good) and keeper 3's (bad): combining them would
give a wrong key.  Nexus must stay not ready, keep polling and name keeper
3; once keeper 2 is back with its shard, Nexus rebuilds the key from keepers
1 and 2 only (the secrets written before decrypt) and re-seeds keeper 3.
Last, a keeper that takes its shard and keeps lying is pushed its shard
again and again, and polled on schedule.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import anyio
import pytest
from anyio.from_thread import start_blocking_portal

from spike.app.api.messages import (
    SECRETS_PATH,
    SecretGetRequest,
    SecretGetResponse,
    SecretPutRequest,
    SecretPutResponse,
)
from spike.app.commands.devca import DevIdentity
from spike.app.keeper import KeeperHandler
from spike.app.store.sqlite_schema import NexusStore
from spike.protocol.api import ApiRequest, ApiResponse
from spike.protocol.identity import Role
from spike.protocol.keeper import Keeper
from spike.protocol.material import RootKey, Share
from spike.protocol.shamir import deal
from spike.protocol.wire import KEEPER_CONTRIBUTE_PATH, KEEPER_SHARD_PATH, ShardContribution, decode, encode
from spike.transports.server import HttpsServer
from spike.transports.tls import server_context
from tests.e2e.harness import pick_port, wait_until
from tests.reliability.reliability_rig import REPORT, LeakWatch, ProxiedCluster, StatusProbe

pytestmark = pytest.mark.e2e

LIES = ["other-key", "random", "keeper-1-shard", "other-epoch", "not-json"]
PROBLEM = {  # what Nexus's log and status say about each lie
    "other-key": "does not match its commitment",
    "random": "does not match its commitment",
    "keeper-1-shard": "holds the shard of keeper 1",
    "other-epoch": "holds a stale shard of epoch",
    "not-json": "malformed shard answer",
}


class FakeKeeper:
    """Keeper 3: a real keeper machine behind our own HttpsServer, which can be told to lie about its shard."""

    def __init__(self, identity: DevIdentity, port: int) -> None:
        self.port = port
        self.url = f"https://127.0.0.1:{port}"
        self.identity = identity
        self.keeper: Keeper | None = None
        self.lie = ""  # "" tells the truth
        self.keep_lying = False  # lie on after taking a pushed shard
        self.lies: dict[str, bytes] = {}  # lie -> the body it answers
        self.pushes: list[bytes] = []  # shards contributed to it, in order
        self.reads = 0
        self._lock = threading.Lock()
        self._stack = ExitStack()

    def start(self, keeper: Keeper) -> None:
        self.keeper = keeper
        self._honest = KeeperHandler(keeper)
        portal = self._stack.enter_context(start_blocking_portal())
        self._stop = anyio.Event
        ready = threading.Event()

        async def serve() -> None:
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=self.port)
            server = HttpsServer(server_context(self.identity.keeper(3)), self)
            ready.set()
            await server.serve(listener)

        self._future = portal.start_task_soon(serve)
        assert ready.wait(10)
        self._portal = portal

    def close(self) -> None:
        self._future.cancel()
        self._stack.close()

    def __call__(self, request: ApiRequest) -> ApiResponse:
        assert self.keeper is not None
        with self._lock:
            if request.path == KEEPER_CONTRIBUTE_PATH:
                answer = self._honest(request)
                if answer.status == 200:
                    self.pushes.append(decode(request.body, ShardContribution).shard_bytes())
                    if not self.keep_lying:
                        self.lie = ""  # a stale keeper that takes the fix
                return answer
            if request.path == KEEPER_SHARD_PATH and self.lie:
                self.reads += 1
                return ApiResponse(200, self.lies[self.lie])
            return self._honest(request)


@pytest.fixture
def fake_keeper(dev_identity: DevIdentity) -> Iterator[FakeKeeper]:
    fake = FakeKeeper(dev_identity, pick_port())
    try:
        yield fake
    finally:
        fake.close()


def keeper_view(status: dict[str, Any], keeper_id: int) -> dict[str, Any]:
    (view,) = [k for k in status["keepers"] if k["id"] == keeper_id]
    return view


def test_hostile_keeper_is_named_never_used_and_reseeded(
    make_rcluster: Callable[..., ProxiedCluster],
    fake_keeper: FakeKeeper,
    leak_watch: LeakWatch,
    request: pytest.FixtureRequest,
) -> None:
    fake = fake_keeper
    # Each lie at recovery costs a Nexus and a keeper restart: two in the normal suite, all with --run-slow.
    recovery_lies = LIES if request.config.getoption("--run-slow") else ["other-key", "keeper-1-shard"]
    cluster = make_rcluster(poll_interval=0.4, nexus_env={"SPIKE_NEXUS_KEEPER_TIMEOUT": "0.4s"})
    cluster.peer_override[3] = fake.url
    fake.start(Keeper(cluster.trust))
    cluster.start_ready(keeper_ids=[1, 2])
    store = NexusStore(cluster.data_dir)
    try:
        record = store.load_key_record()
    finally:
        store.close()
    assert record is not None
    truth = {i: cluster.read_shard(i) for i in (1, 2)}
    assert all(isinstance(s, Share) for s in truth.values())
    truth[3] = Share(3, record.epoch, fake.pushes[-1])  # what bootstrap gave keeper 3
    assert all(record.matches_share(s) for s in truth.values() if s is not None)
    leak_watch.add_shards({i: s for i, s in truth.items() if s is not None}, "hostile", record.threshold)

    other = deal(RootKey(bytearray(os.urandom(32))), epoch=record.epoch, threshold=2, ids=(1, 2, 3))[3]
    fake.lies = {
        "other-key": encode(ShardContribution.of(other)),
        "random": encode(ShardContribution(shard=list(os.urandom(32)), id=3, epoch=record.epoch)),
        "keeper-1-shard": encode(ShardContribution.of(truth[1])),  # type: ignore[arg-type]
        "other-epoch": encode(ShardContribution(shard=list(truth[3].secret_bytes()), id=3, epoch=record.epoch - 1)),
        "not-json": b"\x00{not json",
    }
    with cluster.client() as pilot:
        written = {f"hostile/{i}": leak_watch.value(f"hostile{i}") for i in range(5)}
        for path, value in written.items():
            pilot.call(SECRETS_PATH, SecretPutRequest(path=path, values={"v": value}), SecretPutResponse)

    probe = StatusProbe(cluster)
    reseeds = 0
    try:
        # While Nexus holds the key: each lie is named, and the liar re-seeded with its true shard.
        for lie in LIES:
            before = probe.get()
            assert before is not None
            pushes_before, reseeds_before = len(fake.pushes), keeper_view(before, 3)["reseeds"]
            log_from = len(cluster.nexus().text())
            fake.lie = lie
            # Re-seeded: its true shard pushed, and it holds it again (usually confirmed by a read right after
            # the push, counted as a re-seed; on a slow machine the next scheduled poll may be what confirms it).
            status = cluster.wait_status(
                lambda s, n=pushes_before: keeper_view(s, 3)["state"] == "holding" and len(fake.pushes) > n,
                f"keeper 3 re-seeded after lying ({lie})",
            )[1]
            assert status["phase"] == "ready"
            assert len(fake.pushes) > pushes_before
            assert all(p == truth[3].secret_bytes() for p in fake.pushes[pushes_before:]), lie
            cluster.wait_log(cluster.nexus(), rf"keeper 3 \({fake.url}\).*{PROBLEM[lie]}", start=log_from)
            cluster.wait_log(
                cluster.nexus(), r"keeper 3 .* holds its shard.*\(was (wrong_shard|bad_answer)\)", start=log_from
            )
            reseeds += keeper_view(status, 3)["reseeds"] - reseeds_before

        # While Nexus rebuilds its key: only keeper 1's good shard and keeper 3's bad one are on offer.
        for lie in recovery_lies:
            cluster.kill_keeper(2)
            cluster.kill("nexus")
            # Told to lie only once the old Nexus is gone: it would otherwise fix the liar with a push first.
            fake.lie = lie
            pushes_before = len(fake.pushes)
            nexus = cluster.start_nexus()
            status = wait_until(
                lambda: (
                    (s := probe.get())
                    and keeper_view(s, 3)["polls"] >= 4
                    and keeper_view(s, 1)["state"] == "holding"
                    and s
                ),
                f"Nexus to poll keeper 3 ({lie}) a few times",
            )
            assert status["phase"] == "recovering", (lie, status)
            three = keeper_view(status, 3)
            assert three["state"] in ("wrong_shard", "bad_answer"), (lie, three)
            assert PROBLEM[lie] in three["detail"] or three["state"] == "bad_answer", (lie, three)
            cluster.wait_log(nexus, rf"keeper 3 \({fake.url}\).*{PROBLEM[lie]}")
            assert "Nexus is ready" not in nexus.text(), lie

            # Keeper 2 comes back and is given its shard (as bootstrap would): now t good shards exist.
            cluster.start_keeper(2)
            contribute_as_bootstrap(cluster, 2, truth[2])  # type: ignore[arg-type]
            cluster.wait_log(nexus, r"root key \(epoch \d+\) rebuilt from the shards of keepers 1, 2 in")
            status = cluster.wait_status(
                lambda s: s["phase"] == "ready" and keeper_view(s, 3)["state"] == "holding",
                f"keeper 3 re-seeded after lying ({lie})",
            )[1]
            assert len(fake.pushes) > pushes_before
            assert all(p == truth[3].secret_bytes() for p in fake.pushes[pushes_before:]), lie
            with cluster.client() as pilot:
                for path, value in written.items():
                    got = pilot.call(SECRETS_PATH, SecretGetRequest(path=path), SecretGetResponse, action="get")
                    assert got.data == {"v": value}, (lie, path)

        # A keeper that takes its shard and lies on: pushed again after each poll, polled on schedule.
        fake.keep_lying, fake.lie = True, "random"
        start = probe.get()
        assert start is not None
        pushes_before, polls_before = len(fake.pushes), keeper_view(start, 3)["polls"]
        wait_until(lambda: len(fake.pushes) >= pushes_before + 5, "repeated pushes to a keeper that lies on")
        end = probe.get()
        assert end is not None and end["phase"] == "ready"
        assert (
            keeper_view(end, 3)["state"] in ("wrong_shard", "bad_answer")
            and keeper_view(end, 3)["polls"] > polls_before + 3
        )
        assert end["redundancy"] == 0
    finally:
        probe.close()
    REPORT.append(
        f"hostile keeper: {len(LIES)} lies while ready, {len(recovery_lies)} while recovering, each named "
        "(keeper 3) and never used; "
        f"{len(fake.pushes)} shards pushed to it, all its true shard; {reseeds} confirmed re-seeds counted while "
        f"ready; {fake.reads} lying answers given"
    )


def contribute_as_bootstrap(cluster: ProxiedCluster, keeper_id: int, share: Share) -> None:
    from spike.transports.blocking import ClientSession
    from spike.transports.tls import client_context, keeper_check

    with ClientSession(client_context(cluster.identity.files("bootstrap")), timeout=5.0) as session:
        connection = session.connect(
            cluster.keeper_url(keeper_id),
            keeper_check(cluster.trust, keeper_id),
            expected_peer=str(cluster.trust.id_of(Role.KEEPER, keeper_id)),
        )
        status, body = connection.post(KEEPER_CONTRIBUTE_PATH, encode(ShardContribution.of(share)))
        assert status == 200, (status, json.loads(body))
