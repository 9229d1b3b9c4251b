"""Real processes: `spike migrate from-spike` moves a SPIKE Go database into a running Nexus (SQLite, PostgreSQL).

The SPIKE database and its recovery files are written by tests/spike_go_db.py as SPIKE's Go code writes
them.  The operator's path: dry run, real run, a second run refused (Nexus holds data now), a merge of
another SPIKE deployment, a merge that clashes (refused whole), and the secrets read back through
`spike secret get`.  Every fixture value but the one printed by `secret get`, SPIKE's root key and its
shards go to the session's secrets sweep: no log, CLI output or data file may hold them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from spike.app.api.messages import (
    IMPORT_PATH,
    MAX_BODY_BYTES,
    MAX_IMPORT_BYTES,
    SECRETS_PATH,
    ImportRequest,
    ImportResponse,
    ImportSecret,
    ImportVersion,
    SecretGetRequest,
    SecretGetResponse,
)
from spike.app.commands.client import NexusError
from tests import pg_server
from tests.e2e.harness import CliResult, Cluster, SecretsSeen
from tests.spike_go_db import ROOT_KEY, VALUES, SpikeGoNexus, build_deployment, recovery_lines

pytestmark = pytest.mark.e2e

OTHER_KEY = hashlib.sha256(b"a second SPIKE deployment").digest()
OTHER_VALUE = "Yd3hK8rCx6Ao-other"
PRINTED = "v3"  # the one value `spike secret get` prints (so not swept for)


def one_line(result: CliResult) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result
    return lines[0]


def export(directory: Path, key: bytes, seen: SecretsSeen, label: str) -> Path:
    """SPIKE's `spike operator recover` output for `key` (2-of-3), noted for the sweep."""
    directory.mkdir()
    for i, line in recovery_lines(key, 2, 3).items():
        (directory / f"spike.recovery.{i}.txt").write_text(line)
        seen.add_secret(f"{label} SPIKE shard {i}", bytes.fromhex(line.split(":")[2]))
    seen.add_secret(f"{label} SPIKE root key", key)
    return directory


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_spike_deployment_moves_here(
    backend: str, make_cluster: Callable[..., Cluster], secrets_seen: SecretsSeen, tmp_path: Path
) -> None:
    options = {"database_url": pg_server.server().database("e2e_migrate")} if backend == "postgres" else {}
    c = make_cluster(**options)
    c.start_ready()
    for name, value in VALUES.items():
        if name != PRINTED:
            secrets_seen.add_secret(f"migrated {name}", value.encode())
    secrets_seen.add_secret("migrated other", OTHER_VALUE.encode())
    database = tmp_path / "spike.db"
    build_deployment(database)
    shards = export(tmp_path / "recover", ROOT_KEY, secrets_seen, "first")
    before = database.read_bytes()

    dry = c.run("migrate", "from-spike", str(database), "--recovery-dir", str(shards), "--dry-run")
    assert dry.returncode == 0, dry
    assert dry.stdout.startswith("would move (dry run: nothing written): 4 secret(s) with 6 version(s)")
    with c.client() as nexus:
        assert nexus.call(SECRETS_PATH, b'{"prefix": ""}', dict, action="list") == {"keys": []}

    moved = c.run("migrate", "from-spike", str(database), "--recovery-dir", str(shards), "--format", "json")
    assert moved.returncode == 0, moved
    report = json.loads(moved.stdout)
    assert (report["dry_run"], report["secrets"], report["versions"], report["deleted_versions"]) == (False, 4, 6, 2)
    assert report["policies"] == 2
    c.wait_log(c.nexus(), r"imported 4 secret\(s\) \(6 version\(s\), 2 deleted\) and 2 policy\(ies\)")
    assert database.read_bytes() == before  # SPIKE's database is only read

    # Read back: the CLI, and every other version in-process.
    got = c.run("secret", "get", "apps/db", "password")
    assert (got.returncode, got.stdout) == (0, f"{VALUES['v3']}\n"), got
    assert c.run("secret", "get", "apps/db", "--version", "2").returncode == 1  # soft-deleted in SPIKE
    assert c.run("secret", "get", "old/token").returncode == 1  # deleted whole in SPIKE
    with c.client() as nexus:

        def read(path: str, version: int = 0) -> dict[str, str]:
            return nexus.call(
                SECRETS_PATH, SecretGetRequest(path=path, version=version), SecretGetResponse, action="get"
            ).data

        assert read("apps/db", 1)["password"] == VALUES["v1"]
        assert read("/tenants/acme/api") == {"api key": VALUES["slash"]}
        assert read("team/web")["signing key"] == VALUES["spaced"]
    listed = c.run("policy", "list", "--format", "json")
    assert sorted(p["name"] for p in json.loads(listed.stdout)["policies"]) == ["db readers", "web-writer"], listed

    # Again: Nexus holds data now; refused whole, one line.
    again = c.run("migrate", "from-spike", str(database), "--recovery-dir", str(shards))
    assert again.returncode == 1
    assert "already holds 4 secret(s) and 2 policy(ies)" in one_line(again)

    # Another SPIKE deployment merged in; then the first one again, merged: every path clashes.
    other_db = tmp_path / "other.db"
    other = SpikeGoNexus(other_db, OTHER_KEY)
    other.upsert_secret("billing/stripe", {"key": OTHER_VALUE})
    other.close()
    other_shards = export(tmp_path / "other-recover", OTHER_KEY, secrets_seen, "second")
    refused = c.run("migrate", "from-spike", str(other_db), "--recovery-dir", str(other_shards))
    assert refused.returncode == 1
    assert "nothing was imported (merge to add to them)" in one_line(refused)
    merged = c.run("migrate", "from-spike", str(other_db), "--recovery-dir", str(other_shards), "--merge")
    assert merged.returncode == 0, merged
    assert merged.stdout.startswith("moved: 1 secret(s) with 1 version(s)")
    clash = c.run("migrate", "from-spike", str(database), "--recovery-dir", str(shards), "--merge")
    assert clash.returncode == 1
    assert "'apps/db'" in one_line(clash) and "nothing was imported" in one_line(clash)
    with c.client() as nexus:
        keys = nexus.call(SECRETS_PATH, b'{"prefix": ""}', dict, action="list")["keys"]
    assert sorted(keys) == ["/tenants/acme/api", "apps/db", "billing/stripe", "old/token", "team/web"]

    # The wrong shards: the first row's tag fails; nothing is written, one line.
    wrong = c.run("migrate", "from-spike", str(database), "--recovery-dir", str(other_shards), "--merge")
    assert wrong.returncode == 1
    assert "does not open under the key the shards rebuild" in one_line(wrong)

    # A deployment larger than any other request Nexus reads still goes in one import (superuser only).
    values = {"blob": "b" * 60_000}
    large = ImportRequest(
        secrets=[
            ImportSecret(
                path=f"large/{i}",
                versions=[ImportVersion(version=1, values=values, created_at=1.0)],
                created_at=1.0,
                updated_at=1.0,
            )
            for i in range(25)
        ],
        policies=[],
        merge=True,
    )
    body = msgspec.json.encode(large)
    assert MAX_BODY_BYTES < len(body) < MAX_IMPORT_BYTES
    with c.client("pilot-recover") as nexus, pytest.raises(NexusError) as refused_large:
        nexus.call(IMPORT_PATH, body, ImportResponse, write=True)
    assert refused_large.value.status == 401  # judged by its head: the body is never held
    with c.client() as nexus:
        assert nexus.call(IMPORT_PATH, body, ImportResponse, write=True).secrets == 25
        with pytest.raises(NexusError) as too_large:
            nexus.call(SECRETS_PATH, {"path": "large/x", "values": {"blob": "b" * (MAX_BODY_BYTES + 1)}}, dict)
        assert too_large.value.status == 413  # every other route keeps the usual limit

    for result in (dry, moved, again, merged, clash, wrong):
        for name, value in VALUES.items():
            assert value not in result.stdout + result.stderr, name
