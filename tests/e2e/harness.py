"""A small harness for end-to-end tests: real `spike` processes on loopback.

`Cluster` owns one deployment: n keepers and a Nexus, each started as
``python -m spike ...`` with its own SVID, its output captured to a log file
under the test's tmp dir (a new file per incarnation, so a test can read what
one run of a process said).  Processes are killed with SIGKILL, as a crash
would; `close()` kills whatever is still alive and is always called by the
fixture's finalizer.

Nothing here sleeps for a fixed time to let something happen: every wait
polls a condition (Nexus's status as `spike status --format json` reports it,
or a line in a log file) until a timeout, and a timeout fails with what was
last seen.  The test, holding the nexus SVID, can also read a keeper's shard
back (`read_shard`), which the log-hygiene test greps the logs for.

Typical use (see conftest.py for the fixtures)::

    cluster.start()                        # keepers 1-3 and Nexus, 2-of-3, 0.5 s polls
    assert cluster.bootstrap().returncode == 0
    cluster.kill_keeper(2)                 # SIGKILL
    cluster.start_keeper(2)                # same port, empty
    code, status = cluster.wait_status(lambda s: s["redundancy"] == 1, "keeper 2 re-seeded")
    cluster.wait_log(cluster.nexus(), r"keeper 2 .* re-seeded and confirmed")

`Cluster(database_url=..., nexus_count=2)` runs several Nexus instances on one
PostgreSQL database, each on its own port (`nexus_url_of(i)`, `nexus(i)`,
`start_nexus(index=i)`; instance 1 is the `nexus` of single-instance tests),
and `wait_status`, `wait_ready` and `client` take `nexus=i`.

`Cluster(metrics=True)` gives Nexus its plain-HTTP metrics listener: `http_get`
reads /healthz and /readyz, `scrape` and `wait_metrics` read /metrics parsed by
prometheus_client (each scrape is kept in the logs dir, for the hygiene
sweeps).  `nexus_env` holds more settings for every Nexus start.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from cryptography import x509

from spike.app.commands.client import NexusClient, fetch_status, nexus_connection
from spike.app.commands.devca import DevIdentity
from spike.app.commands.status import exit_code as status_exit_code
from spike.app.errors import CommandError
from spike.app.store.sqlite_schema import NexusStore
from spike.protocol.identity import Role, TrustDomains
from spike.protocol.material import Share
from spike.protocol.shamir import combine
from spike.protocol.wire import (
    KEEPER_CONTRIBUTE_PATH,
    KEEPER_SHARD_PATH,
    ShardAnswer,
    ShardContribution,
    ShardRequest,
    decode,
    encode,
)
from spike.transports.blocking import ClientSession
from spike.transports.client import TransportError
from spike.transports.tls import SvidFiles, client_context, keeper_check

SPIKE = [sys.executable, "-m", "spike"]
DEFAULT_TIMEOUT = 15.0
CLI_TIMEOUT = 30.0

# Ports are drawn below the kernel's ephemeral range (32768+ on Linux), so that
# a restart on the same port never collides with the source port of some
# outgoing connection.
_PORT_RANGE = (20000, 32000)


class HarnessError(AssertionError):
    """A process did not start, or a condition did not come true in time."""


_handed_out: set[int] = set()


def pick_port() -> int:
    """A free port never handed out before in this process: a cluster picks all of its ports before
    starting anything, so a port that is merely free could be drawn twice (for six ports out of
    12,000, about one cluster in 800)."""
    for _ in range(200):
        port = random.randrange(*_PORT_RANGE)
        if port in _handed_out:
            continue
        _handed_out.add(port)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise HarnessError("no free port found")


def presented_serial(port: int, client: ssl.SSLContext) -> int:
    """The serial number of the certificate a new TLS connection to 127.0.0.1:port is shown."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, client.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _find_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


_PRCTL = _find_prctl()  # looked up here: nothing may be imported between fork and exec
_PR_SET_PDEATHSIG = 1
_SIGKILL = int(signal.SIGKILL)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGKILL if the test run itself dies without cleaning up."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, _SIGKILL)


def svid_env(files: SvidFiles, trust_domain: str) -> dict[str, str]:
    env = {
        "SPIKE_SVID_CERT": str(files.cert),
        "SPIKE_SVID_KEY": str(files.key),
        "SPIKE_SVID_BUNDLE": str(files.bundle),
        "SPIKE_TRUST_ROOT": trust_domain,
    }
    if files.trust_bundles:
        env["SPIKE_TRUST_BUNDLES"] = ",".join(f"{domain}={path}" for domain, path in files.trust_bundles)
    return env


def base_env() -> dict[str, str]:
    """The test run's environment without any SPIKE_* setting that could leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPIKE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_until(condition: Callable[[], Any], what: str, timeout: float = DEFAULT_TIMEOUT, every: float = 0.05) -> Any:
    """Call `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


@dataclass
class Proc:
    """One incarnation of a long-running spike process."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the process keeps its memory but answers nothing (a hung host, for its peers)."""
        self.popen.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.popen.send_signal(signal.SIGCONT)


@dataclass
class CliResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def __str__(self) -> str:
        command = " ".join(self.args)
        return f"spike {command} -> {self.returncode}\nstdout: {self.stdout}\nstderr: {self.stderr}"


@dataclass
class Cluster:
    identity: DevIdentity
    root: Path
    keepers: int = 3
    threshold: int = 2
    poll_interval: float = 0.5
    log_level: str = "info"
    log_format: str = "text"
    poll_with_cli: bool = False  # wait_status through `spike status --format json` itself (slower)
    metrics: bool = False  # Nexus serves /metrics, /healthz and /readyz on metrics_port (see `scrape`)
    nexus_env: dict[str, str] = field(default_factory=dict)  # settings for every Nexus start
    database_url: str | None = None  # PostgreSQL shared by every Nexus instance; None: SQLite in data_dir
    nexus_count: int = 1  # Nexus instances `start` starts (more than one needs database_url)
    # Pilots in another trust domain (SPIKE_TRUST_ROOT_PILOT): the `pilot-*` SVIDs come from here.
    pilot_identity: DevIdentity | None = None
    bundle: Path | None = None  # every process's SPIKE_SVID_BUNDLE instead of its own CA's file
    trust_bundles: tuple[tuple[str, Path], ...] = ()  # every process's SPIKE_TRUST_BUNDLES
    nexus_ports: dict[int, int] = field(default_factory=dict)
    metrics_port: int = 0
    keeper_ids: list[int] = field(default_factory=list)
    keeper_ports: dict[int, int] = field(default_factory=dict)
    nexus_port: int = 0
    procs: dict[str, Proc] = field(default_factory=dict)
    history: list[Proc] = field(default_factory=list)
    _runs: int = 0

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs = self.root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.data_dir = self.root / "nexus-data"
        self.keeper_ids = list(range(1, self.keepers + 1))
        self.keeper_ports = {i: pick_port() for i in self.keeper_ids}
        self.nexus_port = pick_port()
        self.nexus_ports = {1: self.nexus_port, **{i: pick_port() for i in range(2, self.nexus_count + 1)}}
        if self.metrics:
            self.metrics_port = pick_port()
        own = self.identity.trust_domain
        pilots = self.pilot_identity.trust_domain if self.pilot_identity else own
        self.trust = TrustDomains(nexus=own, keeper=own, bootstrap=own, pilot=pilots)
        self._scrapes = 0

    # ------------------------------------------------------------------ addresses

    @property
    def nexus_url(self) -> str:
        return f"https://127.0.0.1:{self.nexus_port}"

    def nexus_url_of(self, index: int) -> str:
        return f"https://127.0.0.1:{self.nexus_ports[index]}"

    @staticmethod
    def nexus_name(index: int) -> str:
        return "nexus" if index == 1 else f"nexus-{index}"

    def keeper_url(self, keeper_id: int) -> str:
        return f"https://127.0.0.1:{self.keeper_ports[keeper_id]}"

    @property
    def peers(self) -> str:
        return ",".join(f"{i}={self.keeper_url(i)}" for i in self.keeper_ids)

    def keeper_label(self, keeper_id: int) -> str:
        """How Nexus names a keeper in its log: 'keeper 2 (https://127.0.0.1:P)'."""
        return f"keeper {keeper_id} ({self.keeper_url(keeper_id)})"

    # ------------------------------------------------------------------ processes

    def files(self, name: str) -> SvidFiles:
        """The SVID files of `name` (nexus, keeper-2, pilot-superuser, ...) as this cluster configures them."""
        pilot = name.startswith("pilot-") and self.pilot_identity is not None
        files = (self.pilot_identity if pilot and self.pilot_identity else self.identity).files(name)
        if not self.trust_bundles:
            return SvidFiles(files.cert, files.key, self.bundle or files.bundle)
        return SvidFiles(files.cert, files.key, self.bundle or files.bundle, self.trust_bundles)

    def _env(self, files: SvidFiles, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = base_env()
        env.update(svid_env(files, self.identity.trust_domain))
        if self.trust.pilot != self.identity.trust_domain:
            env["SPIKE_TRUST_ROOT_PILOT"] = self.trust.pilot
        env["SPIKE_LOG_LEVEL"] = self.log_level
        env["SPIKE_LOG_FORMAT"] = self.log_format
        env.update(extra or {})
        return env

    def _spawn(self, name: str, args: list[str], env: dict[str, str], cwd: Path | None = None) -> Proc:
        existing = self.procs.get(name)
        if existing is not None and existing.alive():
            raise HarnessError(f"{name} is already running")
        incarnation = sum(p.name == name for p in self.history) + 1
        log = self.logs / f"{name}.{incarnation}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [*SPIKE, *args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if _PRCTL is not None else None,  # noqa: PLW1509
                cwd=cwd,
            )
        proc = Proc(name, popen, log)
        self.procs[name] = proc
        self.history.append(proc)
        return proc

    def _await_listening(self, proc: Proc, timeout: float = DEFAULT_TIMEOUT) -> Proc:
        def listening() -> bool:
            if "listening on" in proc.text():
                return True
            if not proc.alive():
                raise HarnessError(f"{proc.name} exited with code {proc.popen.returncode} at start:\n{proc.text()}")
            return False

        wait_until(listening, f"{proc.name} to listen", timeout)
        return proc

    def spawn_keeper(self, keeper_id: int, files: SvidFiles | None = None) -> Proc:
        """Keeper `keeper_id` on its port, with its own SVID (or `files`: an impostor's)."""
        port = self.keeper_ports[keeper_id]
        return self._spawn(
            f"keeper-{keeper_id}",
            ["keeper", "--listen", f"127.0.0.1:{port}"],
            self._env(files or self.files(f"keeper-{keeper_id}")),
        )

    def spawn_nexus(self, extra_env: dict[str, str] | None = None, index: int = 1) -> Proc:
        env = self._env(
            self.files("nexus"),
            {
                "SPIKE_NEXUS_KEEPER_PEERS": self.peers,
                "SPIKE_NEXUS_SHAMIR_SHARES": str(self.keepers),
                "SPIKE_NEXUS_SHAMIR_THRESHOLD": str(self.threshold),
                **({"SPIKE_NEXUS_METRICS_LISTEN": f"127.0.0.1:{self.metrics_port}"} if self.metrics else {}),
                **self.nexus_env,
                **(extra_env or {}),
            },
        )
        args = [
            "nexus",
            "--listen",
            f"127.0.0.1:{self.nexus_ports[index]}",
            "--poll-interval",
            f"{self.poll_interval:g}s",
            "--data-dir",
            str(self.data_dir if index == 1 else self.root / f"nexus-data-{index}"),
        ]
        if self.database_url:
            args += ["--database-url", self.database_url]
        return self._spawn(self.nexus_name(index), args, env)

    def start_memory_nexus(self, home: Path) -> Proc:
        """Nexus on the memory backend (no keepers), with `home` as its HOME, TMPDIR and working directory."""
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        env = self._env(
            self.files("nexus"),
            {"SPIKE_NEXUS_BACKEND_STORE": "memory", "HOME": str(home), "TMPDIR": str(home / "tmp")},
        )
        proc = self._spawn("nexus", ["nexus", "--listen", f"127.0.0.1:{self.nexus_port}"], env, cwd=home)
        return self._await_listening(proc)

    def start_keeper(self, keeper_id: int, files: SvidFiles | None = None) -> Proc:
        return self._await_listening(self.spawn_keeper(keeper_id, files))

    def start_nexus(self, extra_env: dict[str, str] | None = None, index: int = 1) -> Proc:
        return self._await_listening(self.spawn_nexus(extra_env, index))

    def start(self, keeper_ids: Iterable[int] | None = None, *, nexus: bool = True) -> None:
        """Start keepers (all by default) and Nexus together, then wait until each listens."""
        started = [self.spawn_keeper(i) for i in (self.keeper_ids if keeper_ids is None else keeper_ids)]
        if nexus:
            started += [self.spawn_nexus(index=i) for i in self.nexus_ports]
        for proc in started:
            self._await_listening(proc)

    def kill(self, *names: str) -> None:
        """SIGKILL, as a crash: no shutdown code runs."""
        for name in names:
            self.procs[name].kill()

    def kill_keeper(self, keeper_id: int) -> None:
        self.kill(f"keeper-{keeper_id}")

    def nexus(self, index: int = 1) -> Proc:
        return self.procs[self.nexus_name(index)]

    def keeper(self, keeper_id: int) -> Proc:
        return self.procs[f"keeper-{keeper_id}"]

    def close(self) -> None:
        """Kill everything still running (the fixture's finalizer calls this)."""
        for proc in self.history:
            with contextlib.suppress(Exception):
                proc.kill()

    # ------------------------------------------------------------------ one-shot commands

    def run(
        self,
        *args: str,
        identity: str = "pilot-superuser",
        env: dict[str, str] | None = None,
        stdin: bytes = b"",
    ) -> CliResult:
        """Run a one-shot `spike` command (`stdin` on its standard input); its output is also kept in the logs dir."""
        full_env = self._env(self.files(identity), {"SPIKE_NEXUS_API_URL": self.nexus_url})
        full_env.update(env or {})
        done = subprocess.run(
            [*SPIKE, *args],
            env=full_env,
            input=stdin,
            capture_output=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )
        self._runs += 1
        (self.logs / f"cli.{self._runs}.{args[0]}.log").write_bytes(done.stdout + done.stderr)
        out, err = done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
        return CliResult(list(args), done.returncode, out, err)

    def bootstrap(self, *args: str) -> CliResult:
        return self.run("bootstrap", *args, identity="bootstrap")

    def rotate(self, *args: str, nexus: int = 1) -> CliResult:
        """`spike operator rotate ARGS` as the superuser, against Nexus instance `nexus`."""
        return self.run("operator", "rotate", *args, env={"SPIKE_NEXUS_API_URL": self.nexus_url_of(nexus)})

    def wait_exit(self, proc: Proc, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait until `proc` has exited (a test build's crash point, say); its return code (-9: SIGKILL)."""
        wait_until(lambda: not proc.alive(), f"{proc.name} to exit", timeout)
        return proc.popen.returncode

    def held_epochs(self, keeper_id: int, session: ClientSession | None = None) -> tuple[int, ...]:
        """The epochs of the shards keeper `keeper_id` holds (latest first); () when empty."""
        if session is None:
            with self.as_nexus() as own:
                return self.held_epochs(keeper_id, own)
        connection = session.connect(
            self.keeper_url(keeper_id),
            keeper_check(self.trust, keeper_id),
            expected_peer=str(self.trust.id_of(Role.KEEPER, keeper_id)),
        )
        status, body = connection.post(KEEPER_SHARD_PATH, encode(ShardRequest(epoch=1)))
        if status == 404:
            return ()
        if status != 200:
            raise HarnessError(f"keeper {keeper_id} answered HTTP {status} to a shard read")
        answer = decode(body, ShardAnswer)
        shown = answer.epoch or 0
        return (shown,) if answer.other_epoch is None else tuple(sorted((shown, answer.other_epoch), reverse=True))

    def start_ready(self, keeper_ids: Iterable[int] | None = None) -> None:
        """Start the processes, bootstrap once (epoch 1), and wait for Nexus ready with every keeper holding."""
        self.start(keeper_ids)
        result = self.bootstrap()
        assert result.returncode == 0, result
        self.wait_status(lambda s: s["phase"] == "ready" and s["redundancy"] == 1, "ready, every keeper holding")

    def status(self) -> tuple[int, dict[str, Any]]:
        """`spike status --format json`: (exit code, parsed body)."""
        result = self.run("status", "--format", "json")
        if result.returncode not in (0, 3, 4):
            raise HarnessError(f"spike status failed: {result}")
        return result.returncode, result.json()

    def wait_status(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        what: str,
        timeout: float = DEFAULT_TIMEOUT,
        nexus: int = 1,
    ) -> tuple[int, dict[str, Any]]:
        """Poll Nexus's status until `predicate(body)` holds; (exit code, body) as `spike status` gives.

        By default the polling goes through the same client code and exit-code rule
        as `spike status --format json`, in this process: an interpreter per poll
        costs about half a second of CPU, which on a 2-core machine slows the very
        processes under test.  The tests run the real command wherever an exit code
        is part of a scenario; `poll_with_cli=True` polls with it too.
        """
        last: list[Any] = [None]
        if self.poll_with_cli:

            def check_cli() -> tuple[int, dict[str, Any]] | None:
                found = last[0] = self.status()
                return found if predicate(found[1]) else None

            try:
                by_cli: tuple[int, dict[str, Any]] = wait_until(check_cli, what, timeout, every=0.05)
            except HarnessError as exc:
                raise HarnessError(f"{exc}; last status: {json.dumps(last[0], indent=1)}") from None
            return by_cli
        with ClientSession(client_context(self.files("pilot-superuser")), timeout=5.0) as session:
            connection = nexus_connection(session, self.nexus_url_of(nexus), self.trust)

            def check() -> tuple[int, dict[str, Any]] | None:
                try:
                    body = fetch_status(connection)
                except (TransportError, CommandError) as exc:
                    last[0] = f"no status: {exc}"
                    return None
                found = (status_exit_code(body), msgspec.to_builtins(body))
                last[0] = found
                return found if predicate(found[1]) else None

            try:
                result: tuple[int, dict[str, Any]] = wait_until(check, what, timeout, every=0.05)
            except HarnessError as exc:
                raise HarnessError(f"{exc}; last status: {json.dumps(last[0], indent=1)}") from None
        return result

    def wait_ready(self, epoch: int | None = None, timeout: float = DEFAULT_TIMEOUT, nexus: int = 1) -> dict[str, Any]:
        def ready(body: dict[str, Any]) -> bool:
            return body["phase"] == "ready" and (epoch is None or body["epoch"] == epoch)

        return self.wait_status(ready, f"Nexus {nexus} ready (epoch {epoch})", timeout, nexus)[1]

    def client(self, identity: str = "pilot-superuser", timeout: float = 5.0, nexus: int = 1) -> NexusClient:
        """The operator's client (what `spike secret` uses), in this process; close it after use."""
        return NexusClient(self.nexus_url_of(nexus), self.files(identity), self.trust, timeout=timeout)

    # ------------------------------------------------------------------ the metrics listener

    def http_get(self, path: str) -> tuple[int, str]:
        """GET `path` on Nexus's plain-HTTP metrics listener: (status, body); (0, reason) if nothing answers."""
        if not self.metrics:
            raise HarnessError("this cluster's Nexus has no metrics listener (Cluster(metrics=True))")
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except (urllib.error.URLError, OSError) as exc:
            return 0, str(exc)

    def scrape(self) -> Scrape:
        """/metrics, parsed by prometheus_client's own parser; every scrape is kept in the logs dir."""
        status, text = self.http_get("/metrics")
        if status != 200:
            raise HarnessError(f"/metrics answered {status}: {text}")
        self._scrapes += 1
        (self.logs / f"metrics.{self._scrapes}.txt").write_text(text)
        return Scrape.parse(text)

    def wait_metrics(self, predicate: Callable[[Scrape], bool], what: str, timeout: float = DEFAULT_TIMEOUT) -> Scrape:
        """Scrape until `predicate` holds (a failed scrape counts as not yet)."""
        last: list[Scrape | str] = ["nothing yet"]

        def check() -> Scrape | None:
            status, text = self.http_get("/metrics")
            if status != 200:
                last[0] = f"HTTP {status}: {text}"
                return None
            found = last[0] = Scrape.parse(text)
            return found if predicate(found) else None

        try:
            result: Scrape = wait_until(check, what, timeout, every=0.05)
        except HarnessError as exc:
            raise HarnessError(f"{exc}; last scrape: {last[0]}") from None
        self._scrapes += 1
        (self.logs / f"metrics.{self._scrapes}.txt").write_text(result.text)
        return result

    # ------------------------------------------------------------------ logs

    def wait_log(
        self, proc: Proc, pattern: str, *, count: int = 1, start: int = 0, timeout: float = DEFAULT_TIMEOUT
    ) -> list[str]:
        """Wait until `pattern` (a regex) matches at least `count` lines of `proc`'s log after `start`."""
        regex = re.compile(pattern)

        def found() -> list[str] | None:
            lines = [line for line in proc.text()[start:].splitlines() if regex.search(line)]
            return lines if len(lines) >= count else None

        try:
            lines: list[str] = wait_until(found, f"{pattern!r} in {proc.log.name}", timeout)
        except HarnessError as exc:
            raise HarnessError(f"{exc}; log so far:\n{proc.text()[start:]}") from None
        return lines

    def log_files(self) -> list[Path]:
        return sorted(p for p in self.logs.iterdir() if p.is_file())

    # ------------------------------------------------------------------ acting as Nexus

    @contextlib.contextmanager
    def as_nexus(self) -> Iterator[ClientSession]:
        with ClientSession(client_context(self.files("nexus")), timeout=5.0) as session:
            yield session

    def read_shard(self, keeper_id: int, session: ClientSession | None = None) -> Share | None:
        """POST /v1/store/shard as Nexus would: the keeper's shard, or None if it is empty."""
        if session is None:
            with self.as_nexus() as own:
                return self.read_shard(keeper_id, own)
        connection = session.connect(
            self.keeper_url(keeper_id),
            keeper_check(self.trust, keeper_id),
            expected_peer=str(self.trust.id_of(Role.KEEPER, keeper_id)),
        )
        status, body = connection.post(KEEPER_SHARD_PATH)
        if status == 404:
            return None
        if status != 200:
            raise HarnessError(f"keeper {keeper_id} answered HTTP {status} to a shard read")
        answer = decode(body, ShardAnswer)
        return Share(keeper_id, answer.epoch or 0, answer.shard_bytes())

    def contribute(self, keeper_id: int, contribution: ShardContribution, identity: str = "bootstrap") -> int:
        """POST /v1/store/contribute to a keeper as `identity` (bootstrap may); the HTTP status."""
        with ClientSession(client_context(self.identity.files(identity)), timeout=5.0) as session:
            connection = session.connect(
                self.keeper_url(keeper_id),
                keeper_check(self.trust, keeper_id),
                expected_peer=str(self.trust.id_of(Role.KEEPER, keeper_id)),
            )
            status, _ = connection.post(KEEPER_CONTRIBUTE_PATH, encode(contribution))
            return status

    def read_shards(self) -> dict[int, Share]:
        """Every live keeper's shard (empty keepers left out)."""
        shards: dict[int, Share] = {}
        with self.as_nexus() as session:
            for keeper_id in self.keeper_ids:
                proc = self.procs.get(f"keeper-{keeper_id}")
                if proc is None or not proc.alive():
                    continue
                share = self.read_shard(keeper_id, session)
                if share is not None:
                    shards[keeper_id] = share
        return shards


@dataclass
class Scrape:
    """One /metrics answer: its text and its samples (name, labels, value)."""

    text: str
    samples: list[tuple[str, dict[str, str], float]]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        from prometheus_client.parser import text_string_to_metric_families

        samples = [
            (s.name, dict(s.labels), s.value) for family in text_string_to_metric_families(text) for s in family.samples
        ]
        return cls(text, samples)

    def value(self, name: str, **labels: str) -> float:
        """The one sample named `name` whose labels include `labels`; 0 if only other label values were seen
        (a counter for them not yet counted), an error if nothing of that name is there (a misspelt name)."""
        named = [(ls, v) for n, ls, v in self.samples if n == name]
        if not named:
            raise HarnessError(f"no sample named {name} in the scrape")
        found = [v for ls, v in named if labels.items() <= ls.items()]
        if len(found) > 1:
            raise HarnessError(f"{len(found)} samples of {name} match {labels}")
        return found[0] if found else 0.0

    def __str__(self) -> str:
        return self.text


# ---------------------------------------------------------------------- secret hunting


@dataclass
class SecretsSeen:
    """Shards read back from keepers during the session (and other secrets tests add), and the directories to sweep."""

    shards: dict[str, bytes] = field(default_factory=dict)
    log_dirs: list[Path] = field(default_factory=list)

    def add_secret(self, name: str, secret: bytes) -> None:
        """More bytes no file may hold: a secret value, a root key."""
        self.shards[name] = secret

    def add_dir(self, directory: Path) -> None:
        """One more directory to sweep (a Nexus data dir: database, WAL, audit log)."""
        if directory not in self.log_dirs:
            self.log_dirs.append(directory)

    def add_keys(self, cluster: Cluster, label: str) -> None:
        """Now: every live keeper's shard, and the root key two of them rebuild (checked against the key record)."""
        shards = cluster.read_shards()
        store = NexusStore(cluster.data_dir)
        try:
            record = store.load_key_record()
        finally:
            store.close()
        if record is None or len(shards) < record.threshold:
            raise HarnessError(f"{label}: no key record, or fewer than threshold keepers hold a shard")
        for keeper_id, share in shards.items():
            self.shards[f"{label} keeper {keeper_id} epoch {share.epoch} shard"] = share.secret_bytes()
        key = combine(list(shards.values())[: record.threshold], record.threshold)
        try:
            if not record.matches_key(key):
                raise HarnessError(f"{label}: the keepers' shards do not rebuild the recorded key")
            self.shards[f"{label} root key epoch {record.epoch}"] = key.secret_bytes()
        finally:
            key.wipe()

    def add_cluster(self, cluster: Cluster, label: str) -> None:
        if cluster.logs not in self.log_dirs:
            self.log_dirs.append(cluster.logs)
        with contextlib.suppress(Exception):  # best effort: keepers may be down or empty
            for keeper_id, share in cluster.read_shards().items():
                self.shards[f"{label} keeper {keeper_id} epoch {share.epoch} shard"] = share.secret_bytes()


@contextlib.contextmanager
def swept(cluster: Cluster, seen: SecretsSeen, label: str) -> Iterator[Cluster]:
    """`cluster`, closed at the end once the secrets sweep has taken its shards and log directory."""
    try:
        yield cluster
    finally:
        try:
            seen.add_cluster(cluster, label)
        finally:
            cluster.close()


WINDOW = 8  # bytes: a leak of any 8 consecutive bytes of a secret counts (64 bits never match by chance)


def secret_forms(secret: bytes) -> dict[str, list[bytes]]:
    """What to look for, per form: raw, hex, base64, JSON/Python int lists, one integer.

    Each form is searched whole and in windows of `WINDOW` consecutive bytes, so a
    truncated value (a log line that cuts a body after 40 characters) is found too.
    """
    windows = [secret[i : i + WINDOW] for i in range(len(secret) - WINDOW + 1)]
    b64 = base64.b64encode(secret)
    b64url = base64.urlsafe_b64encode(secret)
    # Aligned 12-character pieces of the encoding stand for 9 bytes each.
    b64_pieces = [b64[i : i + 12] for i in range(0, len(b64) - 12, 4)]
    b64url_pieces = [b64url[i : i + 12] for i in range(0, len(b64url) - 12, 4)]
    return {
        "raw": windows,
        "hex": [w.hex().encode() for w in windows],
        "HEX": [w.hex().upper().encode() for w in windows],
        "base64": [b64.rstrip(b"="), *b64_pieces],
        "base64url": [b64url.rstrip(b"="), *b64url_pieces],
        "json-ints": [",".join(map(str, w)).encode() for w in windows],  # the wire form, [1,2,...]
        "python-ints": [", ".join(map(str, w)).encode() for w in windows],  # repr of a list or bytes list
        "integer": [str(int.from_bytes(secret, "big")).encode()],
    }


def find_secrets(files: Iterable[Path], secrets: dict[str, bytes]) -> list[str]:
    """'file: secret name as form' for every occurrence; empty when the files are clean."""
    patterns = [
        (f"{name} as {form}", needles)
        for name, secret in secrets.items()
        for form, needles in secret_forms(secret).items()
    ]
    hits: list[str] = []
    for path in files:
        data = path.read_bytes()
        hits.extend(f"{path}: {what}" for what, needles in patterns if any(n in data for n in needles))
    return hits


#: What `spike dev` prints once its deployment is ready.
DEV_READY = "Ctrl-C stops everything."


def dev_until_ready(data_dir: Path, *more: str) -> list[str]:
    """Run `spike dev --data-dir` (and `more` arguments) until it says it is ready, stop it with Ctrl-C; the lines
    it printed."""
    process = subprocess.Popen(
        [*SPIKE, "dev", "--data-dir", str(data_dir), *more],
        env=base_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its keepers and Nexus too: killed together if anything goes wrong
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if line.strip() == DEV_READY:
                break
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0, lines
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert DEV_READY in lines, lines
    return lines
