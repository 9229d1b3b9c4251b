"""Where a restarted Nexus's time goes, from exec to the first successful GET (issue 20).

The suite's restart row (bench/suite.py, group ``restart``) gives one number; this
splits it.  It starts 3 keepers and a Nexus (SQLite, 2-of-3) as the suite does,
bootstraps, then `--rounds` times kills Nexus with SIGKILL, starts it again and
records, from the spawn:

* **listening**: the first TCP connection to Nexus's port that succeeds (polled
  every 2 ms), and the time of its "Nexus listening" log line;
* **ready**: the log line "Nexus is ready" (the root key rebuilt from keepers);
* **first GET**: the first GET of a seeded secret that answers 200 (a fresh TLS
  connection each try, as the suite's row).

Beside it, with the same interpreter: a bare `python -c pass` (the interpreter's
own start), and `--importtime` runs of Nexus under `python -X importtime`, which
list what a start imports (every module, lazy ones included) with the total and
the largest modules (cumulative).  Medians with min-max; the machine's load is printed.

    bench/.venv/bin/python bench/startup_trace.py --rounds 7 [--importtime 3] [--binary dist/spike] [--against REV]
    bench/.venv/bin/python bench/startup_trace.py --rounds 7 --binary dist/spike --against-binary /tmp/old-spike

`--binary dist/spike` starts Nexus as the single binary (`dist/spike nexus ...`;
keepers and bootstrap stay on the interpreter); the bare-interpreter and
importtime rows are then skipped.  `--against REV` (interpreter only) restarts,
in alternate rounds on the same keepers and store, a Nexus running the spike/ of
git revision REV, and prints both with the difference of the medians: a
before/after under the same load; `--against-binary PATH` does the same for two
builds of the single binary (with `--binary`).  Like the suite, it runs a byte-compiled
snapshot of this work tree's spike/ (PYTHONPATH), not the copy installed in
bench/.venv.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import datetime as dt
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from suite import REPO, snapshot_spike
from systems import Http, Processes, SpikeDeployment, descendants, kill9, port_open, probe_get

_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_IMPORT = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def _log_moment(log: Path, needle: str) -> float | None:
    """The wall-clock time of the first line of a text-format log that contains `needle`."""
    for line in log.read_text(errors="replace").splitlines():
        if needle in line and (m := _LOG_TIME.match(line)):
            return dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def _cpu_seconds(pid: int) -> float:
    """CPU time of a process, all its threads, in ns from schedstat (/proc/<pid>/stat counts 10 ms ticks)."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(stat.read_text().split()[0])
    return total / 1e9


def _restart(spike: SpikeDeployment, deadline: float = 60.0) -> dict[str, float]:
    assert spike.nexus is not None
    kill9(spike.nexus)
    target = spike.target()
    wall0, t0 = time.time(), time.monotonic()
    popen = spike.spawn_nexus()
    log = spike.logs / f"nexus.{spike._incarnations['nexus']}.log"
    listening = None
    while listening is None:
        if popen.poll() is not None:
            raise RuntimeError(f"Nexus exited with {popen.returncode}; see {log}")
        if port_open(spike.nexus_port, 0.05):
            listening = time.monotonic() - t0
            # Steadier than wall time on a busy machine; the binary's Nexus is its bootloader's child.
            cpu = sum(_cpu_seconds(pid) for pid in (popen.pid, *descendants(popen.pid)))
        elif time.monotonic() - t0 > deadline:
            raise RuntimeError("Nexus did not listen")
        else:
            time.sleep(0.002)
    while not probe_get(target, "get-spike", 1, timeout=0.25):
        if time.monotonic() - t0 > deadline:
            raise RuntimeError("no successful GET")
        time.sleep(0.002)
    first_get = time.monotonic() - t0
    spike.wait_ready()
    out = {"listening": listening, "cpu_listening": cpu, "first_get": first_get}
    for key, needle in (("log_listening", "Nexus listening on"), ("log_ready", "Nexus is ready")):
        moment = _log_moment(log, needle)
        if moment is not None:
            out[key] = moment - wall0
    return out


def _seed(spike: SpikeDeployment) -> None:
    """The secret the GETs read (bench/s1, as the suite's restart row reads it)."""
    http = Http(spike.nexus_port, spike.pilot_ctx)
    try:
        code, _ = http.json("POST", "/v1/store/secrets", {"path": "bench/s1", "values": {"value": "v"}})
    finally:
        http.close()
    if code != 200:
        raise RuntimeError(f"seeding bench/s1 answered {code}")


def _bare_python(python: str, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        t0 = time.monotonic()
        subprocess.run([python, "-c", "pass"], check=True)
        times.append(time.monotonic() - t0)
    return times


def _importtime(spike: SpikeDeployment, launch: Launch) -> dict[str, int]:
    """Restart Nexus under `-X importtime`: microseconds per module (cumulative) from its log."""
    launch.nexus = [launch.python, "-X", "importtime", "-m", "spike"]
    try:
        _restart(spike)
    finally:
        launch.nexus = None
    log = spike.logs / f"nexus.{spike._incarnations['nexus']}.log"
    cumulative: dict[str, int] = {}
    for line in log.read_text(errors="replace").splitlines():
        if m := _IMPORT.match(line):
            cumulative[m.group(4)] = int(m.group(2))
            if len(m.group(3)) == 1:  # a top-level import: its cumulative time counts once in the total
                cumulative["(total)"] = cumulative.get("(total)", 0) + int(m.group(2))
    return cumulative


class Launch:
    """How Nexus is started: `python -m spike nexus ...` as the suite does, or `<argv> nexus ...`."""

    def __init__(self, procs: Processes, python: str) -> None:
        self.python = python
        self.nexus: list[str] | None = None
        spawn = procs.spawn

        def spawn_nexus_as_told(argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
            if self.nexus is not None and argv[1:4] == ["-m", "spike", "nexus"]:
                argv = [*self.nexus, *argv[3:]]
            return spawn(argv, **kwargs)  # type: ignore[arg-type]

        procs.spawn = spawn_nexus_as_told  # type: ignore[method-assign]


def _export(rev: str, where: Path) -> Path:
    """spike/ as it was at `rev`, byte-compiled as the snapshot is: the directory for PYTHONPATH."""
    where.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "spike"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    compileall.compile_dir(str(where / "spike"), quiet=1, workers=1)
    return where


@contextlib.contextmanager
def _pythonpath(path: Path) -> Iterator[None]:
    """Processes started inside import spike from `path` (SpikeDeployment copies the environment at each start)."""
    saved = os.environ["PYTHONPATH"]
    os.environ["PYTHONPATH"] = str(path)
    try:
        yield
    finally:
        os.environ["PYTHONPATH"] = saved


def _summary(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values) * 1000:6.1f} ms ({min(values) * 1000:.1f}-{max(values) * 1000:.1f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--importtime", type=int, default=0, metavar="N", help="N extra restarts under -X importtime")
    parser.add_argument("--binary", metavar="PATH", help="start Nexus as `PATH nexus ...` (e.g. dist/spike)")
    parser.add_argument("--against", metavar="REV", help="alternate rounds with spike/ at git REV")
    parser.add_argument("--against-binary", metavar="PATH", help="with --binary: alternate rounds with this binary")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="spike-startup-"))
    snapshot = snapshot_spike(work / "src")  # this work tree's spike/, byte-compiled, as the suite runs it
    nexus = args.binary or f"{sys.executable} -m spike"
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; Nexus: {nexus} (sha256 {snapshot[:12]})")
    if args.binary and args.against:
        parser.error("--against compares interpreted starts: leave out --binary (or use --against-binary)")
    if args.against_binary and not args.binary:
        parser.error("--against-binary needs --binary")
    against = _export(args.against, work / "against") if args.against else work
    procs = Processes()
    launch = Launch(procs, sys.executable)
    if args.binary:
        launch.nexus = [str(Path(args.binary).resolve())]
    spike = SpikeDeployment(procs, work)
    try:
        spike.start()
        spike.bootstrap()
        spike.wait_ready()
        _seed(spike)
        rounds, before = [], []
        for _ in range(args.rounds):
            rounds.append(_restart(spike))
            if args.against:
                with _pythonpath(against):
                    before.append(_restart(spike))
            elif args.against_binary:
                launch.nexus = [str(Path(args.against_binary).resolve())]
                before.append(_restart(spike))
                launch.nexus = [str(Path(args.binary).resolve())]
        imports = [] if args.binary else [_importtime(spike, launch) for _ in range(args.importtime)]
        bare = [] if args.binary else _bare_python(sys.executable, args.rounds)
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"after the runs: load average {os.getloadavg()[0]:.2f}")
    print(f"{'bare interpreter (python -c pass)':42} {_summary(bare)}")
    if before:
        now_label = args.binary if args.against_binary else "this work tree"
        print(f"{'':42} {now_label:30} {args.against or args.against_binary:30} difference of medians")
    for key, label in (
        ("log_listening", "spawn -> 'Nexus listening' log line"),
        ("listening", "spawn -> port accepts a connection"),
        ("log_ready", "spawn -> 'Nexus is ready' (key rebuilt)"),
        ("first_get", "spawn -> first successful GET"),
        ("cpu_listening", "Nexus's CPU time (user+sys) at listening"),
    ):
        now = [r[key] for r in rounds if key in r]
        line = f"{label:42} {_summary(now):30}"
        if before:
            then = [r[key] for r in before if key in r]
            change = (statistics.median(now) - statistics.median(then)) * 1000 if now and then else math.nan
            line += f" {_summary(then):30} {change:+.1f} ms"
        print(line)
    if imports:
        total = statistics.median(i.get("(total)", 0) for i in imports) / 1e6
        print(
            f"\nimports under -X importtime (inflated by the tracing), median of {len(imports)}: {total * 1000:.1f} ms"
        )
        names = {name for i in imports for name in i if name != "(total)"}
        medians = {n: statistics.median(i.get(n, 0) for i in imports) for n in names}
        top = sorted(medians.items(), key=lambda kv: -kv[1])[:40]
        for name, us in top:
            print(f"  {us / 1000:7.1f} ms  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
