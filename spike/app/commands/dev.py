"""`spike dev`: a whole local deployment from one command.

Mints a development trust domain, starts three keepers and a Nexus (2-of-3)
as child processes on loopback, bootstraps them, prints what a user needs to
talk to it, and stops everything on Ctrl-C.  The data dir is a temporary
directory unless `--data-dir` is given.

With `--data-dir`, the first run also exports the recovery shards into
`<data-dir>/recovery/` (0600 files: a development convenience, never a way to
run a real deployment), so that a later `spike dev --data-dir` on the same
directory, whose keepers start empty, restores the same root key from them:
Nexus re-seeds the new keepers and the same secrets come back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from spike.app.api.messages import STATUS_PATH, StatusBody
from spike.app.commands import bootstrap, operator
from spike.app.commands.client import NexusClient, NexusError
from spike.app.commands.devca import DevIdentity, mint_dev_identity
from spike.app.config import THRESHOLD_ONE, BootstrapConfig, Common
from spike.app.errors import CommandError
from spike.app.store.sqlite_schema import NexusStore
from spike.protocol.identity import KeeperIdentity, TrustDomains
from spike.transports.tls import SvidFiles

Say = Callable[[str], None]

RECOVERY_DIR = "recovery"
SHARD_FILES = "spike.recovery.*.txt"


def say_now(line: str) -> None:
    """Print and flush: stdout may be a pipe, and the process may be stopped right after."""
    print(line, flush=True)


@dataclass(frozen=True, slots=True)
class DevOptions:
    data_dir: Path | None
    keepers: int
    threshold: int
    trust_domain: str
    poll_interval: str
    log_level: str
    allow_threshold_one: bool = False
    # SPIKE's one keeper ID for every keeper (docs/spike-keepers.md): the keepers share keeper.pem, and
    # Nexus and bootstrap run with --keeper-identity spike.
    keeper_identity: KeeperIdentity = KeeperIdentity.PER_ID


def spike_command() -> list[str]:
    """How to start this same spike: the frozen binary itself, or this interpreter."""
    if getattr(sys, "frozen", False):
        return [sys.executable]
    return [sys.executable, "-m", "spike"]


def spike_hint() -> str:
    """How the user runs this spike from a shell: `spike` when that is on PATH, else its full path."""
    if getattr(sys, "frozen", False):
        executable = Path(sys.executable)
    elif Path(sys.argv[0]).name == "spike":
        executable = Path(sys.argv[0])
    else:
        return f"{shlex.quote(sys.executable)} -m spike"
    found = shutil.which("spike")
    if found is not None and Path(found).resolve() == executable.resolve():
        return "spike"
    return shlex.quote(str(executable.resolve()))


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


def _exports(env: dict[str, str]) -> str:
    return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())


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


@contextlib.contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """One `spike dev` per data dir: a second Nexus on the same SQLite file would be a mess."""
    with (root / "dev.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CommandError(f"another `spike dev` is running on {root}", exit_code=2) from None
        yield


class Deployment:
    def __init__(self, options: DevOptions, say: Say) -> None:
        self.options = options
        self.say = say
        self.temporary = options.data_dir is None
        self.root = Path(tempfile.mkdtemp(prefix="spike-dev-")) if options.data_dir is None else options.data_dir
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.logs = self.root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.recovery = self.root / RECOVERY_DIR
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        spike_keeper = options.keeper_identity is KeeperIdentity.SPIKE
        self.trust = dataclasses.replace(
            TrustDomains.single(options.trust_domain), keeper_identity=options.keeper_identity
        )
        ids = range(1, options.keepers + 1)
        try:
            self.identity: DevIdentity = mint_dev_identity(
                self.root / "identity", options.trust_domain, () if spike_keeper else ids, spike_keeper=spike_keeper
            )
        except ValueError as exc:  # the directory holds a CA for another trust domain
            raise CommandError(f"{exc}; use that --trust-domain or another --data-dir", exit_code=2) from None
        self.keeper_ports = {i: free_port() for i in ids}
        self.nexus_port = free_port()

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [*spike_command(), *args],
            env={**os.environ, **env, "SPIKE_LOG_LEVEL": self.options.log_level},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us only; we stop the children in order
        )
        log.close()
        self.processes[name] = process
        return process

    def start(self) -> None:
        # The keepers start side by side (each is a Python start-up of a few hundred ms), and
        # Nexus once they listen: its first round of polls is immediate, and a keeper not yet
        # listening then would wait for its next poll.
        started = {keeper_id: self._start_keeper(keeper_id, wait=False) for keeper_id in self.keeper_ports}
        for keeper_id, process in started.items():
            _wait_for_port(self.keeper_ports[keeper_id], process, f"keeper {keeper_id}")
        self._start_nexus()

    def restart(self, name: str) -> None:
        if name == "nexus":
            self._start_nexus()
        else:
            self._start_keeper(int(name.removeprefix("keeper-")))

    def _start_keeper(self, keeper_id: int, *, wait: bool = True) -> subprocess.Popen[bytes]:
        port = self.keeper_ports[keeper_id]
        files = (
            self.identity.spike_keeper()
            if self.options.keeper_identity is KeeperIdentity.SPIKE
            else self.identity.keeper(keeper_id)
        )
        env = svid_env(files, self.options.trust_domain)
        process = self._start(f"keeper-{keeper_id}", ["keeper", "--listen", f"127.0.0.1:{port}"], env)
        if wait:
            _wait_for_port(port, process, f"keeper {keeper_id}")
        return process

    def _start_nexus(self) -> None:
        domain = self.options.trust_domain
        env = {
            **svid_env(self.identity.files("nexus"), domain),
            "SPIKE_NEXUS_KEEPER_PEERS": self.peers,
            "SPIKE_NEXUS_SHAMIR_SHARES": str(self.options.keepers),
            "SPIKE_NEXUS_SHAMIR_THRESHOLD": str(self.options.threshold),
            "SPIKE_ALLOW_THRESHOLD_ONE": "true" if self.options.allow_threshold_one else "false",
            "SPIKE_NEXUS_DATA_DIR": str(self.root / "nexus"),
            "SPIKE_NEXUS_KEEPER_POLL_INTERVAL": self.options.poll_interval,
            "SPIKE_NEXUS_KEEPER_IDENTITY": self.options.keeper_identity.value,
        }
        process = self._start("nexus", ["nexus", "--listen", f"127.0.0.1:{self.nexus_port}"], env)
        _wait_for_port(self.nexus_port, process, "Nexus")

    @property
    def nexus_url(self) -> str:
        return f"https://127.0.0.1:{self.nexus_port}"

    @property
    def peers(self) -> str:
        return ",".join(f"{i}=https://127.0.0.1:{p}" for i, p in self.keeper_ports.items())

    def initialised(self) -> bool:
        """Whether the data dir holds a key record (an earlier run bootstrapped it)."""
        if not (self.root / "nexus").exists():
            return False
        store = NexusStore(self.root / "nexus")
        try:
            return store.load_key_record() is not None
        finally:
            store.close()

    def bootstrap(self) -> None:
        files = self.identity.files("bootstrap")
        config = BootstrapConfig(
            Common(self.trust, files, "info", "text"),
            self.nexus_url,
            None,
            force=False,
            timeout=60.0,
            allow_threshold_one=self.options.allow_threshold_one,
        )
        bootstrap.run(config, say=lambda line: self.say(f"  {line}"))

    def export_recovery_shards(self) -> None:
        """After the first bootstrap of a kept data dir: the shards, so that a later run can restore."""
        with NexusClient(self.nexus_url, self.identity.files("pilot-recover"), self.trust) as client:
            operator.recover(client, self.recovery, lambda line: None)
        self.say(
            f"  recovery shards written to {self.recovery} (0600) so that `spike dev --data-dir` on this "
            "directory brings the same secrets back: a development convenience, never keep shards next "
            "to the data they unlock"
        )

    def follow_rotations(self) -> None:
        """A rotation made the exported shards useless: export the new epoch's, so a later run can restore."""
        try:
            with NexusClient(self.nexus_url, self.identity.files("pilot-superuser"), self.trust, timeout=5.0) as client:
                status = client.call(STATUS_PATH, b"{}", StatusBody)
        except (CommandError, OSError):
            return  # Nexus is restarting: next time
        recovery = status.recovery
        if status.phase != "ready" or status.rotation is not None or recovery is None or recovery.epochs_behind == 0:
            return
        try:
            with NexusClient(self.nexus_url, self.identity.files("pilot-recover"), self.trust) as client:
                operator.recover(client, self.recovery, lambda line: None)
        except (CommandError, OSError) as exc:
            self.say(f"spike dev: could not refresh the recovery shards after a key rotation: {exc}")
            return
        self.say(f"spike dev: key epoch {status.epoch}: recovery shards in {self.recovery} refreshed after a rotation")

    def restore_from_recovery_shards(self) -> bool:
        """A later run: the keepers are new and empty, so give Nexus the shards the first run exported."""
        files = sorted(self.recovery.glob(SHARD_FILES))
        if not files:
            return False
        self.say(f"  restoring the root key from the recovery shards in {self.recovery}")
        with NexusClient(self.nexus_url, self.identity.files("pilot-restore"), self.trust, timeout=5.0) as client:
            try:
                for path in files:
                    if client.call(STATUS_PATH, b"{}", StatusBody).phase == "ready":
                        break
                    operator.restore(client, path.read_text(), lambda line: None)
                status = _wait_until_seeded(client)
            except (CommandError, NexusError, OSError) as exc:
                self.say(f"  could not restore the root key from {self.recovery}: {exc}")
                return False
        self.say(
            f"  root key epoch {status.epoch} restored from {self.recovery}; Nexus re-seeded "
            f"{sum(k.state == 'holding' for k in status.keepers)} keepers"
        )
        return True

    def restore_instructions(self) -> list[str]:
        restore = self.identity.files("pilot-restore")
        env = {"SPIKE_NEXUS_API_URL": self.nexus_url, **svid_env(restore, self.options.trust_domain)}
        return [
            "  Nexus holds the key record of an earlier run, and these keepers start empty: it waits for "
            f"{self.options.threshold} recovery shards. Give it each one (`spike operator recover` wrote them):",
            f"    {_exports(env)}",
            f"    {spike_hint()} operator restore --file SHARD_FILE",
            "  or start over with another --data-dir.",
        ]

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


def _wait_until_seeded(client: NexusClient, timeout: float = 30.0) -> StatusBody:
    deadline = time.monotonic() + timeout
    while True:
        status = client.call(STATUS_PATH, b"{}", StatusBody)
        if status.phase == "ready" and all(k.state == "holding" for k in status.keepers):
            return status
        if time.monotonic() > deadline:
            raise CommandError(f"Nexus did not re-seed every keeper in {timeout:g}s (phase {status.phase})")
        time.sleep(0.1)


def _stop_once() -> None:
    """Ctrl-C or SIGTERM: raise KeyboardInterrupt once, then let the shutdown run undisturbed.

    A terminal sends SIGINT to the whole foreground process group, and the one-file
    executable's bootloader forwards the one it gets too: a second signal must not cut
    the shutdown (and the children's SIGTERM) short.
    """
    stopping = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def run(options: DevOptions, say: Say = say_now) -> int:
    if not 1 <= options.threshold <= options.keepers <= 255:
        raise CommandError("need 1 <= threshold <= keepers <= 255", exit_code=2)
    if options.threshold == 1 and not options.allow_threshold_one:
        raise CommandError(THRESHOLD_ONE, exit_code=2)
    _stop_once()
    deployment: Deployment | None = None
    lock: contextlib.ExitStack = contextlib.ExitStack()
    try:
        deployment = Deployment(options, say)
        lock.enter_context(_exclusive(deployment.root))
        say(
            f"spike dev: data dir {deployment.root}"
            + (" (temporary)" if deployment.temporary else "")
            + f", logs in {deployment.logs}"
        )
        earlier = deployment.initialised()
        say(f"spike dev: starting {options.keepers} keepers and Nexus")
        deployment.start()
        if not earlier:
            deployment.bootstrap()
            if not deployment.temporary:
                deployment.export_recovery_shards()
        elif not deployment.restore_from_recovery_shards():
            for line in deployment.restore_instructions():
                say(line)
        say(
            f"spike dev: Nexus {deployment.nexus_url}, keepers {deployment.peers} "
            f"({options.threshold}-of-{options.keepers}). In another shell:"
        )
        pilot = deployment.identity.files("pilot-superuser")
        say("  " + _exports({"SPIKE_NEXUS_API_URL": deployment.nexus_url, **svid_env(pilot, options.trust_domain)}))
        spike = spike_hint()
        say(f"  {spike} secret put app/db password=s3cret && {spike} secret get app/db password")
        say("Ctrl-C stops everything.")
        ticks = 0
        while True:
            for name, process in list(deployment.processes.items()):
                if process.poll() is not None:
                    # Restarting is the point of the design: an empty keeper is
                    # re-seeded by Nexus, a restarted Nexus recovers from keepers.
                    say(f"spike dev: {name} exited with code {process.returncode}; starting it again")
                    deployment.restart(name)
            ticks += 1
            if not deployment.temporary and ticks % 10 == 0:
                deployment.follow_rotations()
            time.sleep(0.5)
    except KeyboardInterrupt:
        say("spike dev: stopping")
        return 0
    finally:
        if deployment is not None:
            deployment.stop()
        lock.close()
