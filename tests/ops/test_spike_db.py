"""Reading SPIKE's Go SQLite database and rebuilding its key: spike/app/spike_db.py, spike/app/commands/migrate.py.

The databases are written by tests/spike_go_db.py, as SPIKE's Go code writes them (its DDL, its
statements, AES-GCM under the raw root key, per-field nonces, mattn/go-sqlite3's time text).  The dry run
(`spike migrate from-spike --dry-run`) needs no Nexus: it is run here in-process, and every bad input
ends in one line and a non-zero exit with the database untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

import pytest
import yaml

from spike.app.cli import main
from spike.app.commands.migrate import fitted_threshold, read_shards, rebuild_key
from spike.app.errors import CommandError
from spike.app.spike_db import SpikeDbError, WrongKey, field_nonce, go_time, read_database
from spike.protocol.material import RootKey
from tests.spike_go_db import ROOT_KEY, VALUES, build_deployment, go_time_text, recovery_lines

OTHER_KEY = hashlib.sha256(b"another SPIKE deployment").digest()


@pytest.fixture
def spike_db(tmp_path: Path) -> Path:
    path = tmp_path / "spike.db"
    build_deployment(path)
    return path


def shard_files(directory: Path, key: bytes = ROOT_KEY, threshold: int = 2, shares: int = 3) -> list[Path]:
    directory.mkdir(exist_ok=True)
    files = []
    for i, line in recovery_lines(key, threshold, shares).items():
        path = directory / f"spike.recovery.{i}.txt"
        path.write_text(line)  # SPIKE writes no newline
        files.append(path)
    return files


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ the format


def test_go_times_read_as_mattn_writes_them() -> None:
    nanos = 1_767_000_001_123_706_789
    assert go_time(go_time_text(nanos)) == pytest.approx(nanos / 1e9, abs=1e-6)
    assert go_time("2026-01-02 03:04:05+00:00") == 1_767_323_045
    assert go_time("2026-01-02T03:04:05.5+02:00") == 1_767_323_045 - 7200 + 0.5
    assert go_time("2026-01-02 03:04:05") == 1_767_323_045  # no zone: UTC, as mattn parses it
    assert go_time("2026-01-02") == 1_767_312_000
    assert go_time(1_767_323_045) == 1_767_323_045  # an integer column: Unix seconds
    with pytest.raises(SpikeDbError, match="not a time"):
        go_time("yesterday")


def test_metadata_nonces_are_spikes_salted_xor() -> None:
    nonce = bytes(range(12))
    assert field_nonce(nonce, "max_versions") == bytes(a ^ b for a, b in zip(nonce, b"max_versions", strict=True))
    assert field_nonce(bytes(12), "current_version") == b"current_ver_"
    with pytest.raises(SpikeDbError, match="13 bytes"):
        field_nonce(bytes(13), "current_version")


def test_every_secret_version_and_policy_is_read_as_spike_serves_it(spike_db: Path) -> None:
    data = read_database(spike_db, RootKey(ROOT_KEY))
    secrets = {s.path: s for s in data.secrets}
    assert sorted(secrets) == ["/tenants/acme/api", "apps/db", "old/token", "team/web"]

    db = secrets["apps/db"]
    assert [(v.version, v.values["password"], v.deleted_at is not None) for v in db.versions] == [
        (1, VALUES["v1"], False),
        (2, VALUES["v2"], True),
        (3, VALUES["v3"], False),
    ]
    assert db.max_versions == 10
    assert db.versions[0].created_at == pytest.approx(1_767_000_001.124, abs=1e-3)  # the fixture's first moment
    assert db.created_at == 1_767_000_001  # metadata times are whole seconds in SPIKE
    assert db.versions[1].deleted_at is not None and db.versions[1].deleted_at > db.versions[2].created_at

    token = secrets["old/token"]  # deleted whole: SPIKE's current version 0
    assert [(v.version, v.deleted_at is not None) for v in token.versions] == [(1, True)]
    assert token.current_version == 1  # ours: the newest version, so the next write is 2, as SPIKE's
    assert secrets["/tenants/acme/api"].versions[0].values == {"api key": VALUES["slash"]}
    # Go's json.Marshal escapes <, > and & as \u003c, \u003e, \u0026: read back as they were.
    assert secrets["team/web"].versions[0].values == {
        "region": "eu-west-1",
        "signing key": VALUES["spaced"],
        "note": "a<b&c>d",
    }

    policies = {p.name: p for p in data.policies}
    assert sorted(policies) == ["db readers", "web-writer"]
    assert policies["db readers"].permissions == ("read", "list")
    assert policies["db readers"].spiffe_id_pattern == "^spiffe://spike\\.test/workload/db-.*$"
    replaced = policies["web-writer"]
    assert (replaced.path_pattern, replaced.permissions) == ("^team/", ("write",))
    assert replaced.updated_at > replaced.created_at  # SPIKE keeps the first creation time
    assert data.orphans == 0


def test_version_rows_spike_cannot_see_are_counted_not_read(spike_db: Path) -> None:
    with sqlite3.connect(spike_db) as db:
        db.execute("INSERT INTO secrets VALUES ('ghost', 1, zeroblob(12), zeroblob(40), '2026-01-01', NULL)")
    db.close()
    assert read_database(spike_db, RootKey(ROOT_KEY)).orphans == 1


# ------------------------------------------------------------------ the key


def test_t_shards_rebuild_spikes_key_and_more_must_agree(tmp_path: Path) -> None:
    files = shard_files(tmp_path / "recover", threshold=2, shares=3)
    shares = read_shards(files, None)
    assert rebuild_key(shares[:2], None) == RootKey(ROOT_KEY)
    assert rebuild_key(shares[1:], 2) == RootKey(ROOT_KEY)
    assert rebuild_key(shares, 2) == RootKey(ROOT_KEY)
    assert rebuild_key(shares, None) == RootKey(ROOT_KEY)  # any t or more of one polynomial
    assert fitted_threshold(shares) == 2  # more than t shards: SPIKE's threshold is found
    five = read_shards(shard_files(tmp_path / "five", threshold=3, shares=5), None)
    assert fitted_threshold(five) == 3 and rebuild_key(five, None) == RootKey(ROOT_KEY)
    assert read_shards([], tmp_path / "recover") == shares

    foreign = read_shards(shard_files(tmp_path / "other", OTHER_KEY), None)
    with pytest.raises(CommandError, match="do not lie on one polynomial"):
        rebuild_key([shares[0], shares[1], foreign[2]], 2)
    # Without --threshold, a foreign shard among more than t makes them fit only degree k-1: a wrong key.
    assert fitted_threshold([shares[0], shares[1], foreign[2]]) == 3
    assert rebuild_key([shares[0], shares[1], foreign[2]], None) != RootKey(ROOT_KEY)
    with pytest.raises(CommandError, match="2 shards are needed"):
        rebuild_key(shares[:1], 2)


def test_a_key_the_shards_do_not_rebuild_fails_on_the_first_row(spike_db: Path) -> None:
    with pytest.raises(WrongKey, match="does not open under the key the shards rebuild"):
        read_database(spike_db, RootKey(OTHER_KEY))


# ------------------------------------------------------------------ bad databases


def test_files_that_are_not_spikes_database_are_refused_in_one_line(tmp_path: Path) -> None:
    key = RootKey(ROOT_KEY)
    with pytest.raises(SpikeDbError, match="is not a file"):
        read_database(tmp_path / "missing.db", key)
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(SpikeDbError, match="is not an SQLite database"):
        read_database(junk, key)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE kv (k TEXT)")
    db.close()
    with pytest.raises(SpikeDbError, match="is not a SPIKE database: it has no table policies"):
        read_database(other, key)


def test_an_unknown_schema_or_schema_version_is_refused(spike_db: Path) -> None:
    with sqlite3.connect(spike_db) as db:
        db.execute("PRAGMA user_version = 2")
    db.close()
    with pytest.raises(SpikeDbError, match="schema version 2"):
        read_database(spike_db, RootKey(ROOT_KEY))
    with sqlite3.connect(spike_db) as db:
        db.execute("PRAGMA user_version = 0")
        db.execute("ALTER TABLE secrets ADD COLUMN encrypted_metadata BLOB")
    db.close()
    with pytest.raises(SpikeDbError, match="unknown SPIKE schema: table secrets"):
        read_database(spike_db, RootKey(ROOT_KEY))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_refused(spike_db: Path) -> None:
    spike_db.chmod(0)
    try:
        with pytest.raises(SpikeDbError, match="cannot read"):
            read_database(spike_db, RootKey(ROOT_KEY))
    finally:
        spike_db.chmod(0o600)


# ------------------------------------------------------------------ the dry run, in-process


def migrate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["migrate", "from-spike", *args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_no_secret(text: str) -> None:
    for value in VALUES.values():
        assert value not in text
    assert ROOT_KEY.hex() not in text


def test_the_dry_run_reports_what_would_move_and_writes_nothing(
    spike_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shard_files(tmp_path / "recover")
    before = digest(spike_db)
    code, out, err = migrate(capsys, str(spike_db), "--recovery-dir", str(tmp_path / "recover"), "--dry-run")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == (
        "would move (dry run: nothing written): 4 secret(s) with 6 version(s) (2 soft-deleted; 1 secret(s) "
        "deleted whole) and 2 policy(ies)"
    )
    assert "  secret apps/db: versions 1, 2, 3, deleted 2" in out
    assert "  secret /tenants/acme/api: versions 1" in out
    assert "  policy db readers" in out
    assert_no_secret(out)
    assert digest(spike_db) == before

    files = [str(p) for p in sorted((tmp_path / "recover").iterdir())[:2]]
    code, out, err = migrate(
        capsys, str(spike_db), "--shard", files[0], "--shard", files[1], "--dry-run", "--format", "json"
    )
    assert code == 0, err
    report = json.loads(out)
    assert (report["dry_run"], report["secrets"], report["versions"], report["deleted_versions"]) == (True, 4, 6, 2)
    assert report["policy_names"] == ["db readers", "web-writer"]
    assert {"path": "old/token", "versions": [1], "deleted": [1]} in report["paths"]
    assert_no_secret(out)

    code, out, err = migrate(capsys, str(spike_db), "--recovery-dir", str(tmp_path / "recover"), "--dry-run", "-f", "y")
    assert code == 0, err
    assert yaml.safe_load(out)["policy_names"] == ["db readers", "web-writer"]
    assert_no_secret(out)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("one shard", "does not open under the key the shards rebuild"),
        ("foreign shard", "does not open under the key the shards rebuild"),
        ("threshold", "3 shards are needed (--threshold), 2 given"),
        ("not sqlite", "is not an SQLite database"),
        ("a directory", "is not a file"),
        ("foreign third shard", "does not open under the key the shards rebuild"),
        ("bad shard file", "a recovery shard looks like spike:<id>:<64 hex digits>"),
        ("no shards", "give SPIKE's recovery shards"),
    ],
)
def test_bad_input_is_one_line_and_a_non_zero_exit(
    case: str, expected: str, spike_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = [str(p) for p in shard_files(tmp_path / "recover")]
    foreign = [str(p) for p in shard_files(tmp_path / "other", OTHER_KEY)]
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 10)
    bad = tmp_path / "bad.txt"
    bad.write_text("spike:1:zz")
    database = str({"not sqlite": junk, "a directory": tmp_path}.get(case, spike_db))
    shards = {
        "one shard": ["--shard", files[0]],
        "foreign shard": ["--shard", files[0], "--shard", foreign[1]],
        "threshold": ["--shard", files[0], "--shard", files[1], "--threshold", "3"],
        "not sqlite": ["--shard", files[0], "--shard", files[1]],
        "a directory": ["--shard", files[0], "--shard", files[1]],
        "foreign third shard": ["--shard", files[0], "--shard", files[1], "--shard", foreign[2]],
        "bad shard file": ["--shard", str(bad)],
        "no shards": [],
    }[case]
    before = digest(spike_db)
    code, out, err = migrate(capsys, database, *shards, "--dry-run")
    assert code != 0
    assert out == ""
    assert len(err.splitlines()) == 1 and expected in err, err
    assert "Traceback" not in err
    assert_no_secret(err)
    assert digest(spike_db) == before
