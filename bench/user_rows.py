"""The suite's `user` group: what a user waits for (issue 20 section 3), each against OpenBao in the same rounds.

* ``spike dev --data-dir DIR`` from starting the process to its line ``Ctrl-C stops
  everything.`` (three keepers and Nexus started, the key bootstrapped, every keeper
  holding its shard), against ``bao server -dev -dev-tls`` from starting the process
  to its line ``OpenBao server started!`` (unsealed, ``secret/`` mounted, its API
  answering).  Each round takes a new data dir; a second run on the same dir (empty
  keepers, the key restored from the recovery shards the first run wrote) is timed
  too, without a peer: OpenBao's dev mode keeps nothing.
* ``spike secret get bench/s1`` as a process against the suite's Nexus (start-up,
  mTLS handshake, one read, exit), against ``bao kv get -mount=secret bench/s1``
  against the suite's OpenBao: wall time from spawning to exit, and the process's
  CPU time (user + sys, steadier than wall time on a busy machine).
* ``spike --version`` against ``bao version``, the same way.

spike runs from the venv's entry point (``bench/.venv/bin/spike``, as a user who
ran ``pip install`` has it) and, with ``--binary PATH``, as the single binary too.
Without a binary, the binary rows are in the table as not measured, with the reason.
Rounds alternate spike and OpenBao, and which of them goes first alternates by round;
every command runs once unmeasured first (a cold page cache is not what is measured).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from systems import pick_port

if TYPE_CHECKING:
    from suite import Row, Suite

SPIKE_DEV_READY = "Ctrl-C stops everything."
BAO_DEV_READY = "OpenBao server started!"
REPO = Path(__file__).resolve().parent.parent
NO_BINARY = "not measured: no --binary PATH (build/build.sh, then bench/run --binary dist/spike)"


@dataclass(frozen=True)
class RowSpec:
    key: str
    label: str
    unit: str
    peer: str  # "" when there is none
    binary: bool = False  # measured only with --binary


# The group's rows, in the table's order; `bench/run --list` prints them and docs/benchmarks.md names each.
ROWS = [
    RowSpec("dev_ready", "spike dev until ready, first run (bootstrap)", "s", "OpenBao server -dev -dev-tls"),
    RowSpec(
        "dev_ready_binary",
        "spike dev until ready, first run, single binary",
        "s",
        "OpenBao server -dev -dev-tls",
        binary=True,
    ),
    RowSpec("dev_ready_again", "spike dev until ready, second run on its data dir (restore)", "s", ""),
    RowSpec("cli_get", "spike secret get as a process (venv entry point)", "s", "OpenBao kv get"),
    RowSpec("cli_get_binary", "spike secret get as a process, single binary", "s", "OpenBao kv get", binary=True),
    RowSpec("cli_get_cpu", "spike secret get: the process's CPU time (venv entry point)", "ms", "OpenBao kv get"),
    RowSpec(
        "cli_get_binary_cpu",
        "spike secret get: the process's CPU time, single binary",
        "ms",
        "OpenBao kv get",
        binary=True,
    ),
    RowSpec("version", "spike --version as a process (venv entry point)", "s", "OpenBao version"),
    RowSpec("version_binary", "spike --version as a process, single binary", "s", "OpenBao version", binary=True),
]


def _clean_env(*, binary: bool = False) -> dict[str, str]:
    """The suite's environment without SPIKE_/BAO_/VAULT_ settings; the binary gets no PYTHONPATH either."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPIKE_", "BAO_", "VAULT_"))}
    if binary:
        env.pop("PYTHONPATH", None)
        env.pop("PYTHONSAFEPATH", None)
    return env


def timed_process(argv: list[str], env: dict[str, str], timeout: float = 60.0) -> tuple[float, float]:
    """Run a command to its exit: (wall seconds from spawn to exit, its CPU seconds).  Raises if it fails.

    The CPU time is the change in this process's RUSAGE_CHILDREN: the suite runs nothing else meanwhile.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    done = subprocess.run(argv, env=env, capture_output=True, timeout=timeout, check=False)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0 or not done.stdout.strip():
        tail = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()[-1:]
        raise RuntimeError(f"{' '.join(argv[-3:])} exited with {done.returncode}: {tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def until_line(argv: list[str], env: dict[str, str], ready: str, stop: signal.Signals, timeout: float = 120.0) -> float:
    """Seconds from spawning `argv` to a line of its output containing `ready`; then stop it and wait for its exit.

    spike dev is stopped with SIGINT (Ctrl-C: it stops its keepers and Nexus), OpenBao with SIGTERM.
    """
    started = time.monotonic()
    process = subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    watchdog = threading.Timer(timeout, process.kill)  # a start that hangs must not hang the suite
    watchdog.start()
    tail: list[str] = []
    try:
        for line in process.stdout:
            if ready in line:
                return time.monotonic() - started
            tail = [*tail[-4:], line.rstrip()]
        raise RuntimeError(f"{Path(argv[0]).name} {argv[1]} exited ({process.wait()}) before it was ready: {tail}")
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.send_signal(stop)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def spike_dev_ready(spike: list[str], data_dir: Path, env: dict[str, str]) -> float:
    return until_line([*spike, "dev", "--data-dir", str(data_dir)], env, SPIKE_DEV_READY, signal.SIGINT)


def bao_dev_ready(bao: str, root: Path) -> float:
    """`bao server -dev -dev-tls` on a port of its own (in memory, unsealed, a CA and certificate made at start)."""
    certs = root / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    env = {**_clean_env(), "HOME": str(root)}  # the CLI's token helper would write ~/.vault-token
    argv = [bao, "server", "-dev", "-dev-tls", f"-dev-tls-cert-dir={certs}",
            f"-dev-listen-address=127.0.0.1:{pick_port()}", "-dev-no-store-token"]  # fmt: skip
    return until_line(argv, env, BAO_DEV_READY, signal.SIGTERM)


@dataclass(frozen=True)
class Staleness:
    version: str  # the binary's --version line
    problem: str  # "" when it was built from the spike/ the suite measures at `commit`


def binary_staleness(binary: str, commit: str) -> Staleness:
    """Whether `binary` runs the code of `commit`: built from it, or from a commit whose spike/ is the same.

    A binary left in dist/ from an older commit would otherwise be measured as this one (the suite measures
    the work tree's spike/ for everything else).
    """
    done = subprocess.run(
        [binary, "--version"], env=_clean_env(binary=True), capture_output=True, text=True, check=False
    )
    version = done.stdout.strip()
    built = re.search(r"\(commit ([0-9a-f]{7,40})\)", version)
    if done.returncode != 0 or built is None:
        return Staleness(version, f"{binary} --version said {version!r} (exit {done.returncode}): no commit in it")
    if not commit or commit.startswith(built.group(1)):
        return Staleness(version, "")
    same = subprocess.run(
        ["git", "-C", str(REPO), "diff", "--quiet", built.group(1), commit, "--", "spike", "pyproject.toml", "build"],
        capture_output=True,
        check=False,
    )
    if same.returncode == 0:
        return Staleness(f"{version}; spike/ unchanged since", "")
    return Staleness(version, f"{binary} was built from {built.group(1)}, whose spike/ differs from {commit[:12]}'s")


def run(suite: Suite, say: Callable[[str], None]) -> None:
    """Measure the group's rows into the suite's results (the suite's spike and OpenBao must be running)."""
    assert suite.spike is not None and suite.bao is not None
    r, s = suite.results, suite.s
    spike_deploy, bao_deploy = suite.spike, suite.bao
    rows = {spec.key: r.row(spec.key, spec.label, spec.unit, "lower", peer=spec.peer or "OpenBao") for spec in ROWS}
    entry = Path(sys.executable).parent / "spike"  # the venv's console script, as `pip install` makes it
    binary = s.nexus_binary
    if binary is None:
        for spec in ROWS:
            if spec.binary:
                rows[spec.key].skipped = s.binary_problem or NO_BINARY

    pilot = spike_deploy._env("pilot-superuser", {"SPIKE_NEXUS_API_URL": spike_deploy.nexus_url})
    spike_env = {k: v for k, v in pilot.items() if k.startswith("SPIKE_")}  # the SVID, the trust root, the URL
    cli_home = suite.workdir / "cli-home"
    cli_home.mkdir(exist_ok=True)
    bao_env = {**bao_deploy.env(), "HOME": str(cli_home)}
    spike_get_env = {**_clean_env(), **spike_env}
    binary_get_env = {**_clean_env(binary=True), **spike_env}

    # (row key, CPU row key or "", "spike" or "bao", argv, env); the binary's entries only with a binary.
    Command = tuple[str, str, str, list[str], dict[str, str]]
    commands: dict[str, list[Command]] = {
        "get": [
            ("cli_get", "cli_get_cpu", "spike", [str(entry), "secret", "get", "bench/s1"], spike_get_env),
            ("cli_get", "cli_get_cpu", "bao", [bao_deploy.binary, "kv", "get", "-mount=secret", "bench/s1"], bao_env),
        ],
        "version": [
            ("version", "", "spike", [str(entry), "--version"], _clean_env()),
            ("version", "", "bao", [bao_deploy.binary, "version"], bao_env),
        ],
    }
    if binary is not None:
        commands["get"].append(
            ("cli_get_binary", "cli_get_binary_cpu", "spike", [binary, "secret", "get", "bench/s1"], binary_get_env)
        )
        commands["version"].append(("version_binary", "", "spike", [binary, "--version"], _clean_env(binary=True)))

    say(f"what users wait for: spike dev vs bao server -dev ({s.dev_rounds} round(s)), CLI commands "
        f"({s.cli_rounds} round(s)){'' if binary else '; no --binary: the binary rows are not measured'}")  # fmt: skip
    _dev_rows(suite, rows, binary, say)
    for name, plan in commands.items():
        suite.ensure_up("spike")  # the commands read from the suite's servers: up, and Nexus ready
        suite.ensure_up("bao")
        for _, _, _, argv, env in plan:  # warm-up: the page cache, not the first start, is what this skips
            with contextlib.suppress(Exception):
                timed_process(argv, env)
        for n in range(s.cli_rounds):
            for key, cpu_key, system, argv, env in plan if n % 2 == 0 else reversed(plan):
                try:
                    wall, cpu = timed_process(argv, env)
                except Exception as exc:
                    r.problem(f"{name} ({system}, {Path(argv[0]).name}) failed: {exc}")
                    continue
                rows[key].add(system, wall)
                if cpu_key:
                    rows[cpu_key].add(system, cpu * 1000)
                r.runs.append({"kind": f"user-{key}-{system}", "seconds": wall, "cpu_seconds": cpu})
            if binary is not None:  # the binary rows' peer column: the same rounds' OpenBao values
                peer_key = "cli_get" if name == "get" else "version"
                for suffix in ("", "_cpu") if name == "get" else ("",):
                    values = rows[f"{peer_key}{suffix}"].values["bao"]
                    if values:
                        rows[f"{peer_key}_binary{suffix}"].add("bao", values[-1])
        row = rows["cli_get" if name == "get" else "version"]
        say(f"  {row.label}: spike median {_med(row.values['spike'])}, OpenBao {_med(row.values['bao'])}")


def _dev_rows(suite: Suite, rows: dict[str, Row], binary: str | None, say: Callable[[str], None]) -> None:
    assert suite.bao is not None
    r, s = suite.results, suite.s
    root = suite.workdir / "user-dev"
    entry = Path(sys.executable).parent / "spike"

    def spike_venv(d: Path) -> None:
        first = spike_dev_ready([str(entry)], d, _clean_env())
        rows["dev_ready"].add("spike", first)
        again = spike_dev_ready([str(entry)], d, _clean_env())
        rows["dev_ready_again"].add("spike", again)
        r.runs.append({"kind": "user-dev-spike", "first": first, "again": again})

    def bao_dev(d: Path) -> None:
        ready = bao_dev_ready(suite.bao.binary, d)  # type: ignore[union-attr]
        rows["dev_ready"].add("bao", ready)
        if binary is not None:
            rows["dev_ready_binary"].add("bao", ready)
        r.runs.append({"kind": "user-dev-bao", "first": ready})

    def spike_binary(d: Path) -> None:
        assert binary is not None
        first = spike_dev_ready([binary], d, _clean_env(binary=True))
        rows["dev_ready_binary"].add("spike", first)
        r.runs.append({"kind": "user-dev-binary", "first": first})

    plan: list[tuple[str, Callable[[Path], None]]] = [("spike", spike_venv), ("bao", bao_dev)]
    if binary is not None:
        plan.append(("binary", spike_binary))
    for n in range(s.dev_rounds):
        for system, measure in plan if n % 2 == 0 else reversed(plan):
            where = root / f"{n}-{system}"
            try:
                measure(where)
            except Exception as exc:
                r.problem(f"dev round {n + 1} ({system}) failed: {exc}")
            finally:
                shutil.rmtree(where, ignore_errors=True)
        say(f"  round {n + 1}/{s.dev_rounds}: spike dev {_last(rows['dev_ready'])}, again "
            f"{_last(rows['dev_ready_again'])}, binary {_last(rows['dev_ready_binary'])}; "
            f"bao server -dev {_last(rows['dev_ready'], 'bao')}")  # fmt: skip


def _med(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} s" if values else "-"


def _last(row: Row, system: str = "spike") -> str:
    return f"{row.values[system][-1]:.3f} s" if row.values[system] else "-"
