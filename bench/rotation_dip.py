"""Is there a dip?  GET (or PUT) throughput with root key rotations going on, in alternating pairs.

One spike deployment (three keepers, Nexus on SQLite, keepers polled every second,
1,000 secret paths), then `--pairs` pairs of closed-loop runs of `--seconds` each with
16 connections: one without rotations, one with rotations back to back (each asked
for as `spike operator rotate` does, and followed to its commit), alternating, so
that a machine getting busier or quieter weighs on both alike.  Both runs read
Nexus's status four times a second (the rotations are followed that way), so only
the rotations differ.  Prints one line per run (throughput, p99, Nexus CPU per
request, rotations committed) and the mean and median of each side.

    bench/.venv/bin/python bench/rotation_dip.py --pairs 6 --seconds 6 [--op get|put]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import loadgen  # noqa: E402
from loadgen import Paths  # noqa: E402
from systems import Http, Processes, SpikeDeployment, cpu_seconds  # noqa: E402


def follow(deployment: SpikeDeployment, stop: threading.Event, done: list[int], rotate: bool) -> None:
    http = Http(deployment.nexus_port, deployment.pilot_ctx, timeout=30.0)
    try:
        while not stop.is_set():
            before = deployment.status(http)
            if rotate and before and before.get("rotation") is None:
                code, body = http.json("POST", "/v1/operator/rotate", {})
                if code != 200:
                    raise RuntimeError(f"rotate answered HTTP {code}: {body}")
                while not stop.is_set():
                    stop.wait(0.25)
                    now = deployment.status(http)
                    if now and now["epoch"] > before["epoch"] and now.get("rotation") is None:
                        done.append(1)
                        break
            else:
                stop.wait(0.25)
    finally:
        http.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/rotation_dip.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--op", choices=["get", "put"], default="get")
    args = parser.parse_args()
    procs = Processes()
    results: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="spike-dip-") as tmp:
        deployment = SpikeDeployment(procs, Path(tmp), poll_interval=1.0)
        try:
            deployment.start()
            deployment.bootstrap()
            deployment.wait_ready()
            loadgen.run(deployment.target(), "put-spike", 8, 1, 5.0, Paths(1000))  # every path written, most often
            assert deployment.nexus is not None
            for n in range(2 * args.pairs):
                rotate = (n % 2 == 1) if (n // 2) % 2 == 0 else (n % 2 == 0)
                stop, done = threading.Event(), []
                watcher = threading.Thread(target=follow, args=(deployment, stop, done, rotate))
                watcher.start()
                cpu0, t0 = cpu_seconds(deployment.nexus.pid), time.monotonic()
                out = loadgen.run(deployment.target(), f"{args.op}-spike", 16, 2, args.seconds, Paths(1000))
                cpu = cpu_seconds(deployment.nexus.pid) - cpu0
                stop.set()
                watcher.join(timeout=60)
                per_request = 1000 * cpu / out["requests"]
                results[rotate].append((out["throughput"], out["p99_ms"], per_request))
                side = "rotating" if rotate else "steady  "
                print(
                    f"{side} {out['throughput']:7.0f} req/s  p99 {out['p99_ms']:6.1f} ms  cpu {per_request:.3f} ms/req"
                    f"  rotations {len(done)}  ({time.monotonic() - t0:.1f}s)",
                    flush=True,
                )
        finally:
            procs.stop_all()
    for rotate, runs in results.items():
        throughput = [r[0] for r in runs]
        print(
            f"{'rotating' if rotate else 'steady  '}: throughput mean {statistics.mean(throughput):.0f}, median "
            f"{statistics.median(throughput):.0f}; p99 median {statistics.median(r[1] for r in runs):.1f} ms; "
            f"cpu per request median {statistics.median(r[2] for r in runs):.3f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
