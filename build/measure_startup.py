"""Start-up time of a `spike` executable: `spike --version`, a keeper from start to listening, and
`spike dev-identity` (a command that loads cryptography, which the binary unpacks on first import).

    python3 build/measure_startup.py dist/spike .venv/bin/spike --runs 10
    .venv/bin/python build/measure_startup.py dist/spike --workload-api

`--workload-api` adds a keeper that takes its SVID from a SPIFFE Workload API (the test suite's, from
tests/identity/workload_api.py: run it with the test venv's interpreter), which loads gRPC and cryptography.

For each executable, each measurement runs `--runs` times and prints the median and the range
of the wall time, and the median CPU time (user + system, the executable and its children):
CPU time barely moves when other work shares the machine, wall time does.  "Listening" is the
first moment a TCP connection to the keeper's port succeeds (polled every 2 ms).  Standard
library only; the keeper's SVID is minted with the first executable's `spike dev-identity`.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRUST_DOMAIN = "spike.test"


def _cpu(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_version(spike: str) -> tuple[float, float]:
    start = time.perf_counter()
    process = subprocess.Popen([spike, "--version"], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{spike} --version exited with {process.returncode}")
    return wall, _cpu(usage)


def _run_dev_identity(spike: str, where: Path) -> tuple[float, float]:
    out = Path(tempfile.mkdtemp(dir=where))
    start = time.perf_counter()
    process = subprocess.Popen([spike, "dev-identity", "--dir", str(out / "id")], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{spike} dev-identity exited with {process.returncode}")
    return wall, _cpu(usage)


def _run_keeper(spike: str, env: dict[str, str]) -> tuple[float, float]:
    port = _free_port()
    start = time.perf_counter()
    process = subprocess.Popen(
        [spike, "keeper", "--listen", f"127.0.0.1:{port}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if process.poll() is not None:
                raise SystemExit(f"{spike} keeper exited with {process.returncode}") from None
            time.sleep(0.002)
    wall = time.perf_counter() - start
    process.send_signal(signal.SIGTERM)
    _, _status, usage = os.wait4(process.pid, 0)
    process.returncode = 0
    return wall, _cpu(usage)  # CPU includes the short shutdown


def _report(name: str, samples: list[tuple[float, float]]) -> None:
    walls = [w * 1000 for w, _ in samples]
    cpus = [c * 1000 for _, c in samples]
    print(
        f"  {name:<28} median {statistics.median(walls):6.0f} ms wall "
        f"(range {min(walls):.0f}-{max(walls):.0f}), median {statistics.median(cpus):6.0f} ms CPU"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spike", nargs="+", help="spike executables to measure")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--workload-api", action="store_true", help="also a keeper on a (test) Workload API")
    args = parser.parse_args()
    spikes = [str(Path(s).resolve()) if os.sep in s else s for s in args.spike]
    with tempfile.TemporaryDirectory() as tmp:
        identity = Path(tmp) / "id"
        made = [spikes[0], "dev-identity", "--dir", str(identity), "--trust-domain", TRUST_DOMAIN]
        subprocess.run(made, check=True, stdout=subprocess.DEVNULL)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SPIKE_")},
            "SPIKE_SVID_CERT": str(identity / "keeper-1.pem"),
            "SPIKE_SVID_KEY": str(identity / "keeper-1-key.pem"),
            "SPIKE_SVID_BUNDLE": str(identity / "bundle.pem"),
            "SPIKE_TRUST_ROOT": TRUST_DOMAIN,
            "SPIKE_LOG_LEVEL": "warning",
        }
        print(f"{args.runs} runs each, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
        for spike in spikes:
            print(f"{spike}:")
            _run_version(spike)  # one warm-up run: page cache
            _report("spike --version", [_run_version(spike) for _ in range(args.runs)])
            _report("spike keeper -> listening", [_run_keeper(spike, env) for _ in range(args.runs)])
            _report("spike dev-identity", [_run_dev_identity(spike, Path(tmp)) for _ in range(args.runs)])
        if args.workload_api:
            _workload_api(spikes, identity, args.runs)
    return 0


def _workload_api(spikes: list[str], identity: Path, runs: int) -> None:
    root = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(root), str(root / "tests" / "identity")]
    from workload_api import TestCa, WorkloadApi

    from spike.app.commands.devca import DevIdentity
    from spike.protocol.identity import Role, TrustDomains

    api = WorkloadApi(TestCa.of(DevIdentity(identity, TRUST_DOMAIN)))
    try:
        api.add("keeper-1", str(TrustDomains.single(TRUST_DOMAIN).id_of(Role.KEEPER, 1)))
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("SPIKE_", "SPIFFE_"))},
            "SPIFFE_ENDPOINT_SOCKET": api.address("keeper-1"),
            "SPIKE_TRUST_ROOT": TRUST_DOMAIN,
            "SPIKE_LOG_LEVEL": "warning",
        }
        for spike in spikes:
            print(f"{spike}:")
            _report("keeper (Workload API)", [_run_keeper(spike, env) for _ in range(runs)])
    finally:
        api.close()


if __name__ == "__main__":
    sys.exit(main())
