"""spike's benchmark suite: spike and OpenBao side by side, in one run, on one machine, with one client.

Run it through `bench/run` (which builds bench/.venv first); `bench/run --help`
lists the options.  What each row means is in docs/benchmarks.md.

The suite starts both systems (see systems.py), seeds both with the same
secrets, then measures every row in interleaved rounds (spike, OpenBao,
spike, OpenBao, ...), prints a table of medians with min-max and the ratio
spike/OpenBao per row, and writes everything, raw runs included, to
bench/results/<UTC timestamp>.json.  Whatever it started is killed on every
way out (an error, Ctrl-C, SIGTERM); if the suite itself is killed, its
children get SIGKILL from the kernel (parent-death signal).
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import datetime as dt
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import loadgen
import user_rows
from loadgen import Paths, Target
from systems import (
    BaoDeployment,
    Http,
    Processes,
    SpikeDeployment,
    cpu_seconds,
    kill9,
    port_open,
    probe_get,
    rss_bytes,
    wait_until,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MiB = 1024 * 1024
SPIKE, BAO = "spike", "bao"


# ---------------------------------------------------------------------- settings


@dataclass
class Settings:
    quick: bool
    rounds: int
    seq_seconds: float
    load_seconds: float
    secrets: int
    big: int
    poll_counts: list[int]
    poll_seconds: float
    poll_windows: int
    shamir_seconds: float
    scale_seconds: float
    groups: set[str]
    profile: bool
    keep: bool
    poll_interval: float = 1.0
    rotation_counts: str = "3,10,100"
    nexus_binary: str | None = None
    binary_problem: str = ""  # why the binary rows are not measured, when a --binary was given
    dev_rounds: int = 5
    cli_rounds: int = 11

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        quick = args.quick
        groups = set(GROUPS) if not args.only else set(args.only.split(","))
        unknown = groups - set(GROUPS)
        if unknown:
            raise SystemExit(f"unknown group(s) {sorted(unknown)}; choose from {', '.join(GROUPS)}")
        binary, binary_problem = None, ""
        if args.nexus_binary:
            path = args.nexus_binary.resolve()
            if os.access(path, os.X_OK) and path.is_file():
                binary = str(path)
            else:
                binary_problem = f"not measured: {args.nexus_binary} is not an executable file (build/build.sh)"
        return cls(
            quick=quick,
            rounds=args.rounds or (1 if quick else 3),
            seq_seconds=args.seconds or (1.5 if quick else 4.0),
            load_seconds=args.seconds or (1.5 if quick else 5.0),
            secrets=args.secrets,
            big=args.big or (5_000 if quick else 100_000),
            poll_counts=[int(x) for x in (args.poll_counts or "3,10,100,1000").split(",")],
            poll_seconds=4.0 if quick else 20.0,
            poll_windows=2 if quick else 4,
            shamir_seconds=0.5 if quick else 1.0,
            scale_seconds=args.seconds or (1.5 if quick else 4.0),
            groups=groups,
            profile=args.profile,
            keep=args.keep,
            rotation_counts=args.rotation_counts or ("3,10" if quick else "3,10,100"),
            nexus_binary=binary,
            binary_problem=binary_problem,
            dev_rounds=args.rounds or (1 if quick else 5),
            cli_rounds=args.rounds or (3 if quick else 9),
        )


GROUPS = ["load", "restart", "user", "reseed", "polling", "shamir", "rotation", "scale", "postgres"]

# What each group measures, for `bench/run --list` (docs/benchmarks.md says more).
GROUP_NOTES = {
    "load": "GET/PUT throughput, latency, server CPU and RSS at 1, 16 and 64 connections; idle RSS",
    "restart": "Nexus kill -9 -> first successful GET, against OpenBao restarted and unsealed (and the binary's)",
    "user": "what users wait for: spike dev until ready, a CLI command as a process, --version",
    "reseed": "a keeper kill -9 and restarted -> holding its shard again",
    "polling": "Nexus polling 3..1000 keepers: CPU and schedule lateness",
    "shamir": "Shamir 3-of-5 split + combine against pyshamir",
    "rotation": "root key rotation, rekey, data-key rotation, GET/PUT during rotations",
    "scale": "GET latency with 1,000 and 100,000 secrets stored",
    "postgres": "GET/PUT throughput with one and two Nexus on PostgreSQL",
}


# ---------------------------------------------------------------------- rows and results


@dataclass(frozen=True)
class Goal:
    """A target: on the ratio of medians, or on spike's worst (max) or median value."""

    on: str  # "ratio" | "max" | "median"
    op: str  # ">=" | "<=" | "<"
    value: float
    text: str

    def met(self, ratio: float | None, spike: list[float]) -> bool | None:
        if self.on == "ratio":
            x = ratio
        elif not spike:
            x = None
        else:
            x = max(spike) if self.on == "max" else statistics.median(spike)
        if x is None or math.isnan(x):
            return None
        return {">=": x >= self.value, "<=": x <= self.value, "<": x < self.value}[self.op]


@dataclass
class Row:
    key: str
    label: str
    unit: str
    better: str  # "higher" | "lower"
    goal: Goal | None = None
    peer: str = "OpenBao"
    values: dict[str, list[float]] = field(default_factory=lambda: {SPIKE: [], BAO: []})
    note: str = ""
    skipped: str = ""  # why the row was not measured (shown in the table instead of "-")

    def add(self, system: str, value: float | None) -> None:
        if value is not None and not math.isnan(value):
            self.values[system].append(value)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "row": self.label,
            "key": self.key,
            "unit": self.unit,
            "better": self.better,
            "peer": self.peer,
        }
        for system in (SPIKE, BAO):
            vals = self.values[system]
            out[system] = (
                {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "values": vals}
                if vals
                else None
            )
        ratio = None
        if out[SPIKE] and out[BAO] and out[BAO]["median"]:
            ratio = out[SPIKE]["median"] / out[BAO]["median"]
        out["ratio"] = ratio
        out["target"] = self.goal.text if self.goal else ""
        out["met"] = self.goal.met(ratio, self.values[SPIKE]) if self.goal else None
        if self.note:
            out["note"] = self.note
        if self.skipped:
            out["skipped"] = self.skipped
        return out


class Results:
    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}
        self.runs: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}
        self.problems: list[str] = []

    def row(self, key: str, label: str, unit: str, better: str, goal: Goal | None = None, **kw: Any) -> Row:
        if key not in self.rows:
            self.rows[key] = Row(key, label, unit, better, goal, **kw)
        return self.rows[key]

    def problem(self, text: str) -> None:
        say(f"  !! {text}")
        self.problems.append(text)


_T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - _T0:6.0f}s] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- the machine


def git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=20, check=False
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    busy = ""
    with contextlib.suppress(Exception):
        top = subprocess.run(
            ["ps", "-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.splitlines()[:5]
        busy = "; ".join(" ".join(x.split()) for x in top)
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_bytes": mem,
        "load_average_at_start": os.getloadavg(),
        "busiest_processes_at_start": busy,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "hostname": platform.node(),
    }


# ---------------------------------------------------------------------- measuring one load run


class Suite:
    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.s = settings
        self.workdir = workdir
        self.procs = Processes()
        self.results = Results()
        self.spike: SpikeDeployment | None = None
        self.bao: BaoDeployment | None = None

    # -- systems ----------------------------------------------------------

    def start_systems(self) -> None:
        say("starting spike: 3 keepers, Nexus (SQLite, 2-of-3, poll interval 1s), bootstrap")
        self.spike = SpikeDeployment(self.procs, self.workdir / "spike", poll_interval=self.s.poll_interval)
        self.spike.start()
        self.spike.bootstrap()
        self.spike.wait_ready()
        say("starting OpenBao: TLS on loopback, raft storage, init 5 shares / threshold 3, unseal 3 keys, kv-v2")
        self.bao = BaoDeployment(self.procs, self.workdir / "bao")
        self.bao.start()
        self.results.extra["openbao_version"] = self.bao.cli("version").strip()

    def target(self, system: str) -> Target:
        assert self.spike is not None and self.bao is not None
        return self.spike.target() if system == SPIKE else self.bao.target()

    def server_pid(self, system: str) -> int:
        assert self.spike is not None and self.bao is not None
        popen = self.spike.nexus if system == SPIKE else self.bao.server
        assert popen is not None
        return popen.pid

    def side_pids(self, system: str) -> list[int]:
        assert self.spike is not None
        return self.spike.keeper_pids() if system == SPIKE else []

    def ensure_up(self, system: str) -> None:
        """Restart a server that died (and say so): the rest of the run still means something."""
        assert self.spike is not None and self.bao is not None
        if system == SPIKE:
            for keeper_id, popen in list(self.spike.keeper_procs.items()):
                if popen.poll() is not None:
                    self.results.problem(f"spike keeper {keeper_id} had exited ({popen.returncode}); restarted")
                    self.spike.spawn_keeper(keeper_id)
                    self.spike.wait_listening(
                        self.spike.keeper_procs[keeper_id], self.spike.keeper_ports[keeper_id], "keeper"
                    )
            if self.spike.nexus is None or self.spike.nexus.poll() is not None:
                self.results.problem("spike Nexus had exited; restarted")
                self.spike.spawn_nexus()
            self.spike.wait_ready()
        else:
            if self.bao.server is None or self.bao.server.poll() is not None:
                self.results.problem("OpenBao had exited; restarted and unsealed")
                self.restart_bao(kill=False)

    def load(
        self,
        system: str,
        op: str,
        connections: int,
        seconds: float,
        paths: Paths | None = None,
        label: str = "",
        profile: Path | None = None,
    ) -> dict[str, Any] | None:
        """One closed-loop run; adds the server's CPU time and RSS.  None if it failed twice."""
        kind = f"{op}-{system}"
        processes = 1 if connections == 1 else 2
        paths = paths or Paths(self.s.secrets)
        for attempt in (1, 2):
            try:
                self.ensure_up(system)
                pid, sides = self.server_pid(system), self.side_pids(system)
                marks: dict[str, Any] = {}
                spy: list[subprocess.Popen[bytes]] = []

                def on_start(pid: int = pid, sides: list[int] = sides, marks: dict[str, Any] = marks) -> None:
                    marks["t0"] = time.monotonic()
                    marks["cpu0"] = cpu_seconds(pid)
                    marks["side0"] = {p: cpu_seconds(p) for p in sides}
                    if profile is not None:
                        spy.append(start_profiler(pid, profile, seconds))  # noqa: B023 - called in this iteration

                out = loadgen.run(self.target(system), kind, connections, processes, seconds, paths, on_start=on_start)
                wall = time.monotonic() - marks["t0"]
                cpu = cpu_seconds(pid) - marks["cpu0"]
                side = sum(cpu_seconds(p) - c for p, c in marks["side0"].items())
                for p in spy:
                    p.wait(timeout=60)
                out.update(
                    system=system,
                    kind=kind,
                    connections=connections,
                    label=label,
                    server_cpu_seconds=cpu,
                    server_cpu_percent=100 * cpu / wall,
                    cpu_ms_per_request=1000 * cpu / out["requests"] if out["requests"] else float("nan"),
                    side_cpu_percent=100 * side / wall if sides else None,
                    rss_after_bytes=rss_bytes(pid),
                    load_average=os.getloadavg()[0],
                )
                self.results.runs.append(out)
                if out["errors"]:
                    self.results.problem(
                        f"{label or kind}: {out['errors']} of {out['requests']} answers were errors {out['statuses']}"
                    )
                say(
                    f"  {system:5} {label or kind:28} {out['throughput']:8.0f} req/s  p50 {out['p50_ms']:6.2f} ms  "
                    f"p99 {out['p99_ms']:7.2f} ms  cpu {out['cpu_ms_per_request']:.3f} ms/req"
                )
                return out
            except Exception as exc:
                self.results.problem(f"{label or kind} attempt {attempt} failed: {exc}")
        return None

    # -- seeding -------------------------------------------------------------

    def seed(self, start: int, stop: int, connections: int = 16) -> None:
        """Write bench/s<start> .. bench/s<stop-1> once each into both systems, at the same time."""
        say(f"seeding paths {start}..{stop - 1} into spike and OpenBao ({stop - start} secrets each)")
        running = {}
        for system in (SPIKE, BAO):
            t = self.target(system)
            argv = [
                sys.executable, str(HERE / "loadgen.py"), "--url", f"https://{t.host}:{t.port}",
                "--ca", str(t.ca), "--request", f"put-{system}", "--connections", str(connections),
                "--processes", "2", "--duration", "3000", "--seed-range", f"{start}:{stop}",
            ]  # fmt: skip
            if t.cert:
                argv += ["--cert", str(t.cert), "--key", str(t.key)]
            env = dict(os.environ)
            if t.token:
                env["BAO_TOKEN"] = t.token
            running[system] = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env, start_new_session=True)
            self.procs.children.append(running[system])  # type: ignore[arg-type]
        for system, popen in running.items():
            stdout, _ = popen.communicate(timeout=3600)
            if popen.returncode != 0:
                raise RuntimeError(f"seeding {system} failed (exit {popen.returncode})")
            out = json.loads(stdout)
            if out["requests"] != stop - start or out["errors"]:
                raise RuntimeError(f"seeding {system}: {out['requests']} writes, {out['errors']} errors")
            say(f"  {system:5} seeded {out['requests']} secrets in {out['seconds']:.1f}s ({out['throughput']:.0f}/s)")
            self.results.extra.setdefault("seeding", []).append({"system": system, "range": [start, stop], **out})

    # -- rows -------------------------------------------------------------

    def memory_idle(self) -> None:
        assert self.spike is not None and self.bao is not None
        time.sleep(2)
        r = self.results
        row = r.row(
            "rss_idle", "RSS idle after seeding, Nexus vs OpenBao", "MiB", "lower", Goal("ratio", "<=", 0.5, "<= 0.5x")
        )
        keeper = r.row("keeper_rss", "keeper RSS idle (largest of 3)", "MiB", "lower", Goal("max", "<", 30, "< 30 MiB"))
        for _ in range(3):
            row.add(SPIKE, rss_bytes(self.server_pid(SPIKE)) / MiB)
            row.add(BAO, rss_bytes(self.server_pid(BAO)) / MiB)
            keeper.add(SPIKE, max(rss_bytes(p) for p in self.spike.keeper_pids()) / MiB)
            time.sleep(1)

    def load_rows(self) -> None:
        s, r = self.s, self.results
        ge1, ge15 = Goal("ratio", ">=", 1.0, ">= 1.0x"), Goal("ratio", ">=", 1.5, ">= 1.5x")
        plan = [
            ("get", 1, s.seq_seconds, "get_seq", "GET throughput, 1 connection (sequential)", ge1),
            ("put", 1, s.seq_seconds, "put_seq", "PUT throughput, 1 connection (sequential)", ge1),
            ("get", 16, s.load_seconds, "get_16", "GET throughput, 16 connections", ge1),
            ("put", 16, s.load_seconds, "put_16", "PUT throughput, 16 connections (durable)", ge15),
            ("get", 64, s.load_seconds, "get_64", "GET throughput, 64 connections", ge1),
            ("put", 64, s.load_seconds, "put_64", "PUT throughput, 64 connections (durable)", ge15),
        ]
        names = {
            "get_seq": "GET 1 conn",
            "put_seq": "PUT 1 conn",
            "get_16": "GET 16 conns",
            "put_16": "PUT 16 conns",
            "get_64": "GET 64 conns",
            "put_64": "PUT 64 conns",
        }
        for _, _, _, key, label, goal in plan:
            r.row(key, label, "req/s", "higher", goal)
        for key, name in names.items():
            r.row(f"{key}_p50", f"{name}: p50 latency", "ms", "lower")
            r.row(f"{key}_p99", f"{name}: p99 latency", "ms", "lower")
        for key, name in names.items():
            r.row(f"{key}_cpu", f"{name}: server CPU per request", "ms", "lower")
        loaded = r.row("rss_loaded", "RSS after the 64-connection runs, Nexus vs OpenBao", "MiB", "lower")
        keepers_cpu = r.row("keepers_cpu", "3 keepers' CPU during the 64-conn GET run", "% of a core", "lower")
        for n in range(s.rounds):
            say(f"round {n + 1}/{s.rounds}: throughput and latency (spike, OpenBao, spike, OpenBao, ...)")
            peak = {SPIKE: 0, BAO: 0}
            for op, connections, seconds, key, _, _ in plan:
                for system in (SPIKE, BAO):
                    out = self.load(system, op, connections, seconds, label=names[key])
                    if out is None:
                        continue
                    r.rows[key].add(system, out["throughput"])
                    r.rows[f"{key}_p50"].add(system, out["p50_ms"])
                    r.rows[f"{key}_p99"].add(system, out["p99_ms"])
                    r.rows[f"{key}_cpu"].add(system, out["cpu_ms_per_request"])
                    if connections == 64:
                        peak[system] = max(peak[system], out["rss_after_bytes"])
                    if key == "get_64" and system == SPIKE and out["side_cpu_percent"] is not None:
                        keepers_cpu.add(SPIKE, out["side_cpu_percent"])
            for system in (SPIKE, BAO):
                if peak[system]:
                    loaded.add(system, peak[system] / MiB)

    def restart_spike_binary(self) -> dict[str, float]:
        """As restart_spike, with Nexus started as the single binary; the next start is the interpreter's again."""
        assert self.spike is not None
        self.spike.nexus_binary = self.s.nexus_binary
        try:
            return self.restart_spike()
        finally:
            self.spike.nexus_binary = None

    def restart_spike(self) -> dict[str, float]:
        assert self.spike is not None and self.spike.nexus is not None
        kill9(self.spike.nexus)
        target = self.spike.target()
        t0 = time.monotonic()
        popen = self.spike.spawn_nexus()
        listening = None
        while True:
            if popen.poll() is not None:
                raise RuntimeError(f"Nexus exited with code {popen.returncode} after the restart")
            if probe_get(target, "get-spike", 1, timeout=0.25):
                break
            if listening is None and port_open(self.spike.nexus_port, 0.05):
                listening = time.monotonic() - t0
            if time.monotonic() - t0 > 60:
                raise RuntimeError("no successful GET within 60 s of restarting Nexus")
            time.sleep(0.005)
        first_get = time.monotonic() - t0
        self.spike.wait_ready()  # every keeper holding again before the next row
        return {"first_get": first_get, "listening": listening or first_get}

    def restart_bao(self, kill: bool = True) -> dict[str, float]:
        assert self.bao is not None
        if kill and self.bao.server is not None:
            kill9(self.bao.server)
        target = self.bao.target()
        t0 = time.monotonic()
        popen = self.bao.spawn()
        http = Http(self.bao.port, self.bao.ctx, timeout=0.25)
        try:
            while not self.bao.api_answers(http):
                if popen.poll() is not None:
                    raise RuntimeError(f"bao exited with code {popen.returncode} after the restart")
                if time.monotonic() - t0 > 60:
                    raise RuntimeError("the OpenBao API did not answer within 60 s of the restart")
                time.sleep(0.005)
            api = time.monotonic() - t0
            http.timeout = 10.0
            http.close()
            self.bao.unseal(http)
            unsealed = time.monotonic() - t0
            while not probe_get(target, "get-bao", 1, timeout=0.25):
                if time.monotonic() - t0 > 120:
                    raise RuntimeError("no successful GET within 120 s of restarting OpenBao")
                time.sleep(0.005)
            first_get = time.monotonic() - t0
        finally:
            http.close()
        return {"first_get": first_get, "api_answers": api, "unsealed": unsealed}

    def restart_rows(self) -> None:
        r = self.results
        row = r.row(
            "restart",
            "restart after kill -9 -> first successful GET",
            "s",
            "lower",
            Goal("ratio", "<=", 1.0, "<= 1.0x"),
            note="from spawning the new process; OpenBao unsealed by the script with 3 keys through its API",
        )
        restarts: list[tuple[str, Callable[[], dict[str, float]], Row]] = [
            (SPIKE, self.restart_spike, row),
            (BAO, self.restart_bao, row),
        ]
        if self.s.nexus_binary:
            binary = r.row(
                "restart_binary",
                "restart after kill -9 -> first successful GET, Nexus as the single binary",
                "s",
                "lower",
                Goal("ratio", "<=", 1.0, "<= 1.0x"),
                note=f"{self.s.nexus_binary}; OpenBao's column is the same rounds' as the row above",
            )
            restarts.insert(1, ("binary", self.restart_spike_binary, binary))
        for n in range(self.s.rounds):
            say(f"round {n + 1}/{self.s.rounds}: kill -9 and restart")
            bao_time = None
            for system, restart, target in restarts:
                try:
                    self.ensure_up(SPIKE if system == "binary" else system)
                    out = restart()
                except Exception as exc:
                    r.problem(f"restart of {system} failed: {exc}")
                    with contextlib.suppress(Exception):
                        self.ensure_up(SPIKE if system == "binary" else system)
                    continue
                target.add(SPIKE if system == "binary" else system, out["first_get"])
                if system == BAO:
                    bao_time = out["first_get"]
                r.runs.append({"kind": f"restart-{system}", **out})
                say(f"  {system:6} first GET {out['first_get']:.3f}s after the restart  {out}")
            if self.s.nexus_binary and bao_time is not None:
                r.rows["restart_binary"].add(BAO, bao_time)

    def reseed_rows(self) -> None:
        assert self.spike is not None
        spike, r = self.spike, self.results
        limit = spike.poll_interval + 0.1
        row = r.row(
            "reseed",
            "keeper kill -9 + restart -> Nexus status: holding again",
            "s",
            "lower",
            Goal("max", "<=", limit, f"<= {limit:g} s (interval + 100 ms)"),
            note="from the restarted keeper's port accepting connections",
        )
        shard = r.row("reseed_shard", "keeper kill -9 + restart -> shard readable (nexus SVID)", "s", "lower")
        rel = r.row("reseed_rel", "keeper re-seed time / poll interval", "x", "lower")
        nexus_http = Http(spike.nexus_port, spike.pilot_ctx, timeout=1.0)
        try:
            for n in range(self.s.rounds):
                keeper_id = spike.keeper_ids[(n + 1) % len(spike.keeper_ids)]
                say(f"round {n + 1}/{self.s.rounds}: kill -9 keeper {keeper_id}, restart, wait for its shard")
                try:
                    self.ensure_up(SPIKE)
                    before = spike.status(nexus_http)
                    assert before is not None
                    reseeds0 = next(k["reseeds"] for k in before["keepers"] if k["id"] == keeper_id)
                    kill9(spike.keeper_procs[keeper_id])
                    time.sleep(0.3)  # Nexus notices the keeper is gone (a poll fails) as it would in life
                    t0 = time.monotonic()
                    popen = spike.spawn_keeper(keeper_id)
                    port = spike.keeper_ports[keeper_id]
                    up = lambda p=popen, port=port: port_open(port, 0.05) or p.poll() is not None  # noqa: E731
                    wait_until(up, "keeper to listen", 30, 0.005)
                    if popen.poll() is not None:
                        raise RuntimeError(f"keeper {keeper_id} exited with code {popen.returncode} at start")
                    t_listen = time.monotonic()
                    keeper_http = Http(port, spike.nexus_ctx, timeout=1.0)
                    t_shard = t_hold = None
                    while (t_shard is None or t_hold is None) and time.monotonic() - t_listen < 15:
                        if t_shard is None and spike.read_shard_status(keeper_http) == 200:
                            t_shard = time.monotonic()
                        if t_hold is None:
                            body = spike.status(nexus_http)
                            k = next((k for k in (body or {}).get("keepers", []) if k["id"] == keeper_id), None)
                            if k and k["state"] == "holding" and k["reseeds"] > reseeds0:
                                t_hold = time.monotonic()
                        time.sleep(0.005)
                    keeper_http.close()
                    if t_hold is None or t_shard is None:
                        raise RuntimeError(f"keeper {keeper_id} was not re-seeded within 15 s")
                    out = {
                        "keeper": keeper_id,
                        "spawn_to_listening": t_listen - t0,
                        "listening_to_holding": t_hold - t_listen,
                        "listening_to_shard": t_shard - t_listen,
                    }
                    row.add(SPIKE, out["listening_to_holding"])
                    shard.add(SPIKE, out["listening_to_shard"])
                    rel.add(SPIKE, out["listening_to_holding"] / spike.poll_interval)
                    r.runs.append({"kind": "reseed", **out})
                    say(f"  keeper {keeper_id}: holding {out['listening_to_holding']:.3f}s, shard readable "
                        f"{out['listening_to_shard']:.3f}s after it listened")  # fmt: skip
                except Exception as exc:
                    r.problem(f"keeper re-seed round {n + 1} failed: {exc}")
        finally:
            nexus_http.close()

    def polling_rows(self) -> None:
        r, s = self.results, self.s
        for count in s.poll_counts:
            cpu = r.row(f"poll_{count}_cpu", f"polling {count} keepers at 1 s: Nexus CPU", "% of a core", "lower")
            p50 = r.row(f"poll_{count}_p50", f"polling {count} keepers: schedule lateness p50", "ms", "lower")
            goal = Goal("max", "<", 100, "< 100 ms") if count >= 1000 else None
            p99 = r.row(f"poll_{count}_p99", f"polling {count} keepers: schedule lateness p99", "ms", "lower", goal)
            say(
                f"polling {count} keepers every {s.poll_interval:g}s for {s.poll_seconds:g}s (in-process CustodyDriver)"
            )
            try:
                out = self.poll_once(count)
            except Exception as exc:
                r.problem(f"polling {count} keepers failed: {exc}")
                continue
            for w in out["windows"]:
                cpu.add(SPIKE, w["cpu_percent"])
                p50.add(SPIKE, w["lateness_p50_ms"])
                p99.add(SPIKE, w["lateness_p99_ms"])
            r.runs.append({"kind": f"polling-{count}", **out})
            say(
                f"  {count} keepers: {out['polls_per_second']:.0f} polls/s, "
                f"lateness p50 {out['lateness_p50_ms']:.1f} ms p99 {out['lateness_p99_ms']:.1f} ms, "
                f"holding at end {out['holding_at_end']}/{count}, "
                f"failures {out['failure_reasons'] or 'none'}"
            )
            if out["holding_at_end"] < count:
                r.problem(
                    f"polling {count}: only {out['holding_at_end']} keepers holding at the end {out['states_at_end']}"
                )

    def poll_once(self, count: int) -> dict[str, Any]:
        s = self.s
        d = self.workdir / f"polling-{count}"
        d.mkdir(parents=True, exist_ok=True)
        script = str(HERE / "polling.py")
        ident, keys, ports = d / "identity", d / "keys.json", d / "ports.json"
        subprocess.run(
            [sys.executable, script, "prepare", "--count", str(count), "--identity", str(ident), "--keys", str(keys)],
            check=True,
            timeout=300,
        )
        keepers = self.procs.spawn(
            [sys.executable, script, "keepers", "--count", str(count), "--identity", str(ident), "--keys", str(keys),
             "--ports-file", str(ports)],
            env=dict(os.environ),
            log=d / "keepers.log",
        )  # fmt: skip
        try:
            wait_until(lambda: ports.exists() or keepers.poll() is not None, "the keepers to listen", 120, 0.1)
            if keepers.poll() is not None:
                raise RuntimeError(f"the keepers process exited ({keepers.returncode}); see {d / 'keepers.log'}")
            k0, t0 = cpu_seconds(keepers.pid), time.monotonic()
            nexus = subprocess.run(
                [sys.executable, script, "nexus", "--identity", str(ident), "--keys", str(keys), "--ports-file",
                 str(ports), "--seconds", str(s.poll_seconds), "--windows", str(s.poll_windows),
                 "--interval", str(s.poll_interval)],
                capture_output=True, text=True, timeout=s.poll_seconds + 300, check=False,
            )  # fmt: skip
            keepers_cpu = 100 * (cpu_seconds(keepers.pid) - k0) / (time.monotonic() - t0)
            if nexus.returncode != 0:
                raise RuntimeError(f"polling.py nexus failed ({nexus.returncode}): {nexus.stderr[-2000:]}")
            out: dict[str, Any] = json.loads(nexus.stdout)
            out["keepers_process_cpu_percent_whole_run"] = keepers_cpu
            out["keepers_process_rss_bytes"] = rss_bytes(keepers.pid)
            return out
        finally:
            kill9(keepers)

    def shamir_rows(self) -> None:
        import os as _os

        import pyshamir

        from spike.protocol.material import RootKey
        from spike.protocol.shamir import combine, deal

        r, s = self.results, self.s
        row = r.row(
            "shamir",
            "Shamir 3-of-5 split + combine (32-byte secret)",
            "ops/s",
            "higher",
            Goal("ratio", ">=", 10.0, ">= 10x"),
            peer="pyshamir",
        )
        key = RootKey.generate(_os.urandom)
        secret = bytes(_os.urandom(32))
        ids = [1, 2, 3, 4, 5]

        def spike_op() -> None:
            shares = deal(key, epoch=1, threshold=3, ids=ids)
            rebuilt = combine([shares[1], shares[3], shares[5]], 3)
            if rebuilt.secret_bytes() != key.secret_bytes():
                raise AssertionError("spike's Shamir did not rebuild the key")

        def peer_op() -> None:
            parts = pyshamir.split(secret, 5, 3)
            if bytes(pyshamir.combine([parts[0], parts[2], parts[4]])) != secret:
                raise AssertionError("pyshamir did not rebuild the secret")

        def rate(op: Callable[[], None]) -> float:
            op()
            n, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < s.shamir_seconds:
                for _ in range(10):
                    op()
                n += 10
            return n / elapsed

        for n in range(s.rounds):
            a, b = rate(spike_op), rate(peer_op)
            row.add(SPIKE, a)
            row.add(BAO, b)
            say(f"round {n + 1}/{s.rounds}: Shamir 3-of-5 split+combine: spike {a:.0f}/s, pyshamir {b:.0f}/s")

    def scale_rows(self) -> None:
        r, s = self.results, self.s
        small, big = s.secrets, s.big
        where = "(1 conn, random paths)"
        rows = {
            (small, "p50"): r.row("scale_small_p50", f"GET p50, {small:,} secrets stored {where}", "ms", "lower"),
            (small, "p99"): r.row("scale_small_p99", f"GET p99, {small:,} secrets stored", "ms", "lower"),
            (big, "p50"): r.row("scale_big_p50", f"GET p50, {big:,} secrets stored {where}", "ms", "lower"),
            (big, "p99"): r.row("scale_big_p99", f"GET p99, {big:,} secrets stored", "ms", "lower"),
        }

        def measure(stored: int) -> None:
            sample = tuple(random.Random(stored).sample(range(stored), min(1000, stored)))
            for n in range(s.rounds):
                for system in (SPIKE, BAO):
                    out = self.load(
                        system, "get", 1, s.scale_seconds, Paths(stored, sample), label=f"GET of {stored:,}"
                    )
                    if out is not None:
                        rows[(stored, "p50")].add(system, out["p50_ms"])
                        rows[(stored, "p99")].add(system, out["p99_ms"])
                say(f"  round {n + 1}/{s.rounds} done")

        say(f"GET latency with {small:,} secrets stored")
        measure(small)
        self.seed(small, big, connections=32)
        say(f"GET latency with {big:,} secrets stored")
        measure(big)

    # -- key rotation (docs/key-lifecycle.md) ------------------------------------

    def rotate_spike(self, every: float = 0.01) -> float:
        """`spike operator rotate`'s request, then the status every `every` s until the new epoch is in force."""
        assert self.spike is not None
        http = Http(self.spike.nexus_port, self.spike.pilot_ctx, timeout=30.0)
        try:
            before = self.spike.wait_ready()["epoch"]
            t0 = time.monotonic()
            code, body = http.json("POST", "/v1/operator/rotate", {})
            if code != 200:
                raise RuntimeError(f"spike rotate answered HTTP {code}: {body}")

            def committed() -> bool:
                now = self.spike.status(http) if self.spike else None
                return bool(now) and now["epoch"] > before and now.get("rotation") is None  # type: ignore[index]

            wait_until(committed, "spike's rotation to commit", 120, every=every)
            return time.monotonic() - t0
        finally:
            http.close()

    def rotate_data_key_spike(self) -> float:
        """`spike operator rotate --data-key`: a new data-key term (one store write), to its answer."""
        assert self.spike is not None
        http = Http(self.spike.nexus_port, self.spike.pilot_ctx, timeout=30.0)
        try:
            t0 = time.monotonic()
            code, body = http.json("POST", "/v1/operator/rotate", {"data_key": True})
            if code != 200:
                raise RuntimeError(f"spike rotate --data-key answered HTTP {code}: {body}")
            return time.monotonic() - t0
        finally:
            http.close()

    def rotate_bao(self, what: str = "root") -> float:
        """OpenBao's rotations (2.4+): `root` a new root key (POST /v1/sys/rotate/root, the unseal shares
        unchanged), `keyring` a new encryption key term for the barrier (`bao operator rotate`)."""
        assert self.bao is not None
        http = Http(self.bao.port, self.bao.ctx, timeout=30.0)
        path = "/v1/sys/rotate/root" if what == "root" else "/v1/sys/rotate/keyring"
        try:
            t0 = time.monotonic()
            code, body = http.json("POST", path, {}, {"X-Vault-Token": self.bao.root_token})
            if code not in (200, 204):
                raise RuntimeError(f"OpenBao {path} answered HTTP {code}: {body}")
            return time.monotonic() - t0
        finally:
            http.close()

    def rekey_bao(self) -> float:
        """`bao operator rotate-keys` (was `rekey`): new unseal shares (5, threshold 3), three current keys given."""
        assert self.bao is not None
        http = Http(self.bao.port, self.bao.ctx, timeout=30.0)
        headers = {"X-Vault-Token": self.bao.root_token}
        try:
            t0 = time.monotonic()
            code, body = http.json(
                "POST", "/v1/sys/rotate/root/init", {"secret_shares": 5, "secret_threshold": 3}, headers
            )
            if code != 200:
                raise RuntimeError(f"OpenBao sys/rotate/root/init answered HTTP {code}: {body}")
            nonce = body.get("data", body)["nonce"]  # 2.4+ answers in `data`, as other sys/ endpoints do
            for key in self.bao.unseal_keys[:3]:
                code, body = http.json("POST", "/v1/sys/rotate/root/update", {"key": key, "nonce": nonce}, headers)
                if code != 200:
                    raise RuntimeError(f"OpenBao sys/rotate/root/update answered HTTP {code}: {body}")
            took = time.monotonic() - t0
            done = body.get("data", body)
            if not done.get("complete"):
                raise RuntimeError(f"OpenBao's key rotation did not complete: {done}")
            self.bao.unseal_keys = list(done["keys_base64"])  # later restarts unseal with the new shares
            return took
        finally:
            http.close()

    def rotation_time_row(self, stored: int) -> None:
        r = self.results
        row = r.row(
            f"rotate_{stored}",
            f"root key rotation, {stored:,} secrets stored",
            "s",
            "lower",
            peer="OpenBao sys/rotate/root",
            note="spike: POST /v1/operator/rotate until the status shows the new epoch in force (dealt at the "
            f"keepers' polls, every {self.s.poll_interval:g}s); OpenBao: POST /v1/sys/rotate/root (a new root key, "
            "the same unseal shares)",
        )
        for n in range(self.s.rounds):
            for system in (SPIKE, BAO):
                try:
                    took = self.rotate_spike() if system == SPIKE else self.rotate_bao()
                except Exception as exc:
                    r.problem(f"rotation ({system}, {stored} secrets) failed: {exc}")
                    continue
                row.add(system, took)
                say(f"  {system:5} rotation with {stored:,} secrets stored: {took:.3f}s (round {n + 1})")

    def rotation_rows(self, stored: int) -> None:
        """Rotation time by keeper count (bench/rotation.py), with `stored` secrets, under load; OpenBao's."""
        r, s = self.results, self.s
        say(f"rotation: time to rotate with {stored:,} secrets stored")
        self.rotation_time_row(stored)
        self.stored_for_rotation = stored
        rekey = r.row("rekey", "rekey: new key shares", "s", "lower", peer="OpenBao operator rotate-keys",
                      note="spike: 2-of-3 -> 3-of-5 by configuration and SIGHUP, until in force (bench/rotation.py); "
                      "OpenBao: sys/rotate/root/init 5 shares threshold 3, then 3 unseal keys to .../update "
                      "(bao operator rotate-keys, formerly rekey)")  # fmt: skip
        keyring = r.row("rotate_keyring", "encryption key term rotation", "s", "lower",
                        peer="OpenBao operator rotate",
                        note="spike: POST /v1/operator/rotate {data_key: true}, to its answer (one store write); "
                        "OpenBao: POST /v1/sys/rotate/keyring")  # fmt: skip
        for _ in range(s.rounds):
            try:
                rekey.add(BAO, self.rekey_bao())
                keyring.add(SPIKE, self.rotate_data_key_spike())
                keyring.add(BAO, self.rotate_bao("keyring"))
            except Exception as exc:
                r.problem(f"a rekey or an encryption key term rotation failed: {exc}")
        self.rotation_load_rows()
        out_file = self.workdir / "rotation-rows.json"
        say(f"rotation: keepers {s.rotation_counts} (bench/rotation.py)")
        done = subprocess.run(
            [sys.executable, str(HERE / "rotation.py"), "--counts", s.rotation_counts, "--rounds", str(s.rounds),
             "--poll-interval", f"{s.poll_interval:g}", "--json", str(out_file)],
            capture_output=True, text=True, timeout=1800, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            r.problem(f"rotation rows not measured: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
            return
        for item in json.loads(out_file.read_text())["rows"]:
            if item["operation"] == "rotate":
                row = r.row(f"rotate_keepers_{item['keepers']}",
                            f"root key rotation, {item['keepers']} keepers (threshold {item['threshold']})", "s",
                            "lower", peer="-")  # fmt: skip
                target = row
            else:
                target = (
                    rekey
                    if item["operation"].startswith("rekey 2-of-3")
                    else r.row(
                        "rekey_back", "rekey back: 3-of-5 -> 2-of-3 (keepers 4, 5 retired)", "s", "lower", peer="-"
                    )
                )
            for value in item["seconds"]:
                target.add(SPIKE, value)
            say(f"  {item['operation']}, {item['keepers']} keepers: {item['seconds']}")

    def rotation_big_rows(self) -> None:
        """Rotation time again once the scale group stored `--big` secrets (seeded here if it did not run)."""
        big = self.s.big
        if "scale" not in self.s.groups:
            self.seed(self.s.secrets, big, connections=32)
        say(f"rotation: time to rotate with {big:,} secrets stored")
        self.rotation_time_row(big)

    def rotation_load_rows(self) -> None:
        """GET and PUT throughput and p99 with rotations going on all the time, against the same runs without."""
        r, s = self.results, self.s
        plans = [("get", "GET"), ("put", "PUT")]
        for op, name in plans:
            for when in ("steady", "rotating"):
                what = "without rotations" if when == "steady" else "during root key rotations"
                r.row(f"{op}_16_{when}", f"{name} 16 conns {what}", "req/s", "higher")
                r.row(f"{op}_16_{when}_p99", f"{name} 16 conns {what}: p99", "ms", "lower")
        counts = r.row("rotations_under_load", "rotations committed per load run", "count", "higher",
                       note="spike: back to back, to each commit; OpenBao: sys/rotate/root each second")  # fmt: skip
        for n in range(s.rounds):
            say(f"round {n + 1}/{s.rounds}: GET and PUT with and without rotations going on")
            # Which goes first alternates by round, so that a machine getting busier (or quieter) during a
            # round weighs on both the same.
            order = ("steady", "rotating") if n % 2 == 0 else ("rotating", "steady")
            for op, name in plans:
                for when in order:
                    for system in (SPIKE, BAO):
                        stop = threading.Event()
                        done: list[int] = []
                        # The same watcher in both (a status read every 0.25 s for spike): only rotations differ.
                        rotate = when == "rotating"
                        rotator = threading.Thread(target=self._keep_rotating, args=(system, stop, done, rotate))
                        rotator.start()
                        try:
                            out = self.load(system, op, 16, s.load_seconds, label=f"{name} 16 {when}")
                        finally:
                            stop.set()
                            rotator.join(timeout=120)
                        if out is None:
                            continue
                        r.rows[f"{op}_16_{when}"].add(system, out["throughput"])
                        r.rows[f"{op}_16_{when}_p99"].add(system, out["p99_ms"])
                        if rotate:
                            counts.add(system, len(done))

    def _keep_rotating(self, system: str, stop: threading.Event, done: list[int], rotate: bool) -> None:
        """spike: rotations back to back, each followed to its commit by reading the status every 0.25 s (without
        `rotate`: the same reads, no rotation); OpenBao: a root key rotation once a second (or nothing)."""
        assert self.spike is not None
        http = Http(self.spike.nexus_port, self.spike.pilot_ctx, timeout=30.0)
        try:
            while not stop.is_set():
                if system == BAO:
                    if rotate:
                        self.rotate_bao("root")
                        done.append(1)
                    stop.wait(1.0)
                    continue
                before = self.spike.status(http)
                if rotate and before and before.get("rotation") is None:
                    code, body = http.json("POST", "/v1/operator/rotate", {})
                    if code != 200:
                        raise RuntimeError(f"rotate answered HTTP {code}: {body}")
                    while True:
                        stop.wait(0.25)
                        now = self.spike.status(http)
                        if now and now["epoch"] > before["epoch"] and now.get("rotation") is None:
                            done.append(1)
                            break
                else:
                    stop.wait(0.25)
        except Exception as exc:
            self.results.problem(f"a rotation under load failed ({system}): {exc}")
        finally:
            http.close()

    def postgres_rows(self) -> None:
        """One vs two Nexus instances on one PostgreSQL (bench/postgres_rows.py, its own cluster)."""
        r, s = self.results, self.s
        out_file = self.workdir / "postgres-rows.json"
        say("PostgreSQL: one vs two Nexus instances (bench/postgres_rows.py)")
        done = subprocess.run(
            [sys.executable, str(HERE / "postgres_rows.py"), "--seconds", str(s.load_seconds), "--connections", "16",
             "--json", str(out_file)],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            r.problem(f"PostgreSQL rows not measured: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
            return
        for item in json.loads(out_file.read_text())["rows"]:
            op = "GET" if item["request"].startswith("get") else "PUT"
            row = r.row(
                f"postgres_{op.lower()}_{item['instances']}",
                f"{op} throughput, 16 conns, {item['instances']} Nexus on PostgreSQL",
                "req/s",
                "higher",
            )
            row.add(SPIKE, item["throughput"])
            say(f"  {op} with {item['instances']} Nexus: {item['throughput']:,.0f} req/s, p99 {item['p99_ms']:.1f} ms")

    def profile_nexus(self, results_dir: Path, stamp: str) -> None:
        """py-spy on Nexus during a 16-connection GET run and a PUT run (outside the rounds)."""
        if shutil.which("py-spy", path=str(Path(sys.executable).parent)) is None:
            self.results.problem("py-spy is not installed in bench/.venv: no profile")
            return
        for op in ("get", "put"):
            raw = results_dir / f"{stamp}-profile-nexus-{op}16.txt"
            say(f"profiling Nexus with py-spy during a 16-connection {op.upper()} run -> {raw}")
            out = self.load(
                SPIKE, op, 16, max(self.s.load_seconds, 8.0), label=f"{op.upper()} 16 (profiled)", profile=raw
            )
            if out is not None and raw.exists():
                self.results.extra.setdefault("profile", {})[op] = {
                    "file": str(raw.relative_to(REPO)),
                    "throughput_while_profiled": out["throughput"],
                    **summarise_profile(raw),
                }


def snapshot_spike(src: Path) -> str:
    """Copy the spike package as it is now and run every spike process (and import spike) from the copy.

    Other engineers edit this work tree while benchmarks run; an editable install
    would let a restarted Nexus pick up a half-made change.  The copy fixes the code
    for the whole run.  Returns a SHA-256 over the copied files.
    """
    import hashlib

    shutil.copytree(REPO / "spike", src / "spike", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    digest = hashlib.sha256()
    for path in sorted((src / "spike").rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes())
    # Byte-compile the copy, as an installed package is: this environment may set
    # PYTHONDONTWRITEBYTECODE, and every restarted Nexus would compile spike from source.
    compileall.compile_dir(str(src / "spike"), quiet=1, workers=1)
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(src), os.environ.get("PYTHONPATH", "")) if x)
    # `python -m spike` puts the working directory first on sys.path: run from the repository, every
    # child would import the live spike/ (unfrozen, and compiled from source at each start when
    # PYTHONDONTWRITEBYTECODE is set) instead of this copy.  Safe-path mode (3.11+) leaves it out.
    os.environ["PYTHONSAFEPATH"] = "1"
    sys.path.insert(0, str(src))
    return digest.hexdigest()


def start_profiler(pid: int, output: Path, seconds: float) -> subprocess.Popen[bytes]:
    spy = str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate", "200",
         "--format", "raw", "--threads", "--nonblocking", "--output", str(output)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def summarise_profile(raw: Path, top: int = 25) -> dict[str, Any]:
    """Self time and inclusive time per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f and not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        total += n
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + n

    def pct(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "self_percent": pct(own), "inclusive_percent": pct(inclusive)}


# ---------------------------------------------------------------------- the table


def fmt(x: float | None, unit: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if unit in ("req/s", "ops/s"):
        return f"{x:,.0f}"
    if unit == "s":
        return f"{x:.3f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}"


def cell(stats: dict[str, Any] | None, unit: str) -> str:
    if not stats:
        return "-"
    if len(stats["values"]) == 1:
        return fmt(stats["median"], unit)
    return f"{fmt(stats['median'], unit)} ({fmt(stats['min'], unit)}-{fmt(stats['max'], unit)})"


def table(rows: list[dict[str, Any]]) -> list[list[str]]:
    out = [["row", "unit", "spike median (min-max)", "peer median (min-max)", "spike/peer", "target", "met?"]]
    for row in rows:
        peer = cell(row[BAO], row["unit"])
        if row[BAO] and row["peer"] != "OpenBao":
            peer += f" [{row['peer']}]"
        met = {True: "yes", False: "NO", None: "-" if not row["target"] else "n/a"}[row["met"]]
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
        mine = cell(row[SPIKE], row["unit"]) if row[SPIKE] else row.get("skipped") or "-"
        out.append([row["row"], row["unit"], mine, peer, ratio, row["target"] or "", met])
    return out


def render_text(cells: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in cells[0]) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in cells[1:]]
    return "\n".join(lines)


def markdown_report(report: dict[str, Any], cells: list[list[str]]) -> str:
    """What docs/benchmarks.md's results take, pasted as is: the run's heading, its facts, the table, its problems."""
    m = report["machine"]
    started = dt.datetime.fromisoformat(report["started"])
    dirty = " plus uncommitted changes" if report["spike_work_tree_changes"] else ""
    loads = ["/".join(f"{x:.2f}" for x in m[k]) for k in ("load_average_at_start", "load_average_at_end")]
    lines = [
        f"### {'Quick' if report['settings']['quick'] else 'Full'} run: {started:%Y-%m-%d %H:%M} UTC",
        "",
        "```sh",
        report["command"],
        "```",
        "",
        f"- spike commit `{report['spike_commit'][:12]}`{dirty} (snapshot sha256 "
        f"`{report['spike_snapshot_sha256'][:12]}`); {report['status']} in {report['seconds'] / 60:.1f} min.",
        f"- Machine: {m['cpu_model']}, {m['cores']} cores ({m['usable_cores']} usable), Python {m['python']}, "
        f"{report['extra'].get('openbao_version', 'OpenBao ?').split(' (')[0]}"
        + (f", binary: {report['extra']['binary_version']}" if report["extra"].get("binary_version") else "")
        + ".",
        f"- Load average (1/5/15 min) at the start {loads[0]}, at the end {loads[1]}; busiest processes at the "
        f"start: {m['busiest_processes_at_start'] or '?'}.",
        "",
        render_markdown(cells),
        "",
    ]
    if report["problems"]:
        lines += [f"Problems during the run ({len(report['problems'])}, all in the JSON):", ""]
        lines += [f"- {p}" for p in report["problems"][:20]] + [""]
    return "\n".join(lines)


def list_groups() -> str:
    lines = []
    for group in GROUPS:
        lines.append(f"{group:9} {GROUP_NOTES[group]}")
        if group == "user":
            lines += [f"          row {spec.key}: {spec.label}" for spec in user_rows.ROWS]
    return "\n".join(lines)


# ---------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="bench/run", description="spike vs OpenBao, side by side (see docs/benchmarks.md)"
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run: 1 round, a few seconds per row")
    parser.add_argument("--list", action="store_true", help="list the groups (and the user group's rows); run nothing")
    parser.add_argument(
        "--rounds", type=int, help="rounds per row (default 3, user group 5 and 9; --quick: 1, user group 1 and 3)"
    )
    parser.add_argument(
        "--seconds", type=float, help="seconds per load run (default 4 sequential, 5 concurrent; --quick: 1.5)"
    )
    parser.add_argument("--secrets", type=int, default=1000, help="secrets seeded before the rows (default 1000)")
    parser.add_argument("--big", type=int, help="secrets stored for the scale row (default 100000; --quick: 5000)")
    parser.add_argument("--poll-counts", help="keeper counts for the polling row (default 3,10,100,1000)")
    parser.add_argument("--rotation-counts", help="keeper counts for the rotation rows (default 3,10,100)")
    parser.add_argument("--only", help=f"comma-separated groups to run: {','.join(GROUPS)}")
    parser.add_argument("--profile", action="store_true", help="also py-spy Nexus under GET and PUT load")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    parser.add_argument(
        "--binary",
        "--nexus-binary",
        dest="nexus_binary",
        type=Path,
        metavar="PATH",
        help="also measure the single binary (dist/spike): the restart rows and the user group's binary rows",
    )
    parser.add_argument("--out", type=Path, help="where to write the JSON (default bench/results/<timestamp>.json)")
    args = parser.parse_args()
    if args.list:
        print(list_groups())
        return 0
    settings = Settings.from_args(args)

    started = dt.datetime.now(dt.UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ") + ("-quick" if settings.quick else "")
    results_dir = HERE / "results"
    results_dir.mkdir(exist_ok=True)
    out_path = args.out or results_dir / f"{stamp}.json"
    command = "bench/run" + ("".join(f" {shlex.quote(a)}" for a in sys.argv[1:]))
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    machine = machine_info()
    say(f"{command}: spike {commit[:12]}{' (work tree has changes)' if dirty else ''} on {machine['cpu_model']}, "
        f"{machine['cores']} cores, load average {machine['load_average_at_start'][0]:.2f}")  # fmt: skip

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    workdir = Path(tempfile.mkdtemp(prefix="spike-bench-"))
    snapshot = snapshot_spike(workdir / "src")
    say(f"measuring a snapshot of {REPO / 'spike'} taken now (sha256 {snapshot[:12]}), not later edits")
    suite = Suite(settings, workdir)
    if settings.nexus_binary:  # a binary left in dist/ from older code would be measured as this code
        stale = user_rows.binary_staleness(settings.nexus_binary, commit)
        suite.results.extra["binary_version"] = stale.version
        if stale.problem:
            suite.results.problem(stale.problem)
    status = "complete"
    try:
        suite.start_systems()
        suite.seed(0, settings.secrets)
        suite.memory_idle()
        if "load" in settings.groups:
            suite.load_rows()
        if "restart" in settings.groups:
            suite.restart_rows()
        if "user" in settings.groups:
            user_rows.run(suite, say)
        if "reseed" in settings.groups:
            suite.reseed_rows()
        if "shamir" in settings.groups:
            suite.shamir_rows()
        if "polling" in settings.groups:
            suite.polling_rows()
        if settings.profile:
            suite.profile_nexus(results_dir, stamp)
        if "rotation" in settings.groups:
            suite.rotation_rows(settings.secrets)
        if "scale" in settings.groups:
            suite.scale_rows()
        if "rotation" in settings.groups:
            suite.rotation_big_rows()
        if "postgres" in settings.groups:
            suite.postgres_rows()
    except KeyboardInterrupt:
        status = "interrupted"
        say("interrupted: stopping everything this run started")
    except Exception as exc:
        status = f"failed: {exc}"
        suite.results.problem(f"the run stopped early: {exc}")
        traceback.print_exc()
    finally:
        suite.procs.stop_all()
        if settings.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = [row.summary() for row in suite.results.rows.values()]
    finished = dt.datetime.now(dt.UTC)
    machine["load_average_at_end"] = os.getloadavg()
    report = {
        "command": command,
        "status": status,
        "started": started.isoformat(),
        "finished": finished.isoformat(),
        "seconds": (finished - started).total_seconds(),
        "spike_commit": commit,
        "spike_work_tree_changes": dirty.splitlines(),
        "spike_snapshot_sha256": snapshot,
        "machine": machine,
        "settings": {k: (sorted(v) if isinstance(v, set) else v) for k, v in settings.__dict__.items()},
        "rows": rows,
        "problems": suite.results.problems,
        "extra": suite.results.extra,
        "runs": suite.results.runs,
    }
    out_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    cells = table(rows)
    print(render_text(cells), file=sys.stderr)  # the terminal's view; standard output gets the Markdown
    md = out_path.with_suffix(".md")
    md.write_text(markdown_report(report, cells))
    print(markdown_report(report, cells), end="")
    say(f"{status}: {len(rows)} rows in {report['seconds']:.0f}s; JSON in {out_path}, Markdown (as printed) in {md}")
    return 0 if status == "complete" else 1


if __name__ == "__main__":
    sys.exit(main())
