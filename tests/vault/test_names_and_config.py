"""Server names on Nexus's SVID (Vault clients verify the name they dial), and the Vault face's settings."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from hvac import exceptions

from spike.app.commands.devca import DevIdentity, mint_dev_identity
from spike.app.config import ConfigError, vault_kv_mount, vault_token_ttl
from tests.vault.clients import hvac_client
from tests.vault.deployments import SpikeDeployment


def _names(pem: Path) -> tuple[set[str], set[str], list[str]]:
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    return set(sans.get_values_for_type(x509.DNSName)), ips, sans.get_values_for_type(x509.UniformResourceIdentifier)


def test_dev_identity_names_nexus_for_vault_clients(tmp_path: Path) -> None:
    identity = mint_dev_identity(tmp_path / "id", "spike.test", [1])
    dns, ips, uris = _names(identity.files("nexus").cert)
    assert dns == {"localhost"} and ips == {"127.0.0.1"}
    assert uris == ["spiffe://spike.test/spike/nexus"]  # still exactly one SPIFFE ID
    assert _names(identity.keeper(1).cert)[:2] == (set(), set())  # only Nexus is dialled by Vault clients

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "spike",
            "dev-identity",
            "--dir",
            str(tmp_path / "id"),
            "--trust-domain",
            "spike.test",
            "--keepers",
            "1",
            "--nexus-name",
            "nexus.example.org",
            "--nexus-name",
            "10.0.0.7",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    dns, ips, _ = _names(identity.files("nexus").cert)  # the existing SVID is minted again with the new names
    assert dns == {"localhost", "nexus.example.org"} and ips == {"127.0.0.1", "10.0.0.7"}

    bad = subprocess.run(
        [sys.executable, "-m", "spike", "dev-identity", "--dir", str(tmp_path / "other"), "--nexus-name", "bad name!"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "--nexus-name" in bad.stderr and not (tmp_path / "other" / "nexus.pem").exists()


def test_vault_clients_verify_nexus_by_name(spike_deployment: SpikeDeployment, dev_identity: DevIdentity) -> None:
    """Python's default verification (what hvac and requests use) accepts Nexus at localhost and 127.0.0.1."""
    port = spike_deployment.cluster.nexus_port
    context = ssl.create_default_context(cafile=str(dev_identity.files("nexus").bundle))
    context.load_cert_chain(str(spike_deployment.workloads["web"].cert), str(spike_deployment.workloads["web"].key))
    assert context.check_hostname and context.verify_mode is ssl.CERT_REQUIRED
    for host in ("localhost", "127.0.0.1"):
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            assert tls.getpeercert() is not None
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, pytest.raises(ssl.SSLCertVerificationError):
        context.wrap_socket(raw, server_hostname="elsewhere.example.org")


def test_mount_and_token_ttl_settings() -> None:
    assert vault_kv_mount("kv/") == "kv" and vault_kv_mount("secret") == "secret"
    for bad in ("", "a/b", "sys", "store", "transit", "auth", "..", "sp ace"):
        with pytest.raises(ConfigError):
            vault_kv_mount(bad)
    assert vault_token_ttl("15m") == 900
    for bad in ("5s", "48h", "soon"):
        with pytest.raises(ConfigError):
            vault_token_ttl(bad)


def test_a_configured_mount(dev_identity: DevIdentity, tmp_path: Path) -> None:
    deployment = SpikeDeployment(dev_identity, tmp_path)
    deployment.cluster.nexus_env["SPIKE_NEXUS_VAULT_KV_MOUNT"] = "apps"
    try:
        target = deployment.start()
        client = hvac_client(target, "web")
        client.secrets.kv.v2.create_or_update_secret("app/x", secret={"v": "1"}, mount_point="apps")
        assert client.secrets.kv.v2.read_secret_version("app/x", raise_on_deleted_version=True, mount_point="apps")
        with pytest.raises(exceptions.InvalidPath, match="no handler for route"):
            client.secrets.kv.v2.read_secret_version("app/x", raise_on_deleted_version=True, mount_point="secret")
    finally:
        deployment.close()
