"""Bad input on every Vault path: a clean answer, never a 500, and Nexus keeps serving (spike only).

Each body is sent to each path: what is malformed for one path may be acceptable to another (Vault
ignores fields a path does not take), so the answer is a 2xx or a 4xx with Vault's error body.

OpenBao is not asked: its texts for malformed bodies are Go's decoder's, which
spike does not imitate; the status class is what clients act on.
"""

from __future__ import annotations

import json

import pytest

from tests.vault.clients import raw
from tests.vault.deployments import MOUNT, SpikeDeployment

BODIES: list[bytes] = [
    b"not json",
    b"[1, 2, 3]",
    b'"a string"',
    b"\xff\xfe\x00garbage",
    json.dumps({"data": "not an object"}).encode(),
    json.dumps({"data": {"k": {"nested": "object"}}}).encode(),
    json.dumps({"data": {"k": None}}).encode(),
    json.dumps({"data": {"": "empty key"}}).encode(),
    json.dumps({"data": {"k": "v"}, "options": {"cas": "x"}}).encode(),
    json.dumps({"data": {"k": "v"}, "options": {"cas": 2**70}}).encode(),
    json.dumps({"data": {"k": "v"}, "options": "cas"}).encode(),
    json.dumps({"versions": ["a", None]}).encode(),
    json.dumps({"versions": [2**40]}).encode(),
    json.dumps({"versions": "1,x"}).encode(),
    json.dumps({"max_versions": "lots", "cas_required": "maybe"}).encode(),
    json.dumps({"max_versions": 10**6}).encode(),
    json.dumps({"custom_metadata": ["a"]}).encode(),
    json.dumps({"custom_metadata": {"k": ""}}).encode(),
    json.dumps({"delete_version_after": "forever"}).encode(),
    json.dumps({"plaintext": 12}).encode(),
    json.dumps({"plaintext": "!!!"}).encode(),
    json.dumps({"ciphertext": ["vault:v1:"]}).encode(),
    json.dumps({"ciphertext": "vault:v9:AAAA"}).encode(),
    json.dumps({"batch_input": "x"}).encode(),
    json.dumps({"batch_input": [{"plaintext": 1}, "x"]}).encode(),
    json.dumps({"increment": "soon"}).encode(),
    json.dumps({"name": {"a": 1}}).encode(),
    b"{" * 5000 + b"}" * 5000,
]
PATHS = [
    ("POST", f"/v1/{MOUNT}/data/app/bad-input"),
    ("PUT", f"/v1/{MOUNT}/data/app/bad input"),
    ("PATCH", f"/v1/{MOUNT}/data/app/bad-input"),
    ("POST", f"/v1/{MOUNT}/metadata/app/bad-input"),
    ("PATCH", f"/v1/{MOUNT}/metadata/app/bad-input"),
    ("POST", f"/v1/{MOUNT}/delete/app/bad-input"),
    ("POST", f"/v1/{MOUNT}/undelete/app/bad-input"),
    ("POST", f"/v1/{MOUNT}/destroy/app/bad-input"),
    ("POST", f"/v1/{MOUNT}/config"),
    ("POST", f"/v1/{MOUNT}/data/spike/system/acl"),
    ("POST", f"/v1/{MOUNT}/data/app/../etc"),
    ("POST", "/v1/transit/encrypt/k"),
    ("POST", "/v1/transit/decrypt/k"),
    ("POST", "/v1/transit/encrypt/bad name"),
    ("POST", "/v1/auth/cert/login"),
    ("POST", "/v1/auth/token/renew-self"),
    ("GET", f"/v1/{MOUNT}/data/app/bad-input?version=x"),
    ("GET", f"/v1/{MOUNT}/subkeys/app/bad-input?depth=-x"),
    ("GET", "/v1/sys/health?sealedcode=abc"),
    ("LIST", f"/v1/{MOUNT}/metadata/app/../x"),
]


@pytest.mark.parametrize(("method", "path"), PATHS)
def test_no_body_breaks_a_vault_path(spike_deployment: SpikeDeployment, method: str, path: str) -> None:
    target = spike_deployment.target
    for body in BODIES:
        for content_type in ("application/json", "application/merge-patch+json"):
            answer = raw(target, method, path.replace(" ", "%20"), body, content_type=content_type)
            assert answer.status < 500, (method, path, body[:40], answer)
            if answer.status >= 400 and answer.body is not None:
                assert isinstance(answer.body, dict) and "errors" in answer.body, answer.body
    assert spike_deployment.cluster.nexus().alive()
    assert raw(target, "GET", "/v1/sys/health").status == 200


def test_malformed_writes_store_nothing(spike_deployment: SpikeDeployment) -> None:
    target = spike_deployment.target
    path = f"/v1/{MOUNT}/data/app/malformed"
    for body in BODIES:
        if b'"data": {"k": "v"}' in body and b"options" not in body:
            continue
        answer = raw(target, "POST", path, body)
        assert 400 <= answer.status < 500, (body[:40], answer)
    assert raw(target, "GET", f"/v1/{MOUNT}/metadata/app/malformed").status == 404
