"""`spike dev`: a whole local deployment from one command.

Mints a development trust domain, starts three keepers and a Nexus (2-of-3)
as child processes on loopback, bootstraps them, prints what a user needs to
talk to it, and stops everything on Ctrl-C.  The data dir is a temporary
directory unless `--data-dir` is given.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from spike.protocol.identity import TrustDomains
from spike.transports.tls import SvidFiles

from . import bootstrap
from .config import BootstrapConfig, Common
from .devca import DevIdentity, mint_dev_identity
from .errors import CommandError
from .storage import NexusStore

Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class DevOptions:
    data_dir: Path | None
    keepers: int
    threshold: int
    trust_domain: str
    poll_interval: str
    log_level: str


def spike_command() -> list[str]:
    """How to start this same spike: the frozen binary itself, or this interpreter."""
    if getattr(sys, "frozen", False):
        return [sys.executable]
    return [sys.executable, "-m", "spike"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def svid_env(files: SvidFiles, trust_domain: str) -> dict[str, str]:
    return {
        "SPIKE_SVID_CERT": str(files.cert),
        "SPIKE_SVID_KEY": str(files.key),
        "SPIKE_SVID_BUNDLE": str(files.bundle),
        "SPIKE_TRUST_ROOT": trust_domain,
    }


def _wait_for_port(port: int, process: subprocess.Popen[bytes], name: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CommandError(f"{name} exited with code {process.returncode} at start; see its log")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise CommandError(f"{name} did not start listening on port {port}")


class Deployment:
    def __init__(self, options: DevOptions, say: Say) -> None:
        self.options = options
        self.say = say
        self.temporary = options.data_dir is None
        self.root = Path(tempfile.mkdtemp(prefix="spike-dev-")) if options.data_dir is None else options.data_dir
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.logs = self.root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        ids = range(1, options.keepers + 1)
        self.identity: DevIdentity = mint_dev_identity(self.root / "identity", options.trust_domain, ids)
        self.keeper_ports = {i: free_port() for i in ids}
        self.nexus_port = free_port()

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [*spike_command(), *args],
            env={**os.environ, **env, "SPIKE_LOG_LEVEL": self.options.log_level},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us; we stop the children in order
        )
        log.close()
        self.processes[name] = process
        return process

    def start(self) -> None:
        for keeper_id in self.keeper_ports:
            self._start_keeper(keeper_id)
        self._start_nexus()

    def restart(self, name: str) -> None:
        if name == "nexus":
            self._start_nexus()
        else:
            self._start_keeper(int(name.removeprefix("keeper-")))

    def _start_keeper(self, keeper_id: int) -> None:
        port = self.keeper_ports[keeper_id]
        env = svid_env(self.identity.keeper(keeper_id), self.options.trust_domain)
        process = self._start(f"keeper-{keeper_id}", ["keeper", "--listen", f"127.0.0.1:{port}"], env)
        _wait_for_port(port, process, f"keeper {keeper_id}")

    def _start_nexus(self) -> None:
        domain = self.options.trust_domain
        peers = ",".join(f"{i}=https://127.0.0.1:{p}" for i, p in self.keeper_ports.items())
        env = {
            **svid_env(self.identity.files("nexus"), domain),
            "SPIKE_NEXUS_KEEPER_PEERS": peers,
            "SPIKE_NEXUS_SHAMIR_SHARES": str(self.options.keepers),
            "SPIKE_NEXUS_SHAMIR_THRESHOLD": str(self.options.threshold),
            "SPIKE_NEXUS_DATA_DIR": str(self.root / "nexus"),
            "SPIKE_NEXUS_KEEPER_POLL_INTERVAL": self.options.poll_interval,
        }
        process = self._start("nexus", ["nexus", "--listen", f"127.0.0.1:{self.nexus_port}"], env)
        _wait_for_port(self.nexus_port, process, "Nexus")

    @property
    def nexus_url(self) -> str:
        return f"https://127.0.0.1:{self.nexus_port}"

    def initialised(self) -> bool:
        store = NexusStore(self.root / "nexus")
        try:
            return store.load_key_record() is not None
        finally:
            store.close()

    def bootstrap(self) -> None:
        files = self.identity.files("bootstrap")
        config = BootstrapConfig(
            Common(TrustDomains.single(self.options.trust_domain), files, "info", "text"),
            self.nexus_url,
            None,
            force=False,
            timeout=60.0,
        )
        bootstrap.run(config, say=lambda line: self.say(f"  {line}"))

    def stop(self) -> None:
        for name in sorted(self.processes, key=lambda n: n != "nexus"):  # Nexus first
            process = self.processes[name]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.temporary:
            shutil.rmtree(self.root, ignore_errors=True)


def run(options: DevOptions, say: Say = print) -> int:
    if not 1 <= options.threshold <= options.keepers <= 255:
        raise CommandError("need 1 <= threshold <= keepers <= 255", exit_code=2)
    deployment = Deployment(options, say)

    def stop_on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_signal)
    try:
        deployment.start()
        pilot = deployment.identity.files("pilot-superuser")
        say(f"spike dev: data dir {deployment.root}" + (" (temporary)" if deployment.temporary else ""))
        if deployment.initialised():
            say(
                "  Nexus found an existing key record: it rebuilds the key once enough keepers hold "
                "their shards. These keepers start empty, so restore the key from your recovery "
                "shards (`spike operator restore`) or start over with a new --data-dir."
            )
        else:
            deployment.bootstrap()
        say(
            f"  Nexus {deployment.nexus_url}, keepers "
            + ", ".join(f"{i}=https://127.0.0.1:{p}" for i, p in deployment.keeper_ports.items())
        )
        say(f"  logs in {deployment.logs}")
        say("Talk to it from another shell:")
        env = {"SPIKE_NEXUS_API_URL": deployment.nexus_url, **svid_env(pilot, options.trust_domain)}
        say("  export " + " ".join(f"{k}={v}" for k, v in env.items()))
        say("  spike status")
        say("Press Ctrl-C to stop.")
        while True:
            for name, process in list(deployment.processes.items()):
                if process.poll() is not None:
                    # Restarting is the point of the design: an empty keeper is
                    # re-seeded by Nexus, a restarted Nexus recovers from keepers.
                    say(f"spike dev: {name} exited with code {process.returncode}; starting it again")
                    deployment.restart(name)
            time.sleep(0.5)
    except KeyboardInterrupt:
        say("spike dev: stopping")
        return 0
    finally:
        deployment.stop()
