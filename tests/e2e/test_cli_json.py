"""`--format json` on every command that prints data, as a script runs them (real processes).

Each command prints exactly one JSON document on stdout (one per policy for
`policy apply`), nothing on stderr, and the shapes the README's "Output for
scripts" section lists.  The break-glass pair is included: `operator recover`
says where the shards are (never what they are), and after Nexus and every
keeper are killed, `operator restore` says how many shards are still needed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import CliResult, Cluster

pytestmark = pytest.mark.e2e


def document(result: CliResult) -> Any:
    """The one JSON document a command printed (exit 0, nothing on stderr)."""
    assert result.returncode == 0 and result.stderr == "", result
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result
    return json.loads(lines[0])


def test_bootstrap_prints_its_result_as_one_json_document(cluster: Cluster) -> None:
    cluster.start()
    result = document(cluster.run("bootstrap", "--format", "json", identity="bootstrap"))
    assert result == {"epoch": 1, "threshold": 2, "shares": 3, "seeded": [1, 2, 3], "missing": []}


def test_every_data_command_prints_one_json_document_of_the_documented_shape(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    c = make_cluster()
    c.start_ready()

    def run(*args: str, identity: str = "pilot-superuser", stdin: bytes = b"") -> Any:
        return document(c.run(*args, "--format", "json", identity=identity, stdin=stdin))

    assert run("secret", "put", "app/db", "user=admin", "password=s3cret") == {"path": "app/db", "version": 1}
    assert run("secret", "put", "app/db", "user=root") == {"path": "app/db", "version": 2}
    assert run("secret", "get", "app/db") == {"data": {"user": "root"}, "version": 2}
    assert run("secret", "get", "app/db", "--version", "1") == {
        "data": {"user": "admin", "password": "s3cret"},
        "version": 1,
    }
    assert run("secret", "get", "app/db", "user") == {"key": "user", "value": "root", "version": 2}
    assert run("secret", "list", "app/") == {"keys": ["app/db"]}
    meta = run("secret", "metadata", "app/db")
    assert sorted(meta) == ["metadata", "versions"] and sorted(meta["versions"]) == ["1", "2"]
    assert meta["metadata"]["currentVersion"] == 2 and meta["versions"]["1"]["destroyed"] is False
    assert run("secret", "delete", "app/db", "--versions", "1") == {"path": "app/db", "action": "delete"}
    assert run("secret", "tune", "app/db", "--max-versions", "5") == {"path": "app/db"}

    created = run(
        "policy",
        "create",
        "--name",
        "web",
        "--spiffeid-pattern",
        "^spiffe://spike\\.ist/web$",
        "--path-pattern",
        "^app/.*$",
        "--permissions",
        "read,list",
    )
    assert created == {"name": "web", "id": created["id"], "created": True}
    policy = run("policy", "get", "web")
    assert policy["name"] == "web" and sorted(policy["permissions"]) == ["list", "read"]
    assert sorted(policy) == ["createdAt", "id", "name", "pathPattern", "permissions", "spiffeidPattern", "updatedAt"]
    assert run("policy", "list") == {"policies": [{"id": created["id"], "name": "web"}]}
    assert run("policy", "delete", "web") == {"deleted": "web"}

    version = run("version")
    assert sorted(version) == ["commit", "version"]

    status = run("status")
    assert status["phase"] == "ready" and status["epoch"] == 1

    # Break-glass: the files and the epoch, never a shard.
    shards = tmp_path / "shards"
    recovered = run("operator", "recover", "--dir", str(shards), identity="pilot-recover")
    files = {int(k): Path(v) for k, v in recovered.pop("files").items()}
    assert recovered == {"epoch": 1, "directory": str(shards)}
    assert sorted(files) == [1, 2, 3] and all(path.parent == shards for path in files.values())
    texts = {i: path.read_text().strip() for i, path in files.items()}

    c.kill("nexus", *(f"keeper-{i}" for i in c.keeper_ids))
    c.start()
    c.wait_status(lambda s: s["phase"] == "recovering", "Nexus waiting for shards")
    first = run("operator", "restore", identity="pilot-restore", stdin=texts[1].encode())
    assert first == {"id": 1, "remaining": 1, "restored": False}
    second = run("operator", "restore", "--file", str(files[2]), identity="pilot-restore")
    assert second == {"id": 2, "remaining": 0, "restored": True}
    assert run("secret", "get", "app/db", "user")["value"] == "root"
    for text in texts.values():  # no shard in any output of the session
        for log in c.logs.glob("cli.*.log"):
            assert text.split(":")[2] not in log.read_text()
