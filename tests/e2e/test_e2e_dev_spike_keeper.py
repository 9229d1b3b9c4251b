"""`spike dev-identity` and `spike dev` with SPIKE's one keeper ID (`--keeper-identity spike`, issue 17 section 2).

SPIKE registers every keeper as `spiffe://<td>/spike/keeper`; `spike dev-identity --keeper-identity spike`
mints that SVID (keeper.pem), and `spike dev --keeper-identity spike` runs every keeper with it under a
Nexus and bootstrap that accept it, as a local mirror of SPIKE's registration.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from tests.e2e.harness import SPIKE, base_env, dev_until_ready

pytestmark = pytest.mark.e2e


def spiffe_id(cert: Path) -> str:
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    (uri,) = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    return str(uri)


def dev_identity(directory: Path, *more: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*SPIKE, "dev-identity", "--dir", str(directory), "--trust-domain", "spike.test", *more],
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done
    return done


def test_dev_identity_mints_spikes_one_keeper_id_on_request(tmp_path: Path) -> None:
    dev_identity(tmp_path / "default")
    assert not (tmp_path / "default" / "keeper.pem").exists()  # unchanged by default
    assert spiffe_id(tmp_path / "default" / "keeper-1.pem") == "spiffe://spike.test/spike/keeper/1"

    made = dev_identity(tmp_path / "spike", "--keeper-identity", "spike")
    assert spiffe_id(tmp_path / "spike" / "keeper.pem") == "spiffe://spike.test/spike/keeper"
    assert (tmp_path / "spike" / "keeper-key.pem").stat().st_mode & 0o777 == 0o600
    assert not list((tmp_path / "spike").glob("keeper-[0-9]*"))  # SPIKE's registration has no per-id keepers
    assert "--keeper-identity spike" in made.stdout

    dev_identity(tmp_path / "both", "--keeper-identity", "spike", "--keepers", "1,2")  # mixed, while moving
    assert spiffe_id(tmp_path / "both" / "keeper.pem") == "spiffe://spike.test/spike/keeper"
    assert spiffe_id(tmp_path / "both" / "keeper-2.pem") == "spiffe://spike.test/spike/keeper/2"


def test_spike_dev_runs_every_keeper_with_spikes_one_keeper_id(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    lines = dev_until_ready(data, "--keeper-identity", "spike")
    assert "spike dev: starting 3 keepers and Nexus" in lines
    identity = data / "identity"
    assert spiffe_id(identity / "keeper.pem") == "spiffe://spike.ist/spike/keeper"
    assert not list(identity.glob("keeper-[0-9]*"))
    # Ready means bootstrap seeded, and Nexus read, three keepers presenting the one ID: with per-id
    # identities both would have refused each of them as an impostor.
    nexus_log = (data / "logs" / "nexus.log").read_text()
    assert "impostor" not in nexus_log and "expected spiffe://" not in nexus_log
