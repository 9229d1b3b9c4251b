"""A real PostgreSQL server for the tests: a throwaway cluster on loopback, no mocks.

`server()` starts one per test run the first time a test asks (initdb into a
temporary directory, TCP on 127.0.0.1 only, no Unix socket, password
authentication), and it is stopped and removed at exit.  Each test takes a
fresh database with `server().database()`.  Tests can stop, start and restart
the server to see what Nexus does without it.

PostgreSQL refuses to run as root: as root, the cluster belongs to the
`postgres` user (Debian's package creates it) and every server command runs
through `runuser`.  Without PostgreSQL's binaries (`apt-get install
postgresql`; .ci/run installs them) the tests that need it are skipped, and
say why.

The cluster runs with fsync off: the tests kill and restart processes, never
the machine, so the operating system keeps every write that PostgreSQL made.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

SERVER_USER = "postgres"


def find_bindir() -> Path | None:
    """The newest PostgreSQL's bin directory (Debian: /usr/lib/postgresql/N/bin), or None."""
    override = os.environ.get("SPIKE_TEST_PG_BINDIR")
    if override:
        return Path(override)
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0
    )
    for bindir in reversed(candidates):
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PgServer:
    def __init__(self, bindir: Path, *, durable: bool = False) -> None:
        """`durable`: fsync on, as a real deployment (the benchmark); off for the tests."""
        self.bindir = bindir
        self.durable = durable
        self.root = Path(tempfile.mkdtemp(prefix="spike-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self.password = secrets.token_urlsafe(16)
        self.user = "spike"
        self._as_user: list[str] = []
        self._databases = 0
        self._lock = threading.Lock()
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise RuntimeError(f"running as root and there is no {SERVER_USER!r} user to run PostgreSQL") from None
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._as_user = ["runuser", "-u", SERVER_USER, "--"]
        self._init()
        self.start()

    def _run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self._as_user, *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=self.root
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done

    def _init(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self._as_user:
            owner = pwd.getpwnam(SERVER_USER)
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        pwfile.chmod(0o600)
        self._run(
            str(self.bindir / "initdb"),
            "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}", "--auth=scram-sha-256",
            "--no-locale", "-E", "UTF8", "--no-sync",
        )  # fmt: skip
        pwfile.unlink()
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = ''\n"
                "max_connections = 200\nshared_buffers = 64MB\nlog_min_messages = warning\n"
                + ("" if self.durable else "fsync = off\nfull_page_writes = off\n")
            )

    @property
    def running(self) -> bool:
        return self._run(str(self.bindir / "pg_ctl"), "status", "-D", str(self.data), check=False).returncode == 0

    def start(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log))

    def stop(self, mode: str = "fast") -> None:
        """`fast` closes every session (rolling back what is under way); `immediate` is a crash."""
        self._run(str(self.bindir / "pg_ctl"), "stop", "-w", "-m", mode, "-D", str(self.data))

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def url(self, database: str = "postgres", *, password: bool = True) -> str:
        secret = f":{self.password}" if password else ""
        return f"postgresql://{self.user}{secret}@127.0.0.1:{self.port}/{database}"

    def database(self, prefix: str = "t") -> str:
        """A new empty namespace (a schema, first on the search path of the URL returned)."""
        import psycopg

        with self._lock:
            self._databases += 1
            name = f"{prefix}_{os.getpid()}_{self._databases}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')  # type: ignore[arg-type]
        return f"{self.url()}?options=-csearch_path%3D{name}"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.running:
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


class _Shared:
    server: PgServer | None = None
    failure: str | None = None


def server() -> PgServer:
    """The test run's PostgreSQL server (started on first use); skips the test if PostgreSQL is not installed."""
    import pytest  # here, not at the top: bench/postgres_rows.py uses this module without pytest

    if _Shared.server is not None:
        if not _Shared.server.running:  # a test stopped it and failed before starting it again
            _Shared.server.start()
        return _Shared.server
    if _Shared.failure is not None:
        pytest.fail(_Shared.failure)
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)")
    try:
        _Shared.server = PgServer(bindir)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        _Shared.failure = f"cannot start a test PostgreSQL from {bindir}: {exc}"
        pytest.fail(_Shared.failure)
    atexit.register(_Shared.server.close)
    return _Shared.server


def wait_for(condition: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not callable(condition) or not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
