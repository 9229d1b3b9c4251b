"""A sealed server, as Vault's clients see it: spike before bootstrap and while it waits for shards; OpenBao sealed.

spike is "sealed" until Nexus has rebuilt and verified its root key: `sys/health`
answers 503 (501 before `spike bootstrap`), `sys/seal-status` gives the threshold,
the number of keepers and the verified shards collected so far, and every other
Vault path answers 503 "Vault is sealed", as Vault's do.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hvac import exceptions

from spike.app.commands.devca import DevIdentity
from tests.e2e.harness import Cluster
from tests.vault.clients import hvac_client, raw
from tests.vault.deployments import MOUNT, BaoDeployment, SpikeDeployment, Target


def _sealed_answers(target: Target) -> None:
    client = hvac_client(target, "web", login=False)
    health = raw(target, "GET", "/v1/sys/health")
    assert health.status == 503
    assert health.body["initialized"] is True and health.body["sealed"] is True
    assert raw(target, "GET", "/v1/sys/health?sealedcode=200").status == 200  # what a probe may ask for
    status = client.sys.read_seal_status()
    assert status["sealed"] is True and status["type"] == "shamir"
    for method, path in (
        ("GET", f"/v1/{MOUNT}/data/app/x"),
        ("POST", "/v1/auth/cert/login"),
        ("POST", "/v1/transit/encrypt/k"),
        ("GET", "/v1/nosuch/path"),
    ):
        answer = raw(target, method, path, {} if method == "POST" else None)
        assert (answer.status, answer.body) == (503, {"errors": ["Vault is sealed"]}), path
    with pytest.raises(exceptions.VaultDown):
        client.secrets.kv.v2.read_secret_version("app/x", raise_on_deleted_version=True, mount_point=MOUNT)


def test_openbao_sealed(bao_deployment: BaoDeployment) -> None:
    bao_deployment.seal()
    try:
        _sealed_answers(bao_deployment.target)
    finally:
        bao_deployment.unseal()


def test_spike_sealed_until_it_has_its_key(dev_identity: DevIdentity, tmp_path: Path) -> None:
    deployment = SpikeDeployment(dev_identity, tmp_path)
    cluster: Cluster = deployment.cluster
    target = deployment.target
    try:
        cluster.start()
        target.url = cluster.nexus_url
        # Before `spike bootstrap`: not initialised (Vault's 501), and sealed.
        health = raw(target, "GET", "/v1/sys/health")
        assert health.status == 501 and health.body["initialized"] is False and health.body["sealed"] is True
        status = raw(target, "GET", "/v1/sys/seal-status").body
        assert (status["initialized"], status["sealed"], status["t"], status["n"]) == (False, True, 0, 0)
        assert raw(target, "GET", f"/v1/{MOUNT}/data/app/x").body == {"errors": ["Vault is sealed"]}

        assert cluster.bootstrap().returncode == 0
        cluster.wait_status(lambda s: s["phase"] == "ready" and s["redundancy"] == 1, "ready")
        deployment.configure()
        assert raw(target, "GET", "/v1/sys/health").status == 200
        # Nexus and keeper 3 die and keeper 2 hangs: the new Nexus has one verified shard of the two it needs.
        cluster.keeper(2).pause()
        cluster.kill("keeper-3", "nexus")
        cluster.start_nexus()
        cluster.wait_status(lambda s: s["phase"] == "recovering" and s["shards_needed"] == 1, "one shard collected")
        status = raw(target, "GET", "/v1/sys/seal-status").body
        assert (status["sealed"], status["t"], status["n"], status["progress"]) == (True, 2, 3, 1)
        _sealed_answers(target)

        cluster.keeper(2).resume()  # back: Nexus rebuilds the key and the Vault face opens
        cluster.wait_status(lambda s: s["phase"] == "ready", "ready again")
        assert raw(target, "GET", "/v1/sys/health").status == 200
        assert raw(target, "GET", "/v1/sys/seal-status").body["progress"] == 0
    finally:
        deployment.close()
