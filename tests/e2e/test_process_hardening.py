"""Real keeper and Nexus processes protect their memory, and a 1-of-n custody needs saying so (issue 14, L4).

What the kernel says about a running `spike keeper` and `spike nexus`:

* core dumps are off: /proc/<pid>/limits shows a core size limit of 0, soft
  and hard; and the process is not dumpable, which shows when it runs as a
  plain user: the kernel then gives its /proc/<pid>/ to root;
* where the system allows locking every future page (root with CAP_IPC_LOCK,
  as these tests usually run), /proc/<pid>/status shows locked memory; where
  it does not (a plain user, a 64 KiB RLIMIT_MEMLOCK), the server starts
  anyway and says so in its one line, unless ``--require-memory-lock`` asks
  it to stop: then one line and exit 2.

Threshold 1 (every shard is the root key itself) is refused by Nexus at
start and by bootstrap, unless explicitly allowed.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from spike.app.commands.devca import DevIdentity
from spike.transports.tls import SvidFiles
from tests.e2e.harness import SPIKE, Cluster, base_env, pick_port, svid_env, wait_until

pytestmark = pytest.mark.e2e


def limits_of(pid: int) -> dict[str, tuple[str, str]]:
    """/proc/<pid>/limits: resource name -> (soft, hard)."""
    out = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        name, soft, hard = line[:26].strip(), *line[26:].split()[:2]
        out[name] = (soft, hard)
    return out


def status_of(pid: int) -> dict[str, str]:
    fields = (line.partition(":") for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {name: value.strip() for name, _, value in fields}


def test_keeper_and_nexus_turn_core_dumps_off_and_lock_their_memory(make_cluster: Callable[..., Cluster]) -> None:
    """Started as the tests start them: where the system allows locking every page (root, CAP_IPC_LOCK,
    or an unlimited RLIMIT_MEMLOCK), the kernel counts locked memory for them."""
    cluster = make_cluster()
    cluster.start_ready()
    lockable = os.geteuid() == 0 or resource.getrlimit(resource.RLIMIT_MEMLOCK)[1] == resource.RLIM_INFINITY
    for proc in (cluster.keeper(1), cluster.nexus()):
        pid = proc.popen.pid
        assert limits_of(pid)["Max core file size"] == ("0", "0"), proc.name
        lines = [line for line in proc.text().splitlines() if "spike.memory" in line]
        assert len(lines) == 1, (proc.name, proc.text())
        assert "core dumps off (not dumpable, core size limit 0)" in lines[0], lines
        if lockable:
            assert "memory locked (mlockall)" in lines[0], lines
            assert int(status_of(pid)["VmLck"].split()[0]) > 0, proc.name
        else:
            assert "memory NOT locked" in lines[0], lines


PLAIN_UID = 65534  # "nobody": what a root test run starts the servers as, to see what a user's process does


@dataclass
class PlainRun:
    """A server started as a plain user (the test's own user, or nobody when the tests run as root),
    with RLIMIT_MEMLOCK at 64 KiB: it cannot lock its memory."""

    popen: subprocess.Popen[bytes]
    log: Path
    uid: int
    home: Path  # its files (copies of an SVID, a data dir), readable by that user

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)
        shutil.rmtree(self.home, ignore_errors=True)


def _small_memlock() -> None:  # pragma: no cover - runs in the child, between fork and exec
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 * 1024, 64 * 1024))


def start_plain(identity: DevIdentity, tmp: Path, name: str, role: str, args: list[str]) -> PlainRun:
    """`spike <args>` as a plain user; its SVID files (and a data dir) are copies that user can read."""
    root = os.geteuid() == 0
    prefix: list[str] = []
    if root:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("the tests run as root and setpriv is missing: cannot start a server as a plain user")
        prefix = [setpriv, f"--reuid={PLAIN_UID}", f"--regid={PLAIN_UID}", "--clear-groups"]
    # Outside the tests' own tmp tree, which only its owner may enter; removed by `PlainRun.stop`.
    home = Path(tempfile.mkdtemp(prefix=f"spike-{name}-"))
    source = identity.keeper(1) if role == "keeper" else identity.files(role)
    files = {}
    for what, path in (("cert", source.cert), ("key", source.key), ("bundle", source.bundle)):
        files[what] = home / f"{what}.pem"
        shutil.copyfile(path, files[what])
    (home / "data").mkdir()
    if root:
        for path in [home, *home.iterdir()]:
            os.chown(path, PLAIN_UID, PLAIN_UID)
    env = base_env()
    env.update(svid_env(SvidFiles(files["cert"], files["key"], files["bundle"]), identity.trust_domain))
    env["SPIKE_NEXUS_DATA_DIR"] = str(home / "data")
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [*prefix, *SPIKE, *args],
            env=env,
            cwd=home,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_small_memlock,  # noqa: PLW1509 - it only lowers a limit
        )
    return PlainRun(popen, log, PLAIN_UID if root else os.geteuid(), home)


def _plain_servers(identity: DevIdentity, tmp: Path, *extra: str) -> list[PlainRun]:
    peers = ",".join(f"{i}=https://127.0.0.1:{pick_port()}" for i in (1, 2, 3))
    return [
        start_plain(identity, tmp, "keeper", "keeper", ["keeper", "--listen", f"127.0.0.1:{pick_port()}", *extra]),
        start_plain(
            identity,
            tmp,
            "nexus",
            "nexus",
            ["nexus", "--listen", f"127.0.0.1:{pick_port()}", "--keepers", peers, *extra],
        ),
    ]


def test_a_plain_users_servers_are_not_dumpable_and_say_they_cannot_lock(
    dev_identity: DevIdentity, tmp_path: Path
) -> None:
    """The kernel hands /proc/<pid>/ of a process that is not dumpable to root: its owner shows it."""
    runs = _plain_servers(dev_identity, tmp_path)
    control = subprocess.Popen(
        [*(["setpriv", f"--reuid={PLAIN_UID}", f"--regid={PLAIN_UID}", "--clear-groups"] if os.geteuid() == 0 else []),
         "sleep", "60"]
    )  # fmt: skip
    try:
        for run in runs:
            wait_until(lambda run=run: "listening on" in run.text() or run.popen.poll() is not None, "listening")
            assert run.popen.poll() is None, run.text()
            pid = run.popen.pid
            assert Path(f"/proc/{pid}/status").stat().st_uid == 0, "still dumpable"
            assert limits_of(pid)["Max core file size"] == ("0", "0")
            lines = [line for line in run.text().splitlines() if "spike.memory" in line]
            assert len(lines) == 1, run.text()
            assert "WARNING" in lines[0], lines
            assert "core dumps off (not dumpable, core size limit 0)" in lines[0], lines
            assert "memory NOT locked: RLIMIT_MEMLOCK is 64 KiB" in lines[0], lines
            assert status_of(pid)["VmLck"].split()[0] == "0"
        # The control: the same user's ordinary process keeps its /proc/<pid>/ (so the check means something).
        wait_until(lambda: Path(f"/proc/{control.pid}/cmdline").read_bytes().startswith(b"sleep"), "the control")
        assert Path(f"/proc/{control.pid}/status").stat().st_uid == runs[0].uid
    finally:
        control.kill()
        control.wait()
        for run in runs:
            run.stop()


def test_require_memory_lock_stops_a_server_that_cannot_lock_with_one_line(
    dev_identity: DevIdentity, tmp_path: Path
) -> None:
    for run in _plain_servers(dev_identity, tmp_path, "--require-memory-lock"):
        try:
            code = run.popen.wait(30)
        finally:
            run.stop()
        output = run.text()
        assert code == 2, output
        assert "Traceback" not in output
        errors = [line for line in output.splitlines() if line.startswith("spike ")]
        assert len(errors) == 1, output
        assert "memory could not be locked" in errors[0] and "RLIMIT_MEMLOCK is 64 KiB" in errors[0], output
        assert "listening on" not in output


def test_bootstrap_refuses_a_one_of_n_nexus_unless_told_to(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(keepers=2, threshold=1, nexus_env={"SPIKE_ALLOW_THRESHOLD_ONE": "true"})
    cluster.start()
    refused = cluster.bootstrap()
    assert refused.returncode == 2, refused
    lines = refused.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("spike bootstrap: "), refused
    assert "threshold 1 makes every shard the root key" in lines[0], refused
    assert cluster.read_shards() == {}  # nothing was seeded
    allowed = cluster.bootstrap("--allow-threshold-one")
    assert allowed.returncode == 0, allowed
    cluster.wait_ready(epoch=1)
