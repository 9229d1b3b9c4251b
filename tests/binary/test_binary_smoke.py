"""The single `spike` executable, end to end, with no Python anywhere near the processes under test.

The binary comes from tests/binary/conftest.py: `build/build.sh --if-stale` builds dist/spike with
PyInstaller from a clean venv (about a minute) unless dist/spike was built from exactly the current
sources and commit, which the build's stamp records.  A machine that cannot build it (not Linux
x86-64/aarch64, no shared libpython, no package index) makes these tests SKIP with the build's reason,
except under `CI=true`, where they FAIL: CI never passes without the single executable; any other build
failure fails them.  `SPIKE_BINARY=/path/to/spike` tests a given executable instead (a release).

Every process under test is the binary, run by absolute path with an environment of a handful of
variables whose PATH is an empty directory: no interpreter, no PYTHON* variable, no virtual
environment can be found.  The deployment test starts keepers and Nexus, bootstraps, writes and
reads a secret, kills a keeper with SIGKILL (the bootloader's pid, as `kill -9 $(pidof ...)` would)
and sees Nexus re-seed it.  Nexus runs on the suite's real PostgreSQL with the bundled libpq.  A keeper
takes its SVID from a (test) SPIFFE Workload API, which needs the lazily imported spiffe/gRPC/protobuf
modules in the binary.  `spike dev` runs twice on one data dir and is stopped with SIGINT to its process
group, as a terminal's Ctrl-C stops it, from the binary and from this interpreter.  The big extension
modules most of these load (gRPC, psycopg, cryptography, uvloop, SQLite) are unpacked on first import
(build/lazy_unpack.py): each of these tests goes through that.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from spike.app.commands.devca import DevIdentity
from spike.protocol.identity import Role, TrustDomains
from spike.protocol.wire import KEEPER_SHARD_PATH
from spike.transports.blocking import ClientSession
from spike.transports.tls import client_context, keeper_check
from tests import pg_server
from tests.binary.binary_build import ROOT, cannot_build

pytestmark = pytest.mark.e2e

TIMEOUT = 60.0  # generous: CI machines are shared


# ---------------------------------------------------------------------- the environment


def bare_env(home: Path, **extra: str) -> dict[str, str]:
    """A minimal environment: PATH is an empty directory, so there is no python3 (or anything) to find."""
    empty = home / "empty-path"
    empty.mkdir(parents=True, exist_ok=True)
    tmp = home / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {"PATH": str(empty), "HOME": str(home), "TMPDIR": str(tmp), "LANG": "C.UTF-8", **extra}
    assert shutil.which("python3", path=env["PATH"]) is None
    assert shutil.which("python", path=env["PATH"]) is None
    return env


# ---------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(condition: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def python_processes(pid: int) -> list[str]:
    """Executables of `pid` and its descendants that look like a Python interpreter."""
    found: list[str] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            exe = os.readlink(f"/proc/{current}/exe")
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        if re.search(r"python", Path(exe).name):
            found.append(f"{current}: {exe}")
        todo.extend(int(c) for c in children)
    return found


def mapped_files(pid: int) -> list[str]:
    """The memory maps of `pid` and its children (the one-file bootloader's child runs spike)."""
    maps = [Path(f"/proc/{pid}/maps").read_text()]
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    maps.extend(Path(f"/proc/{child}/maps").read_text() for child in children)
    return maps


@dataclass
class Spike:
    """Runs the spike under test (the binary, or this interpreter for comparison) in `home`."""

    command: list[str]
    home: Path
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.home / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [*self.command, *args],
            env={**self.env, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: signals as a terminal or a supervisor sends them
        )
        log.close()
        self.procs.append(process)
        return process

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.command, *args],
            env={**self.env, **(env or {})},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )

    def log(self, name: str) -> str:
        return (self.home / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        """SIGTERM to what still runs (spike dev then stops its own children), SIGKILL if that is not enough."""
        for process in self.procs:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in self.procs:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


@pytest.fixture
def spikes(tmp_path: Path) -> Iterator[Callable[[list[str]], Spike]]:
    made: list[Spike] = []

    def make(command: list[str]) -> Spike:
        home = tmp_path / f"spike-{len(made) + 1}"
        home.mkdir()
        spike = Spike(command, home, bare_env(home))
        made.append(spike)
        return spike

    try:
        yield make
    finally:
        for spike in made:
            spike.close()


# ---------------------------------------------------------------------- tests


def test_version_names_the_commit(spike_binary: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [str(spike_binary), "--version"], env=bare_env(tmp_path), capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"spike \d+\.\d+\.\d+\S* \(commit ([0-9a-f]{7,40}(-dirty)?|unknown)\)\n", done.stdout)


def test_keepers_nexus_bootstrap_secrets_and_a_killed_keeper_reseeded(
    spike_binary: Path, spikes: Callable[[list[str]], Spike]
) -> None:
    spike = spikes([str(spike_binary)])
    made = spike.run("dev-identity", "--dir", str(spike.home / "id"), "--trust-domain", "spike.test")
    assert made.returncode == 0, made.stderr
    ident = spike.home / "id"

    def svid(name: str, **extra: str) -> dict[str, str]:
        return {
            "SPIKE_SVID_CERT": str(ident / f"{name}.pem"),
            "SPIKE_SVID_KEY": str(ident / f"{name}-key.pem"),
            "SPIKE_SVID_BUNDLE": str(ident / "bundle.pem"),
            "SPIKE_TRUST_ROOT": "spike.test",
            **extra,
        }

    ports = {i: free_port() for i in (1, 2, 3)}
    nexus_port = free_port()
    nexus_url = f"https://127.0.0.1:{nexus_port}"
    keepers = {
        i: spike.start(f"keeper-{i}", "keeper", "--listen", f"127.0.0.1:{p}", env=svid(f"keeper-{i}"))
        for i, p in ports.items()
    }
    nexus = spike.start(
        "nexus",
        "nexus",
        "--listen",
        f"127.0.0.1:{nexus_port}",
        "--keepers",
        ",".join(f"{i}=https://127.0.0.1:{p}" for i, p in ports.items()),
        "--data-dir",
        str(spike.home / "nexus-data"),
        "--poll-interval",
        "0.5s",
        env=svid("nexus"),
    )
    every = [*ports.values(), nexus_port]
    wait_until(lambda: all(listening(port) for port in every), "keepers and Nexus to listen")
    for process in spike.procs:
        assert not python_processes(process.pid), "a Python interpreter runs under the binary"
    # The runner imports uvloop lazily, and silently does without it: a runtime dependency here, it
    # must be in the binary too.  Nexus runs on it; keepers deliberately do not (memory).
    if importlib.util.find_spec("uvloop") is not None:
        assert any("uvloop/loop" in maps for maps in mapped_files(nexus.pid)), "Nexus runs without uvloop"

    boot = spike.run("bootstrap", "--nexus", nexus_url, env=svid("bootstrap"))
    assert boot.returncode == 0, boot.stdout + boot.stderr
    assert "bootstrap complete" in boot.stdout

    pilot = svid("pilot-superuser", SPIKE_NEXUS_API_URL=nexus_url)
    put = spike.run("secret", "put", "app/db", "user=admin", "password=s3cret", env=pilot)
    assert put.returncode == 0, put.stderr
    got = spike.run("secret", "get", "app/db", "password", env=pilot)
    assert (got.returncode, got.stdout) == (0, "s3cret\n"), got.stderr

    def status() -> dict[str, Any]:
        done = spike.run("status", "--format", "json", env=pilot)
        assert done.returncode in (0, 3, 4), done.stderr
        body: dict[str, Any] = json.loads(done.stdout)
        return body

    def reseeded(keeper_id: int) -> dict[str, Any] | None:
        body = status()
        (view,) = [k for k in body["keepers"] if k["id"] == keeper_id]
        return body if view["state"] == "holding" and view["reseeds"] >= 1 else None

    wait_until(lambda: all(k["state"] == "holding" for k in status()["keepers"]), "every keeper holding")

    # kill -9 the keeper's pid (the one-file bootloader): its Python process must go with it.
    os.kill(keepers[2].pid, signal.SIGKILL)
    keepers[2].wait(timeout=10)
    wait_until(lambda: not listening(ports[2]), "the killed keeper's port to close")
    spike.start("keeper-2.2", "keeper", "--listen", f"127.0.0.1:{ports[2]}", env=svid("keeper-2"))
    wait_until(lambda: listening(ports[2]), "keeper 2 to listen again")
    body = wait_until(lambda: reseeded(2), "keeper 2 re-seeded")
    assert body["phase"] == "ready" and body["redundancy"] == 1, body
    assert re.search(r"keeper 2 .* re-seeded and confirmed", spike.log("nexus")), spike.log("nexus")
    got = spike.run("secret", "get", "app/db", "user", env=pilot)
    assert (got.returncode, got.stdout) == (0, "admin\n"), got.stderr


def test_keeper_takes_its_svid_from_the_workload_api(
    spike_binary: Path, spikes: Callable[[list[str]], Spike], dev_identity: DevIdentity
) -> None:
    """The lazily imported Workload API client (spiffe, gRPC, protobuf) is in the binary and works."""
    from tests.identity.workload_api import TestCa, WorkloadApi

    trust = TrustDomains.single(dev_identity.trust_domain)
    api = WorkloadApi(TestCa.of(dev_identity))
    try:
        api.add("keeper-1", str(trust.id_of(Role.KEEPER, 1)))
        spike = spikes([str(spike_binary)])
        port = free_port()
        env = {"SPIFFE_ENDPOINT_SOCKET": api.address("keeper-1"), "SPIKE_TRUST_ROOT": dev_identity.trust_domain}
        keeper = spike.start("keeper", "keeper", "--listen", f"127.0.0.1:{port}", env=env)
        wait_until(lambda: listening(port) or keeper.poll() is not None, "the keeper to listen")
        assert keeper.poll() is None, spike.log("keeper")
        with ClientSession(client_context(dev_identity.files("nexus")), timeout=5.0) as session:
            connection = session.connect(
                f"https://127.0.0.1:{port}", keeper_check(trust, 1), expected_peer=str(trust.id_of(Role.KEEPER, 1))
            )
            status, _ = connection.post(KEEPER_SHARD_PATH)
        assert status == 404  # empty, and it proved its SPIFFE ID with the SVID the Workload API gave it
    finally:
        api.close()


def test_nexus_on_postgresql_with_the_bundled_libpq(spike_binary: Path, spikes: Callable[[list[str]], Spike]) -> None:
    """Nexus from the binary on the suite's real PostgreSQL, with psycopg's C implementation from the bundle.

    PyInstaller warned about psycopg_binary at build time (build/hooks/hook-psycopg_binary.py says why that
    was harmless).  PSYCOPG_IMPL=binary forbids psycopg's fallback to a libpq of the system (this machine has
    one: PostgreSQL is installed), so Nexus only starts if the bundled one loads; its memory maps say where
    libpq came from.  The secret written through it is in the database, sealed, and a second Nexus with an
    empty data dir reads it back.
    """
    import psycopg

    url = pg_server.server().database("binary")
    spike = spikes([str(spike_binary)])
    made = spike.run("dev-identity", "--dir", str(spike.home / "id"), "--trust-domain", "spike.test")
    assert made.returncode == 0, made.stderr

    def svid(name: str, **extra: str) -> dict[str, str]:
        ident = spike.home / "id"
        files = {"CERT": f"{name}.pem", "KEY": f"{name}-key.pem", "BUNDLE": "bundle.pem"}
        return {
            **{f"SPIKE_SVID_{k}": str(ident / v) for k, v in files.items()},
            "SPIKE_TRUST_ROOT": "spike.test",
            **extra,
        }

    ports = {i: free_port() for i in (1, 2, 3)}
    for i, port in ports.items():
        spike.start(f"keeper-{i}", "keeper", "--listen", f"127.0.0.1:{port}", env=svid(f"keeper-{i}"))
    keepers = ",".join(f"{i}=https://127.0.0.1:{p}" for i, p in ports.items())

    def nexus(name: str) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        args = ["--listen", f"127.0.0.1:{port}", "--keepers", keepers, "--poll-interval", "0.5s"]
        args += ["--data-dir", str(spike.home / f"{name}-data"), "--database-url", url]
        process = spike.start(name, "nexus", *args, env=svid("nexus", PSYCOPG_IMPL="binary"))
        wait_until(lambda: listening(port) or process.poll() is not None, f"{name} to listen")
        assert process.poll() is None, spike.log(name)
        return process, f"https://127.0.0.1:{port}"

    first, first_url = nexus("nexus-1")
    wait_until(lambda: all(listening(port) for port in ports.values()), "keepers to listen")
    libpq = sorted(
        {line.split()[-1] for maps in mapped_files(first.pid) for line in maps.splitlines() if "libpq" in line}
    )
    assert libpq, "Nexus on PostgreSQL has no libpq mapped"
    assert all(re.search(r"/_MEI\w+/psycopg_binary\.libs/libpq-[0-9a-f]+\.so", path) for path in libpq), libpq

    boot = spike.run("bootstrap", "--nexus", first_url, env=svid("bootstrap"))
    assert boot.returncode == 0, boot.stdout + boot.stderr
    put = spike.run(
        "secret", "put", "app/db", "password=s3cret", env=svid("pilot-superuser", SPIKE_NEXUS_API_URL=first_url)
    )
    assert put.returncode == 0, put.stderr
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT sealed FROM secret_version WHERE path = 'app/db'").fetchall()
    assert len(rows) == 1 and b"s3cret" not in bytes(rows[0][0])

    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=TIMEOUT) == 0, spike.log("nexus-1")
    _second, second_url = nexus("nexus-2")
    pilot = svid("pilot-superuser", SPIKE_NEXUS_API_URL=second_url)

    def got_it() -> bool:
        got = spike.run("secret", "get", "app/db", "password", env=pilot)
        return (got.returncode, got.stdout) == (0, "s3cret\n")

    wait_until(got_it, "the second Nexus to read the secret from PostgreSQL")


@dataclass
class Dev:
    process: subprocess.Popen[bytes]
    pilot: dict[str, str]  # the environment spike dev says to export
    ports: list[int]  # Nexus's and the keepers'


def _start_dev(spike: Spike, data_dir: Path, name: str) -> Dev:
    process = spike.start(name, "dev", "--data-dir", str(data_dir), "--poll-interval", "0.5s")

    def ready_or_gone() -> bool:
        return "Ctrl-C stops everything." in spike.log(name) or process.poll() is not None

    wait_until(ready_or_gone, f"{name} to be ready", timeout=2 * TIMEOUT)
    text = spike.log(name)
    assert process.poll() is None, text
    (export,) = [line.strip() for line in text.splitlines() if line.strip().startswith("export SPIKE_NEXUS_API_URL=")]
    pilot = dict(word.split("=", 1) for word in shlex.split(export)[1:])
    (where,) = [line for line in text.splitlines() if line.startswith("spike dev: Nexus https://")]
    ports = [int(port) for port in re.findall(r"127\.0\.0\.1:(\d+)", where)]
    assert len(ports) == 4, where
    return Dev(process, pilot, ports)


def _ctrl_c(spike: Spike, dev: Dev, name: str) -> None:
    """SIGINT to the whole process group, as a terminal's Ctrl-C: every process of it gets one."""
    os.killpg(dev.process.pid, signal.SIGINT)
    assert dev.process.wait(timeout=TIMEOUT) == 0, spike.log(name)
    lines = spike.log(name).splitlines()
    assert lines[-1] == "spike dev: stopping", lines[-5:]
    assert lines.count("spike dev: stopping") == 1
    still = [port for port in dev.ports if listening(port)]
    assert not still, f"ports {still} still listen after spike dev stopped"


@pytest.mark.parametrize("variant", ["binary", "python"])
def test_dev_stops_on_ctrl_c_and_a_second_run_on_its_data_dir_has_the_same_secrets(
    variant: str, request: pytest.FixtureRequest, spikes: Callable[[list[str]], Spike]
) -> None:
    if variant == "binary":
        spike = spikes([str(request.getfixturevalue("spike_binary"))])
    else:
        spike = spikes([sys.executable, "-m", "spike"])
        spike.env["PYTHONPATH"] = str(ROOT)  # the interpreter itself, by absolute path; PATH still empty
    data = spike.home / "data"

    first = _start_dev(spike, data, "dev-1")
    text = spike.log("dev-1")
    assert "bootstrap complete" in text
    assert "recovery shards written to" in text
    shards = sorted((data / "recovery").glob("spike.recovery.*.txt"))
    assert len(shards) == 3
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in shards)
    put = spike.run("secret", "put", "app/db", "password=s3cret", env=first.pilot)
    assert put.returncode == 0, put.stderr
    _ctrl_c(spike, first, "dev-1")

    second = _start_dev(spike, data, "dev-2")
    text = spike.log("dev-2")
    assert "restored from" in text and "re-seeded 3 keepers" in text, text
    got = spike.run("secret", "get", "app/db", "password", env=second.pilot)
    assert (got.returncode, got.stdout) == (0, "s3cret\n"), got.stderr
    _ctrl_c(spike, second, "dev-2")


def test_dev_refreshes_its_recovery_shards_after_a_rotation_so_a_second_run_still_restores(
    spikes: Callable[[list[str]], Spike],
) -> None:
    spike = spikes([sys.executable, "-m", "spike"])
    spike.env["PYTHONPATH"] = str(ROOT)
    data = spike.home / "data"
    first = _start_dev(spike, data, "dev-1")
    put = spike.run("secret", "put", "app/db", "password=s3cret", env=first.pilot)
    assert put.returncode == 0, put.stderr
    rotated = spike.run("operator", "rotate", env=first.pilot)
    assert rotated.returncode == 0 and "root key rotated: epoch 2 is in force" in rotated.stdout, rotated.stderr
    wait_until(
        lambda: "key epoch 2: recovery shards in" in spike.log("dev-1"), "the shards of epoch 2 exported", TIMEOUT
    )
    _ctrl_c(spike, first, "dev-1")

    second = _start_dev(spike, data, "dev-2")
    text = spike.log("dev-2")
    assert "root key epoch 2 restored from" in text, text
    got = spike.run("secret", "get", "app/db", "password", env=second.pilot)
    assert (got.returncode, got.stdout) == (0, "s3cret\n"), got.stderr
    _ctrl_c(spike, second, "dev-2")


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_a_machine_that_cannot_build_fails_in_ci_and_skips_elsewhere(
    ci: str, outcome: type[BaseException], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome):
        cannot_build("no package index")
