"""Benchmark rows: throughput of one versus two Nexus instances on one PostgreSQL.

A throwaway PostgreSQL cluster on loopback (fsync on, as deployed), three
keepers and two Nexus processes on it (tests/e2e/harness.py starts them as the
end-to-end tests do), bootstrapped once.  For each request kind, the same
closed-loop load (bench/loadgen.py, `--connections` in total) goes first to
instance 1 alone, then is split evenly between instances 1 and 2.  Every
process runs on this one machine: on a small one the load generator, both
Nexus processes and PostgreSQL share the same cores, so the second instance
adds throughput only as far as there are cores left for it.

    .venv/bin/python bench/postgres_rows.py --seconds 10 --connections 16 [--json out.json]

Prints one table row per (request kind, instances) and, with --json, writes
the rows with the machine's core count.  Needs PostgreSQL's server binaries
(Debian: apt-get install postgresql).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]

import loadgen  # noqa: E402
import pg_server  # noqa: E402
from harness import Cluster  # noqa: E402

from spike.app.commands.devca import mint_dev_identity  # noqa: E402


def target(cluster: Cluster, index: int) -> loadgen.Target:
    files = cluster.identity.files("pilot-superuser")
    return loadgen.Target(
        "127.0.0.1", cluster.nexus_ports[index], str(files.cert), str(files.key), str(files.bundle), None
    )


def split_load(
    cluster: Cluster,
    indices: list[int],
    kind: str,
    connections: int,
    seconds: float,
    paths: int,
    *,
    on_start: Callable[[], None] = lambda: None,
) -> list[dict[str, Any]]:
    """The same total load split evenly over these instances at once: each instance's load generator result
    (`on_start`: called by each of them once its connections are open)."""
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    share = connections // len(indices)

    def one(index: int) -> None:
        try:
            results.append(
                loadgen.run(target(cluster, index), kind, share, max(1, share // 8), seconds, paths, on_start=on_start)
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in indices]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def load(cluster: Cluster, instances: int, kind: str, connections: int, seconds: float, paths: int) -> dict[str, Any]:
    """The same total load, split evenly over `instances` Nexus instances at once."""
    results = split_load(cluster, list(range(1, instances + 1)), kind, connections, seconds, paths)
    requests = sum(int(r["requests"]) for r in results)
    seconds_taken = max(float(r["seconds"]) for r in results)
    return {
        "request": kind,
        "instances": instances,
        "connections": connections,
        "requests": requests,
        "errors": sum(int(r["errors"]) for r in results),
        "throughput": requests / seconds_taken if seconds_taken else 0.0,
        "p50_ms": max(float(r["p50_ms"]) for r in results),
        "p99_ms": max(float(r["p99_ms"]) for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--paths", type=int, default=1000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    bindir = pg_server.find_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL's server binaries are missing (apt-get install postgresql)")
    server = pg_server.PgServer(bindir, durable=True)
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="spike-bench-pg-") as tmp:
            root = Path(tmp)
            identity = mint_dev_identity(root / "id", "spike.test", range(1, 4))
            cluster = Cluster(identity, root / "cluster", database_url=server.url(), nexus_count=2, poll_interval=5.0)
            try:
                cluster.start()
                result = cluster.bootstrap()
                if result.returncode != 0:
                    raise SystemExit(f"bootstrap failed: {result}")
                cluster.wait_ready(nexus=1, timeout=60)
                cluster.wait_ready(nexus=2, timeout=60)
                seed = loadgen.Paths(args.paths, seed_range=(0, args.paths))
                loadgen.run(target(cluster, 1), "put-spike", 8, 1, 120.0, seed)
                for kind in ("get-spike", "put-spike"):
                    for instances in (1, 2):
                        row = load(cluster, instances, kind, args.connections, args.seconds, args.paths)
                        rows.append(row)
                        print(
                            f"| PostgreSQL, {instances} Nexus | {kind} | {args.connections} conns | "
                            f"{row['throughput']:,.0f} req/s | p50 {row['p50_ms']:.2f} ms | "
                            f"p99 {row['p99_ms']:.2f} ms | errors {row['errors']} |",
                            flush=True,
                        )
            finally:
                cluster.close()
    finally:
        server.close()
    if args.json:
        args.json.write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
