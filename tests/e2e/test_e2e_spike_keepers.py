"""Real processes: keepers with SPIKE's one SPIFFE ID under a Nexus with SPIKE's keeper identity and shard derivation.

Every keeper runs with an SVID for spiffe://spike.test/spike/keeper (as SPIKE
registers its Go keepers).  Bootstrap seeds them, Nexus rebuilds the key, the
recovery files are the very bytes SPIKE's Go Nexus would deal for that key
(checked with the reference written from SPIKE's Go code), a SIGKILLed keeper
is re-seeded with the same bytes, and a SIGKILLed Nexus recovers from them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spike.app.commands.operator import parse_shard
from spike.app.store.sqlite_schema import NexusStore
from spike.protocol import KeeperIdentity, Role, ShardAnswer, ShardDerivation, combine
from spike.protocol.wire import KEEPER_SHARD_PATH, decode
from spike.transports.blocking import ClientSession
from spike.transports.tls import SvidFiles, client_context, keeper_check
from tests.core.spike_go_reference import go_compute_shares
from tests.e2e.harness import Cluster
from tests.transport.transport_rig import mint_files

pytestmark = pytest.mark.e2e

SPIKE_ENV = {"SPIKE_NEXUS_KEEPER_IDENTITY": "spike", "SPIKE_NEXUS_SHARD_DERIVATION": "spike"}


def spike_keeper_svid(cluster: Cluster) -> SvidFiles:
    now = dt.datetime.now(dt.UTC)
    directory = cluster.root / "spike-keeper-svid"
    directory.mkdir()
    return mint_files(
        cluster.identity,
        directory,
        "keeper",
        f"spiffe://{cluster.identity.trust_domain}/spike/keeper",
        not_before=now - dt.timedelta(hours=1),
        not_after=now + dt.timedelta(days=1),
    )


def held_shard(cluster: Cluster, keeper_id: int) -> bytes | None:
    """What keeper `keeper_id` holds, read as Nexus reads it (SPIKE's keeper identity)."""
    trust = dataclasses.replace(cluster.trust, keeper_identity=KeeperIdentity.SPIKE)
    with ClientSession(client_context(cluster.identity.files("nexus")), timeout=5.0) as session:
        connection = session.connect(
            cluster.keeper_url(keeper_id),
            keeper_check(trust, keeper_id),
            expected_peer=str(trust.id_of(Role.KEEPER, keeper_id)),
        )
        status, body = connection.post(KEEPER_SHARD_PATH, b"{}")
    if status == 404:
        return None
    assert status == 200, status
    return bytes(decode(body, ShardAnswer).shard)


def recovery_files(cluster: Cluster, directory: Path) -> dict[int, str]:
    result = cluster.run("operator", "recover", "--dir", str(directory), identity="pilot-recover")
    assert result.returncode == 0, result
    return {parse_shard(p.read_text()).id: p.read_text().strip() for p in sorted(directory.iterdir())}


def bootstrapped_under_spikes_keeper_id(
    make_cluster: Callable[..., Cluster],
) -> tuple[Cluster, SvidFiles, dict[str, Any]]:
    """Every keeper under SPIKE's one keeper ID, Nexus splitting SPIKE's way, bootstrapped: (cluster, the
    keepers' SVID, the status once every keeper holds its shard)."""
    cluster = make_cluster(nexus_env=SPIKE_ENV)
    svid = spike_keeper_svid(cluster)
    for keeper_id in cluster.keeper_ids:
        cluster.start_keeper(keeper_id, files=svid)
    cluster.start_nexus()
    booted = cluster.run("bootstrap", identity="bootstrap", env={"SPIKE_NEXUS_KEEPER_IDENTITY": "spike"})
    assert booted.returncode == 0, booted
    _, status = cluster.wait_status(lambda s: s["phase"] == "ready" and s["redundancy"] == 1, "ready, all holding")
    return cluster, svid, status


def test_spike_keepers_under_our_nexus_with_spikes_derivation(make_cluster: Callable[..., Cluster]) -> None:
    cluster, svid, status = bootstrapped_under_spikes_keeper_id(make_cluster)
    assert status["shard_derivation"] == "spike"

    store = NexusStore(cluster.data_dir)
    try:
        record = store.load_key_record()
    finally:
        store.close()
    assert record is not None and record.derivation is ShardDerivation.SPIKE

    files = recovery_files(cluster, cluster.root / "recovery")
    shares = {i: parse_shard(text) for i, text in files.items()}
    key = combine([shares[1], shares[3]], 2)
    try:
        assert record.matches_key(key)
        go = go_compute_shares(key.secret_bytes(), 2, 3)  # what SPIKE's Go Nexus deals for this key
    finally:
        key.wipe()
    assert files == {i: f"spike:{i}:{value.hex()}" for i, value in go.items()}
    assert {i: held_shard(cluster, i) for i in cluster.keeper_ids} == go

    # A keeper restarts empty: Nexus re-seeds it with the same bytes.
    cluster.kill_keeper(2)
    cluster.start_keeper(2, files=svid)
    cluster.wait_status(
        lambda s: s["redundancy"] == 1 and any(k["id"] == 2 and k["reseeds"] >= 1 for k in s["keepers"]),
        "keeper 2 re-seeded",
    )
    assert held_shard(cluster, 2) == go[2]

    # Nexus restarts: it recovers from the keepers under SPIKE's ID.
    cluster.kill("nexus")
    cluster.start_nexus()
    cluster.wait_status(lambda s: s["phase"] == "ready" and s["redundancy"] == 1, "recovered after restart")

    # Everything lost: the recovery files (SPIKE's bytes) bring the key back, and the keepers get SPIKE's bytes.
    cluster.kill("nexus", *(f"keeper-{i}" for i in cluster.keeper_ids))
    for keeper_id in cluster.keeper_ids:
        cluster.start_keeper(keeper_id, files=svid)
    cluster.start_nexus()
    cluster.wait_status(lambda s: all(k["state"] == "empty" for k in s["keepers"]), "every keeper empty")
    for keeper_id in (3, 1):
        text = f"spike:{keeper_id}:{go[keeper_id].hex()}\n"
        restored = cluster.run("operator", "restore", identity="pilot-restore", stdin=text.encode())
        assert restored.returncode == 0, restored
    cluster.wait_status(lambda s: s["phase"] == "ready" and s["redundancy"] == 1, "restored, every keeper seeded")
    assert {i: held_shard(cluster, i) for i in cluster.keeper_ids} == go


def test_without_the_option_spikes_keeper_id_is_an_impostor(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster()
    svid = spike_keeper_svid(cluster)
    for keeper_id in cluster.keeper_ids:
        cluster.start_keeper(keeper_id, files=svid)
    cluster.start_nexus()
    cluster.wait_log(cluster.nexus(), r"presented spiffe://spike\.test/spike/keeper")
    _, status = cluster.wait_status(lambda s: all(k["polls"] >= 2 for k in s["keepers"]), "every keeper polled twice")
    assert status["phase"] == "uninitialised"
    assert all(k["state"] != "holding" for k in status["keepers"])


def test_changing_the_derivation_is_a_rekey_to_a_new_key_split_the_new_way(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster, _, _ = bootstrapped_under_spikes_keeper_id(make_cluster)

    cluster.kill("nexus")
    cluster.start_nexus({"SPIKE_NEXUS_SHARD_DERIVATION": "hmac"})
    assert "shard derivation spike; the configuration says" in cluster.nexus().text()
    _, status = cluster.wait_status(
        lambda s: s["phase"] == "ready" and s["epoch"] == 2 and s["rotation"] is None,
        "rotated to a key split spike's own way",
        60.0,
    )
    assert status["shard_derivation"] == "hmac"
    store = NexusStore(cluster.data_dir)
    try:
        record = store.load_key_record()
    finally:
        store.close()
    assert record is not None and (record.epoch, record.derivation) == (2, ShardDerivation.HMAC)
    files = recovery_files(cluster, cluster.root / "recovery")
    key = combine([parse_shard(files[1]), parse_shard(files[2])], 2)
    try:
        assert record.matches_key(key)
        go = go_compute_shares(key.secret_bytes(), 2, 3)
    finally:
        key.wipe()
    assert all(files[i] != f"spike:{i}:{go[i].hex()}" for i in files)  # no longer SPIKE's bytes
