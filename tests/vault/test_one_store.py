"""One store, two faces (spike only): the Vault API and the SPIKE API see the same secrets, judged by the same policies.

Also: every Vault call is in Nexus's audit log like any other, and no token
issued by the Vault face is ever written to a log.
"""

from __future__ import annotations

import json

import pytest
from hvac import exceptions

from spike.app.api.messages import (
    POLICY_PATH,
    SECRETS_PATH,
    PolicyIdRequest,
    PolicyPutRequest,
    PolicyPutResponse,
    SecretGetRequest,
    SecretGetResponse,
    SecretPutRequest,
    SecretPutResponse,
    SecretVersionsRequest,
)
from spike.app.commands.client import NexusError
from tests.vault.clients import hvac_client, raw
from tests.vault.deployments import MOUNT, SpikeDeployment

KV = {"mount_point": MOUNT}


def test_both_faces_share_secrets(spike_deployment: SpikeDeployment) -> None:
    web = hvac_client(spike_deployment.target, "web")
    web.secrets.kv.v2.create_or_update_secret("app/shared", secret={"user": "u", "pw": "p"}, **KV)
    with spike_deployment.cluster.client() as spike:
        got = spike.call(SECRETS_PATH, SecretGetRequest(path="app/shared"), SecretGetResponse, action="get")
        assert (got.data, got.version) == ({"user": "u", "pw": "p"}, 1)
        put = spike.call(
            SECRETS_PATH, SecretPutRequest(path="app/shared", values={"pw": "q"}, cas=1), SecretPutResponse
        )
        assert put.version == 2
        read = web.secrets.kv.v2.read_secret_version("app/shared", raise_on_deleted_version=True, **KV)
        assert read["data"]["data"] == {"pw": "q"} and read["data"]["metadata"]["version"] == 2
        spike.call(SECRETS_PATH, SecretVersionsRequest(path="app/shared"), dict, action="delete")
        with pytest.raises(exceptions.InvalidPath):
            web.secrets.kv.v2.read_secret_version("app/shared", raise_on_deleted_version=True, **KV)
        # A check-and-set through one face is checked against writes through the other.
        with pytest.raises(exceptions.InvalidRequest, match="did not match"):
            web.secrets.kv.v2.create_or_update_secret("app/shared", secret={"pw": "r"}, cas=1, **KV)
        with pytest.raises(NexusError):
            spike.call(SECRETS_PATH, SecretPutRequest(path="app/shared", values={"pw": "r"}, cas=1), SecretPutResponse)


def test_the_same_policies_decide_on_both_faces(spike_deployment: SpikeDeployment) -> None:
    target = spike_deployment.target
    hvac_client(target, "web").secrets.kv.v2.create_or_update_secret("app/for-stranger", secret={"v": "1"}, **KV)
    path = f"/v1/{MOUNT}/data/app/for-stranger"
    assert raw(target, "GET", path, who="stranger").status == 403
    stranger_id = target.workloads["stranger"].spiffe_id
    with spike_deployment.cluster.client() as spike:
        spike.call(
            POLICY_PATH,
            PolicyPutRequest(
                name="vault-stranger",
                spiffeidPattern=f"^{stranger_id.replace('.', '[.]')}$",
                pathPattern="^app/for-stranger$",
                permissions=["read"],
            ),
            PolicyPutResponse,
        )
        try:
            answer = raw(target, "GET", path, who="stranger")
            assert answer.status == 200 and answer.body["data"]["data"] == {"v": "1"}
            assert raw(target, "GET", f"/v1/{MOUNT}/data/app/web-only", who="stranger").status == 403
            write = raw(target, "POST", path, {"data": {"v": "2"}}, who="stranger")
            assert write.status == 403  # read only
            login = raw(target, "POST", "/v1/auth/cert/login", {}, who="stranger")
            assert login.status == 200 and login.body["auth"]["policies"] == ["vault-stranger"]
        finally:
            spike.call(POLICY_PATH, PolicyIdRequest(id="vault-stranger"), dict, action="delete")
    assert raw(target, "GET", path, who="stranger").status == 403


def test_vault_calls_are_audited_and_tokens_never_logged(spike_deployment: SpikeDeployment) -> None:
    target = spike_deployment.target
    web = hvac_client(target, "web")
    token = web.token
    web.secrets.kv.v2.create_or_update_secret("app/audited", secret={"v": "1"}, **KV)
    raw(target, "GET", f"/v1/{MOUNT}/data/app/audited", who="stranger")
    web.auth.token.lookup_self()
    cluster = spike_deployment.cluster
    audit = cluster.data_dir / "audit.log"
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    mine = [line for line in lines if line["route"] == f"/v1/{MOUNT}/data/app/audited"]
    assert any(line["decision"] == "allowed" and line["status"] == 200 and line["action"] == "POST" for line in mine)
    denied = [line for line in mine if line["caller"] == target.workloads["stranger"].spiffe_id]
    assert denied and denied[0]["decision"] == "denied" and denied[0]["status"] == 403
    for path in [audit, *cluster.log_files()]:
        assert token not in path.read_text(errors="replace"), path
