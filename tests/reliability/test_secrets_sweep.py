"""Secrets stay secret: after every other test of the session, no file written holds a value, a shard or a key.

Runs last (the `after_everything` marker, see conftest.py), whatever its file is
called.  What it looks for was collected by the tests of this tier as they ran
(`LeakWatch`); run alone (`pytest tests/reliability/test_secrets_sweep.py`),
it first runs a small workload of its own (`sweep_workload`: secrets written,
a keeper and Nexus killed with SIGKILL and brought back) and sweeps that:

* every secret value they wrote: each carries the session's random token, so
  one search finds them all, raw or hex or base64 encoded;
* every shard they read from a keeper and every root key rebuilt from those
  shards: raw bytes, hex, base64, a JSON or Python list of ints, one integer,
  whole or cut short (any 11 consecutive bytes).

Where: the token in every file under the session's tmp tree (all tiers' logs,
databases, data dirs, audit logs); the shards and keys in every file of this
tier's clusters (their logs, data dirs with database, WAL and audit log, and
the copies kept of data dirs that lived on filesystems mounted for a test),
plus every log in the session's tmp tree.  The databases are among them: no
plaintext value is stored, while the secret paths (not secret) are, which
shows the right files were read.

A stored row that is tampered with or moved to another path or version is
refused on read: tests/store/test_store_tamper.py covers every way on a store;
the second test here does it once more on a real database (the chaos run's, or
the own workload's), opened with the real root key rebuilt from its keepers.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import sqlite3
from pathlib import Path

import pytest

from spike.app.api.messages import SECRETS_PATH, SecretPutRequest, SecretPutResponse
from spike.app.commands.devca import DevIdentity
from spike.app.store.sealing import TamperedData
from spike.app.store.sqlite import SecretStore
from spike.app.store.sqlite_schema import DB_NAME
from spike.protocol.material import RootKey
from tests.reliability.reliability_rig import (
    REPORT,
    LeakWatch,
    Needles,
    ProxiedCluster,
    files_under,
    ready_cluster,
    scan,
    scan_bytes,
)

pytestmark = pytest.mark.after_everything

OWN = "sweep"  # the label (and directory name) of the own workload


def _put(cluster: ProxiedCluster, path: str, value: str) -> None:
    with cluster.client() as nexus:
        nexus.call(SECRETS_PATH, SecretPutRequest(path=path, values={"v": value}), SecretPutResponse)


def _run_own_workload(watch: LeakWatch, identity: DevIdentity, root: Path) -> None:
    """Secrets written through a keeper's and Nexus's SIGKILL: re-seed, recovery, logs, database, audit log."""
    with ready_cluster(identity, root / OWN, watch, OWN) as cluster:
        for n in range(2):  # two versions of one path, for the moved-row test
            _put(cluster, "sweep/a", watch.value(f"a{n}"))
        cluster.kill_keeper(1)
        cluster.start_keeper(1)
        cluster.wait_status(lambda s: s["redundancy"] == 1, "keeper 1 re-seeded")
        cluster.kill("nexus")
        cluster.start_nexus()
        cluster.wait_status(lambda s: s["phase"] == "ready" and s["redundancy"] == 1, "Nexus recovered")
        for n in range(8):
            _put(cluster, f"sweep/b{n}", watch.value(f"b{n}"))
        watch.add_shards(cluster.read_shards(), OWN, cluster.threshold)


@pytest.fixture(scope="module")
def swept(leak_watch: LeakWatch, dev_identity: DevIdentity, tmp_path_factory: pytest.TempPathFactory) -> LeakWatch:
    """The session's watch; when no test of this tier ran before (this file alone), filled by a workload of its own."""
    if not leak_watch.dirs:
        _run_own_workload(leak_watch, dev_identity, tmp_path_factory.mktemp("own-workload"))
    return leak_watch


def test_no_file_holds_a_secret_value_shard_or_key(swept: LeakWatch, tmp_path: Path) -> None:
    watch = swept
    assert watch.dirs and watch.values and watch.binary, "nothing was written to look for"
    needles = Needles.build(watch.token, watch.binary)

    # The search itself works: every form of a planted shard, key and value is found.
    control_secret = hashlib.sha256(b"a control secret").digest()
    control = Needles.build("RLVCONTROL0123456789", {"control": control_secret})
    forms = {
        "raw": control_secret[5:20],
        "hex": control_secret.hex().encode(),
        "HEX": control_secret[3:19].hex().upper().encode(),
        "base64": base64.b64encode(b"xy" + control_secret),
        "base64url": base64.urlsafe_b64encode(b"z" + control_secret),
        "json ints": ("[" + ",".join(map(str, control_secret[4:20])) + "]").encode(),
        "python ints": ("[" + ", ".join(map(str, control_secret)) + "]").encode(),
        "integer": str(int.from_bytes(control_secret, "big")).encode(),
        "token": b'{"v":"RLVCONTROL0123456789-x"}',
        "token hex": b"RLVCONTROL0123456789".hex().encode(),
        "token base64": base64.b64encode(b"ab" + b"RLVCONTROL0123456789-more"),
    }
    for form, data in forms.items():
        assert scan_bytes(b"some text " + data + b" more text", control), f"the scanner missed the {form} form"
    # ... and what is not there is not: a shorter cut of the token, 7 bytes of the secret.
    assert not scan_bytes(bytes(range(256)) * 4 + b"RLVCONTROL012345678 " + control_secret[3:10], control)

    # The token, everywhere the session wrote; shards and keys in this tier's files and every log.
    everything = files_under([watch.basetemp])
    ours = files_under(watch.dirs)
    logs = [p for p in everything if p.suffix in (".log", ".txt", ".json", ".out")]
    token_only = Needles.build(watch.token, {})
    hits = sorted(set(scan(everything, token_only)) | set(scan(sorted(set(ours) | set(logs)), needles)))
    databases = [p for p in ours if p.name.startswith(DB_NAME)]
    audit_logs = [p for p in ours if p.name == "audit.log"]
    size = sum(p.stat().st_size for p in everything) / 2**20
    REPORT.append(
        f"secrets sweep: {watch.values} secret values (token {watch.token}), {len(watch.binary)} shards and keys; "
        f"{len(everything)} files ({size:.0f} MiB) searched for values, {len(set(ours) | set(logs))} for shards and "
        f"keys, {len(databases)} database files, {len(audit_logs)} audit logs; hits: {len(hits)}"
    )
    assert hits == [], "\n".join(hits[:30])

    # The databases were really among the files read: they hold the (non-secret) paths the tests wrote.
    assert databases and audit_logs, (databases, audit_logs)
    if any(name.startswith("chaos") for name in watch.sources):
        chaos_db = b"".join(p.read_bytes() for p in databases if "chaos" in str(p) or "cluster" in str(p))
        assert b"chaos/w0/g0" in chaos_db, "the chaos database was not among the files searched"


def _real_database(watch: LeakWatch) -> tuple[bytes, Path]:
    """A database the session's processes wrote and the root key its keepers held: the chaos run's, else our own."""
    for label in ("chaos", OWN):
        key = watch.binary.get(f"{label} root key")
        databases = [p for d in watch.dirs for p in files_under([d]) if p.name == DB_NAME and label in str(p)]
        if key is not None and databases:
            return key, databases[0]
    raise AssertionError(f"no database with a known root key among {watch.dirs}")


def test_a_moved_row_of_the_real_database_is_refused(
    swept: LeakWatch, dev_identity: DevIdentity, tmp_path: Path
) -> None:
    """A real database, opened with the real root key: intact rows read, a moved one is refused."""
    leak_watch = swept
    if "chaos root key" not in leak_watch.binary and f"{OWN} root key" not in leak_watch.binary:
        # Other tests ran, but not the chaos run: this test brings its own database.
        _run_own_workload(leak_watch, dev_identity, tmp_path)
    key, database = _real_database(leak_watch)
    source = database.parent
    data_dir = tmp_path / "moved"
    shutil.copytree(source, data_dir)
    with sqlite3.connect(data_dir / DB_NAME) as db:
        rows = db.execute(
            "SELECT path, version FROM secret_version WHERE sealed IS NOT NULL ORDER BY path, version LIMIT 2"
        ).fetchall()
        assert len(rows) == 2, rows
        (path, first), (_, second) = rows
        # The keyring is opened with the root key of the record in force (the chaos run rotates it).
        (epoch,) = db.execute("SELECT epoch FROM key_record WHERE id = 1").fetchone()
        # Move version `first`'s sealed value onto version `second` (a row copied elsewhere).
        db.execute(
            "UPDATE secret_version SET sealed = (SELECT sealed FROM secret_version WHERE path = ?1 AND version = ?2) "
            "WHERE path = ?1 AND version = ?3",
            (path, first, second),
        )
    store = SecretStore(data_dir)
    try:
        store.unlock(RootKey(bytearray(key)), epoch)
        version, values = store.get(path, first)
        assert version == first and values["v"].startswith(leak_watch.token)
        with pytest.raises(TamperedData):
            store.get(path, second)
    finally:
        store.lock()
        store.close()
    shutil.rmtree(data_dir)  # it holds real (sealed) data: not kept
