"""The final sweep of the operations tests: no log, audit, metrics or data file holds a secret.

Runs after every other e2e test (see conftest.py).  The operations tests
register what they handled, beside the shards every e2e cluster's keepers
held when torn down: the secret values they wrote, each deployment's root
key (rebuilt from its keepers and checked against its key record), and
their Nexus data dirs (database, WAL, audit log).  Every file in every
registered directory (process logs in text and JSON, `spike` command
output, /metrics scrapes, audit logs, SQLite files) is searched for every
one of them in every form it could be printed in.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from spike.app.store.sqlite_schema import DB_NAME
from tests.e2e.harness import SecretsSeen, find_secrets

pytestmark = pytest.mark.e2e


@pytest.mark.after_all_e2e
def test_no_file_of_the_operations_runs_holds_a_value_a_shard_or_a_key(
    secrets_seen: SecretsSeen, tmp_path: Path
) -> None:
    names = list(secrets_seen.shards)
    if not any(" value " in name for name in names):
        pytest.skip("no operations test ran in this session: nothing of theirs to sweep")
    files = sorted(p for d in secrets_seen.log_dirs if d.exists() for p in d.iterdir() if p.is_file())
    kinds = {
        "audit log": [p for p in files if p.name == "audit.log"],
        "SQLite database": [p for p in files if p.name.startswith(DB_NAME)],
        "metrics scrape": [p for p in files if p.name.startswith("metrics.")],
        "operator command output": [p for p in files if p.name.startswith("cli.") and ".operator." in p.name],
        "Nexus log": [p for p in files if p.name.startswith("nexus.") and p.suffix == ".log"],
    }
    assert all(kinds.values()), {kind: len(found) for kind, found in kinds.items()}
    assert any("root key" in name for name in names) and any("shard" in name for name in names), names

    # The search finds a value planted in an audit-like line.
    value_name = next(name for name in names if " value " in name)
    control = tmp_path / "control.log"
    control.write_bytes(b'{"path": "x", "note": "' + secrets_seen.shards[value_name] + b'"}\n')
    assert f"{control}: {value_name} as raw" in find_secrets([control], {value_name: secrets_seen.shards[value_name]})

    assert find_secrets(files, secrets_seen.shards) == []
