"""SPIKE Go's data dir layout (issue 17 section 4): `<dir>/data/spike.db`, and `~/.spike/data/spike.db` by default.

spike's Nexus does not open SPIKE Go's database: where its data dir holds one (SPIKE's file where spike's
would be, or SPIKE's layout one level down) it stops at start with one line naming the file and
`spike migrate from-spike`, and the file is left byte for byte as it was, with no -wal or -shm beside it.
The SPIKE database here is written with SPIKE's DDL (spike/app/nexus/internal/state/backend/sqlite/ddl).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from spike.app.commands.devca import DevIdentity
from spike.app.store.errors import StorageError
from spike.app.store.spike_layout import check_data_dir
from spike.app.store.sqlite import SqliteBackend

REPO = Path(__file__).resolve().parents[2]

# SPIKE's QueryInitialize, as its Go Nexus runs it on first start (WAL, SPIKE's default journal mode).
SPIKE_DDL = """
CREATE TABLE IF NOT EXISTS policies (name TEXT PRIMARY KEY, nonce BLOB NOT NULL,
    encrypted_spiffe_id_pattern BLOB NOT NULL, encrypted_path_pattern BLOB NOT NULL,
    encrypted_permissions BLOB NOT NULL, created_time INTEGER NOT NULL, updated_time INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS secrets (path TEXT NOT NULL, version INTEGER NOT NULL, nonce BLOB NOT NULL,
    encrypted_data BLOB NOT NULL, created_time DATETIME NOT NULL, deleted_time DATETIME, PRIMARY KEY (path, version));
CREATE TABLE IF NOT EXISTS secret_metadata (path TEXT PRIMARY KEY, nonce BLOB NOT NULL,
    encrypted_current_version BLOB NOT NULL, encrypted_oldest_version BLOB NOT NULL,
    encrypted_created_time BLOB NOT NULL, encrypted_updated_time BLOB NOT NULL, encrypted_max_versions BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS idx_secrets_path ON secrets(path);
CREATE INDEX IF NOT EXISTS idx_secrets_created_time ON secrets(created_time);
"""


def spike_go_database(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SPIKE_DDL)
    db.execute("INSERT INTO secrets VALUES ('app/db', 1, x'00', x'01', '2026-01-01', NULL)")
    db.commit()
    db.close()
    return path


def fingerprint(directory: Path) -> dict[str, tuple[str, int]]:
    """Every file under `directory`: its bytes' hash and modification time."""
    return {
        str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_spikes_layout_under_the_data_dir_stops_the_start_and_is_not_touched(tmp_path: Path) -> None:
    data = tmp_path / "spike-dir"
    spike_go_database(data / "data" / "spike.db")  # SPIKE_NEXUS_DATA_DIR=spike-dir, as SPIKE's Go Nexus uses it
    before = fingerprint(data)
    with pytest.raises(StorageError) as caught:
        check_data_dir(data)
    message = str(caught.value)
    assert "\n" not in message
    assert "SPIKE Go database" in message and "spike migrate from-spike" in message
    assert str(data / "data" / "spike.db") in message
    assert fingerprint(data) == before  # no -wal, no -shm, no spike.db of spike's own


def test_spikes_database_where_spikes_own_would_be_stops_the_start(tmp_path: Path) -> None:
    data = tmp_path / ".spike" / "data"  # both defaults: ~/.spike/data/spike.db
    spike_go_database(data / "spike.db")
    before = fingerprint(data)
    with pytest.raises(StorageError, match=r"spike\.db is a SPIKE Go database.*spike migrate from-spike"):
        check_data_dir(data)
    assert fingerprint(data) == before


def test_spikes_own_database_beside_spikes_go_one_is_used_with_a_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "dir"
    SqliteBackend(data).close()  # spike's own (after a migration, say)
    spike_go_database(data / "data" / "spike.db")
    with caplog.at_level(logging.WARNING, logger="spike.nexus.store"):
        check_data_dir(data)
    assert [r.getMessage() for r in caplog.records if "SPIKE Go database" in r.getMessage()]


def test_spikes_own_layouts_are_not_taken_for_spikes_go(tmp_path: Path) -> None:
    SqliteBackend(tmp_path / "a").close()
    check_data_dir(tmp_path / "a")  # spike's own database
    SqliteBackend(tmp_path / "b" / "data").close()
    check_data_dir(tmp_path / "b")  # spike's own one level down (a data dir given as its parent)
    check_data_dir(tmp_path / "new")  # nothing there yet
    (tmp_path / "c" / "data").mkdir(parents=True)
    (tmp_path / "c" / "data" / "spike.db").write_bytes(b"not a database")
    check_data_dir(tmp_path / "c")


def test_a_real_nexus_exits_2_with_one_line_and_leaves_spikes_file_alone(
    dev_identity: DevIdentity, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    spike_go_database(home / ".spike" / "data" / "spike.db")  # SPIKE's default place: spike's default too
    before = fingerprint(home)
    files = dev_identity.files("nexus")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPIKE_")}
    env.update(
        HOME=str(home),
        PYTHONPATH=str(REPO),
        SPIKE_SVID_CERT=str(files.cert),
        SPIKE_SVID_KEY=str(files.key),
        SPIKE_SVID_BUNDLE=str(files.bundle),
        SPIKE_TRUST_ROOT=dev_identity.trust_domain,
        SPIKE_NEXUS_KEEPER_PEERS="https://k1.test:8443,https://k2.test:8443,https://k3.test:8443",
    )
    done = subprocess.run(
        [sys.executable, "-m", "spike", "nexus", "--listen", "127.0.0.1:0"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=20,
    )
    assert done.returncode == 2, done
    assert done.stderr.count("\n") == 1, done.stderr
    last = done.stderr.strip()
    assert last.startswith("spike nexus: ") and "SPIKE Go database" in last and "spike migrate from-spike" in last
    assert "Traceback" not in done.stderr
    assert fingerprint(home) == before
