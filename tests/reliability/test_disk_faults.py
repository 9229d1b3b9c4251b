"""Disk faults under a running Nexus: a full disk and a read-only data dir, for real.

Nexus's data dir (its SQLite database, WAL and audit log) lives on a small
ext4 filesystem mounted from a loop device for the test (the tests run as
root here; without the right to mount, they are skipped and say why).

* Full disk: a filler file takes every free byte, then writes go on until one
  fails (SQLite reuses WAL space, so a few may still fit).
* Read-only data dir: every file in it and the dir itself are made immutable
  (``chattr +i``), which refuses writes even through the descriptors Nexus
  already holds open (a ``remount,ro`` is refused while files are open for
  writing, and permission bits do not stop root).

A full disk: writes fail with a clear error (HTTP 503 ``state_not_ready``, as
for an unreachable PostgreSQL: nothing was written, try again; one log line
naming the cause for the whole outage, one when writes work again), reads,
status and the audit log's absence do not stop anything else, nothing already
stored changes (every acknowledged value reads back, the refused values are
nowhere, SQLite's integrity check passes), and once space is freed the next
write succeeds with no restart.  Finally Nexus is killed and restarted:
everything acknowledged is still there on disk.

A read-only data dir is another story (see its test): SQLite's shared-memory
WAL index makes the process end with SIGBUS; what must hold then is that
nothing is lost and the restart says clearly what is wrong.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spike.app.api.messages import (
    SECRETS_METADATA_PATH,
    SECRETS_PATH,
    SecretGetRequest,
    SecretGetResponse,
    SecretMetadataResponse,
    SecretPutRequest,
    SecretPutResponse,
)
from spike.app.commands.client import NexusClient, NexusError
from spike.app.store.sqlite_schema import DB_NAME
from tests.reliability.reliability_rig import REPORT, LeakWatch, ProxiedCluster, StatusProbe

pytestmark = pytest.mark.e2e

FS_SIZE = 24 * 1024 * 1024
BIG = 48 * 1024  # bytes of value per write while filling: the WAL must grow


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A fresh ext4 filesystem of FS_SIZE bytes on a loop device, unmounted (immutable flags dropped) at the end.

    ext4 rather than tmpfs: tmpfs lets a file marked immutable still be written
    through a descriptor opened before, ext4 does not.
    """
    mount_point = tmp_path / "small-fs"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem for the data dir needs root")
    image = tmp_path / "small-fs.img"
    with image.open("wb") as out:
        out.truncate(FS_SIZE)
    made = _run("mkfs.ext4", "-q", "-m", "0", "-F", str(image))
    if made.returncode != 0:
        pytest.skip(f"cannot make an ext4 filesystem here: {made.stderr.strip()}")
    done = _run("mount", "-o", "loop", str(image), str(mount_point))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a loop filesystem here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        _run("chattr", "-R", "-i", str(mount_point))
        if _run("umount", str(mount_point)).returncode != 0:
            _run("umount", "-l", str(mount_point))
        image.unlink(missing_ok=True)


class Writes:
    """Puts through the operator's client, remembering what was acknowledged and what was refused."""

    def __init__(self, nexus: NexusClient, watch: LeakWatch) -> None:
        self.nexus = nexus
        self.watch = watch
        self.acked: dict[tuple[str, int], str] = {}
        self.refused: dict[str, list[str]] = {}
        self.errors: list[NexusError] = []

    def put(self, path: str, size: int = 0) -> int | None:
        value = self.watch.value("disk") + "x" * size
        try:
            answer = self.nexus.call(SECRETS_PATH, SecretPutRequest(path=path, values={"v": value}), SecretPutResponse)
        except NexusError as exc:
            self.errors.append(exc)
            self.refused.setdefault(path, []).append(value)
            return None
        self.acked[(path, answer.version)] = value
        return answer.version

    def check_all(self) -> int:
        """Every acknowledged version reads back exactly; no refused value is stored anywhere."""
        for (path, version), value in self.acked.items():
            got = self.nexus.call(
                SECRETS_PATH, SecretGetRequest(path=path, version=version), SecretGetResponse, action="get"
            )
            assert (got.version, got.data) == (version, {"v": value}), (path, version)
        for path, values in self.refused.items():
            try:
                meta = self.nexus.call(
                    SECRETS_METADATA_PATH, SecretGetRequest(path=path), SecretMetadataResponse, action="get"
                )
            except NexusError as exc:
                assert exc.code == "api_not_found", exc
                continue  # nothing was ever stored there
            for version in meta.versions:
                got = self.nexus.call(
                    SECRETS_PATH, SecretGetRequest(path=path, version=version), SecretGetResponse, action="get"
                )
                assert got.data["v"] not in values, f"{path} v{version} holds a write that was refused"
        return len(self.acked)


def integrity(db: Path) -> str:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def fill(directory: Path) -> Path:
    """Take every free byte of the filesystem with one file."""
    filler = directory / "filler"
    with filler.open("wb") as out:
        block = b"\0" * 65536
        while True:
            try:
                out.write(block)
                out.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
    with contextlib.suppress(OSError), filler.open("ab") as out:  # the last partial block
        for _ in range(64):
            out.write(b"\0" * 1024)
            out.flush()
    return filler


def start_on(make_rcluster: Callable[..., ProxiedCluster], data_dir: Path) -> ProxiedCluster:
    cluster = make_rcluster()
    cluster.data_dir = data_dir
    cluster.start_ready()
    return cluster


def fault_then_recover(
    cluster: ProxiedCluster,
    watch: LeakWatch,
    tmp_path: Path,
    fault: Callable[[], None],
    clear: Callable[[], None],
    cause: str,
    size: int,
) -> dict[str, Any]:
    probe = StatusProbe(cluster)
    try:
        with cluster.client(timeout=10.0) as nexus:
            writes = Writes(nexus, watch)
            for i in range(20):
                assert writes.put(f"disk/before/{i % 5}") is not None
            fault()
            log_from = len(cluster.nexus().text())
            attempts = 0
            while not writes.errors and attempts < 400:
                writes.put(f"disk/during/{attempts % 7}", size)
                attempts += 1
            assert writes.errors, f"{attempts} writes and not one failed"
            error = writes.errors[0]
            # 503: nothing was written, try again later (as when a PostgreSQL database is unreachable).
            assert (error.status, error.code) == (503, "state_not_ready"), error
            assert "database cannot be used right now" in str(error), error
            # The cause, in Nexus's log, once for the whole outage.
            lines = cluster.wait_log(cluster.nexus(), rf"writes to .*{DB_NAME} fail \(.*{cause}", start=log_from)
            # Everything else goes on during the fault: status, reads of all that was acknowledged.
            status = probe.get()
            assert status is not None and status["phase"] == "ready", probe.last_error
            writes.check_all()
            more = [writes.put("disk/during/again", size) for _ in range(3)]
            assert more == [None] * 3, "writes came back before the fault was cleared"

            clear()
            # Without a restart: the very next write works again, and the log says so.
            assert writes.put("disk/after/0") is not None, writes.errors[-1]
            cluster.wait_log(cluster.nexus(), rf"writes to .*{DB_NAME} work again \(\d+ refused meanwhile\)")
            text = cluster.nexus().text()[log_from:]
            assert text.count(" fail (") == 1 and "Traceback" not in text, text
            for i in range(10):
                assert writes.put(f"disk/after/{i % 3}", size) is not None, writes.errors[-1]
            checked = writes.check_all()
            assert integrity(cluster.data_dir / DB_NAME) == "ok"

        # On disk, not just in memory: a restarted Nexus reads it all back.
        cluster.kill("nexus")
        cluster.start_nexus()
        cluster.wait_ready()
        with cluster.client(timeout=10.0) as nexus:
            writes.nexus = nexus
            assert writes.check_all() == checked
        assert integrity(cluster.data_dir / DB_NAME) == "ok"
    finally:
        probe.close()
    watch.keep_copy(cluster.data_dir, tmp_path)
    return {
        "writes acknowledged": checked,
        "writes refused": sum(len(v) for v in writes.refused.values()),
        "first refusal after": attempts,
        "logged": "writes to spike.db fail (" + lines[0].split(" fail (", 1)[-1][:60],
    }


def test_full_disk_refuses_writes_cleanly_and_recovers(
    make_rcluster: Callable[..., ProxiedCluster], small_fs: Path, leak_watch: LeakWatch, tmp_path: Path
) -> None:
    cluster = start_on(make_rcluster, small_fs / "nexus-data")
    filler: list[Path] = []
    counts = fault_then_recover(
        cluster,
        leak_watch,
        tmp_path,
        fault=lambda: filler.append(fill(small_fs)),
        clear=lambda: filler.pop().unlink(),
        cause="full",
        size=BIG,
    )
    REPORT.append(f"disk full: {counts}")


def immutable(directory: Path, flag: str) -> None:
    """chattr +i / -i on the dir and every file in it."""
    for path in [*directory.iterdir(), directory]:
        done = _run("chattr", flag, str(path))
        if done.returncode != 0:
            pytest.skip(f"chattr {flag} is not supported here: {done.stderr.strip()}")


def test_data_dir_turning_read_only_under_nexus_loses_nothing(
    make_rcluster: Callable[..., ProxiedCluster], small_fs: Path, leak_watch: LeakWatch, tmp_path: Path
) -> None:
    """The data dir becomes read-only under a running Nexus (as an emergency read-only remount does).

    SQLite keeps its WAL index in a shared-memory file mapped into the process
    (``spike.db-shm``); once that file cannot be written, the next database
    access, a read as much as a write, faults in that mapping and the kernel
    ends the process with SIGBUS.  No request can be answered with an error
    first, and none can be served without the database.  What must hold: no
    acknowledged write is lost and nothing stored is damaged; a Nexus started
    while the dir is still read-only refuses at once with one line naming the
    dir (exit 2), and one started after the fault is cleared has everything.
    """
    cluster = start_on(make_rcluster, small_fs / "nexus-data")
    data_dir = cluster.data_dir
    with cluster.client(timeout=10.0) as nexus:
        writes = Writes(nexus, leak_watch)
        for i in range(20):
            assert writes.put(f"readonly/before/{i % 5}") is not None
        immutable(data_dir, "+i")
        with pytest.raises(PermissionError):
            (data_dir / "probe").write_bytes(b"x")
        assert writes.put("readonly/during") is None
        error = writes.errors[0]
    code = cluster.nexus().popen.wait(timeout=30)
    assert code == -signal.SIGBUS, (code, error, cluster.nexus().text()[-2000:])
    assert error.status == 0, error  # the connection ended with the process: a write in doubt, not stored

    # Still read-only: a new Nexus says so at start, in one line, and stops.
    proc = cluster.spawn_nexus()
    assert proc.popen.wait(timeout=30) == 2, proc.text()
    text = proc.text()
    assert str(data_dir) in text and "Traceback" not in text, text
    assert len(text.strip().splitlines()) == 1, text

    immutable(data_dir, "-i")
    assert integrity(data_dir / DB_NAME) == "ok"
    cluster.start_nexus()
    cluster.wait_ready()
    with cluster.client(timeout=10.0) as nexus:
        writes.nexus = nexus
        checked = writes.check_all()  # every acknowledged value; the write in doubt is nowhere
        assert writes.put("readonly/after") is not None
    leak_watch.keep_copy(data_dir, tmp_path)
    REPORT.append(
        f"read-only data dir: Nexus ended by SIGBUS in SQLite's WAL index, {checked} acknowledged writes "
        "all back after a restart, start refused while read-only (exit 2, one line)"
    )


def test_nexus_refuses_to_start_on_a_read_only_data_dir(
    make_rcluster: Callable[..., ProxiedCluster], small_fs: Path
) -> None:
    """A data dir it cannot write is said at start, in one line, with the configuration exit code."""
    cluster = make_rcluster()
    cluster.data_dir = small_fs / "nexus-data"
    cluster.data_dir.mkdir()
    immutable(cluster.data_dir, "+i")
    cluster.start(nexus=False)
    proc = cluster.spawn_nexus()
    assert proc.popen.wait(timeout=30) == 2, proc.text()
    text = proc.text()
    assert str(cluster.data_dir) in text and "Traceback" not in text, text
    assert len(text.strip().splitlines()) == 1, text
