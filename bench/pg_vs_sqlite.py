"""GET (and PUT) throughput of Nexus on PostgreSQL against Nexus on SQLite, in one run, alternating.

Starts one throwaway PostgreSQL (fsync on), one SQLite cluster (one Nexus)
and one PostgreSQL cluster (two Nexus instances), seeds both stores with the
same paths, then runs rounds: in each round every configuration gets the same
closed-loop load (bench/loadgen.py) one after the other, so a noisy machine
hits them alike; the table gives each configuration's median over the rounds
and the ratios of the medians.

Configurations (``--configs``; ``--kinds`` picks the request kinds):

* ``sqlite``: one Nexus on SQLite;
* ``pg1``: instance 1 of the PostgreSQL cluster alone;
* ``pg2``: the same load split evenly over instances 1 and 2;
* ``pgbase1``/``pgbase2``, ``pgalt1``/``pgalt2``: the same on the clusters
  of ``--base`` and ``--alt``.

``--pin`` pins with taskset: PostgreSQL (the postmaster and every backend)
on CPU 0 and every Nexus on CPU 1; the load generator is not pinned.  On a
two-core machine the two PostgreSQL-mode instances then share CPU 1 (there is
no third core to give the second one), so ``pg2`` measures what a second
instance adds on the same core, not what a second machine would add.

``--base DIR``: a checkout whose ``spike`` package the PostgreSQL cluster
``pgbase`` runs (a second PostgreSQL cluster on the same server, its own
schema), for an A/B of a code change in the same run; ``--alt DIR`` the same
for a third cluster, ``pgalt``.  Each load also gives the CPU time per
request of the Nexus instances and of PostgreSQL (all its processes): on a
shared machine these move less than throughput does.

    .venv/bin/python bench/pg_vs_sqlite.py --rounds 5 --seconds 5 --connections 16 [--pin] [--base /tmp/base]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]

import loadgen  # noqa: E402
import pg_server  # noqa: E402
from harness import Cluster  # noqa: E402
from postgres_rows import split_load, target  # noqa: E402

from spike.app.commands.devca import mint_dev_identity  # noqa: E402


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def load(
    cluster: Cluster, indices: list[int], kind: str, connections: int, seconds: float, paths: int, db_pid: int
) -> tuple[float, float, float]:
    """The same total load split evenly over these instances at once: requests per second, and the CPU time
    per request of the Nexus instances and of PostgreSQL (every process of the server, in microseconds)."""
    nexus = [cluster.nexus(i).popen.pid for i in indices]
    marks: dict[str, float] = {}
    started = threading.Barrier(
        len(indices),
        action=lambda: marks.update(
            nexus=cpu_seconds(nexus), db=cpu_seconds(descendants(db_pid)) if cluster.database_url else 0.0
        ),
    )
    results = split_load(cluster, indices, kind, connections, seconds, paths, on_start=started.wait)
    if any(int(r["errors"]) for r in results):
        raise RuntimeError(f"errors under load: {results}")
    nexus_cpu = cpu_seconds(nexus) - marks["nexus"]
    db_cpu = (cpu_seconds(descendants(db_pid)) - marks["db"]) if cluster.database_url else 0.0
    requests = sum(int(r["requests"]) for r in results)
    return requests / max(float(r["seconds"]) for r in results), nexus_cpu / requests * 1e6, db_cpu / requests * 1e6


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def pin(pids: list[int], cpus: str) -> None:
    for pid in pids:
        subprocess.run(["taskset", "-a", "-cp", cpus, str(pid)], capture_output=True, check=False)


def report(
    kind: str, by_config: dict[str, list[float]], cpu: dict[str, list[tuple[float, float]]], args: argparse.Namespace
) -> None:
    medians = {c: statistics.median(v) for c, v in by_config.items()}
    pinned = " (pinned: PostgreSQL CPU 0, every Nexus CPU 1)" if args.pin else ""
    print(f"\n{kind}, {args.connections} connections, median of {args.rounds} rounds{pinned}:")
    for c, m in medians.items():
        nexus_us = statistics.median(n for n, _ in cpu[c])
        db_us = statistics.median(d for _, d in cpu[c])
        print(
            f"  {c:8s} {m:8,.0f} req/s  CPU per request: Nexus {nexus_us:4.0f} us, PostgreSQL {db_us:3.0f} us  "
            f"(rounds: {', '.join(f'{x:,.0f}' for x in by_config[c])})"
        )
    ratios = [(c, "sqlite") for c in medians if c != "sqlite"]
    ratios += [("pg2", "pg1"), ("pgbase2", "pgbase1"), ("pg1", "pgbase1"), ("pg2", "pgbase2"), ("pgalt1", "pg1")]
    for top, bottom in ratios:
        if top in medians and bottom in medians:
            print(f"  {top}/{bottom} = {medians[top] / medians[bottom]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--paths", type=int, default=1000)
    parser.add_argument("--kinds", default="get-spike")
    parser.add_argument("--configs", default="sqlite,pg1,pg2")
    parser.add_argument("--pin", action="store_true")
    parser.add_argument("--base", type=Path, help="a checkout the configurations pgbase1/pgbase2 run")
    parser.add_argument("--alt", type=Path, help="another checkout, for the configurations pgalt1/pgalt2")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    configs = args.configs.split(",")
    # Every child imports spike/ from PYTHONPATH: this tree's (the sqlite and pg clusters, keepers, the CLI),
    # or --base's and --alt's for those clusters' Nexus.  `python -m spike` would put the working directory
    # first on sys.path (run from a checkout, every cluster would import that checkout, whatever PYTHONPATH
    # says: until 2026-12-06 the --base/--alt A/Bs run from a checkout compared that checkout with itself);
    # safe-path mode leaves it out.
    os.environ["PYTHONSAFEPATH"] = "1"
    os.environ["PYTHONPATH"] = str(ROOT)
    bindir = pg_server.find_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL's server binaries are missing (apt-get install postgresql)")
    server = pg_server.PgServer(bindir, durable=True)
    clusters: dict[str, Cluster] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="spike-bench-pgsq-") as tmp:
            root = Path(tmp)
            identity = mint_dev_identity(root / "id", "spike.test", range(1, 4))
            clusters["sqlite"] = Cluster(identity, root / "sqlite", poll_interval=5.0)
            clusters["pg"] = Cluster(
                identity, root / "pg", database_url=server.database("cur"), nexus_count=2, poll_interval=5.0
            )
            for name, checkout in (("pgbase", args.base), ("pgalt", args.alt)):
                if checkout is not None:
                    clusters[name] = Cluster(
                        identity,
                        root / name,
                        database_url=server.database(name),
                        nexus_count=2,
                        poll_interval=5.0,
                        nexus_env={"PYTHONPATH": str(checkout.resolve())},
                    )
            try:
                for cluster in clusters.values():
                    cluster.start()
                    result = cluster.bootstrap()
                    if result.returncode != 0:
                        raise SystemExit(f"bootstrap failed: {result}")
                    for i in range(1, cluster.nexus_count + 1):
                        cluster.wait_ready(nexus=i, timeout=60)
                    loadgen.run(
                        target(cluster, 1),
                        "put-spike",
                        8,
                        1,
                        120.0,
                        loadgen.Paths(args.paths, seed_range=(0, args.paths)),
                    )
                if args.pin:
                    pgpid = int((server.data / "postmaster.pid").read_text().split()[0])
                    pin(descendants(pgpid), "0")
                    for cluster in clusters.values():
                        for i in range(1, cluster.nexus_count + 1):
                            pin([cluster.nexus(i).popen.pid], "1")
                plans = {"sqlite": ("sqlite", [1]), "pg1": ("pg", [1]), "pg2": ("pg", [1, 2])}
                plans |= {"pgbase1": ("pgbase", [1]), "pgbase2": ("pgbase", [1, 2])}
                plans |= {"pgalt1": ("pgalt", [1]), "pgalt2": ("pgalt", [1, 2])}
                results: dict[str, dict[str, list[float]]] = {}
                cpu: dict[str, dict[str, list[tuple[float, float]]]] = {}
                db_pid = int((server.data / "postmaster.pid").read_text().split()[0])
                for kind in args.kinds.split(","):
                    results[kind] = {c: [] for c in configs}
                    cpu[kind] = {c: [] for c in configs}
                    for r in range(args.rounds):
                        order = configs if r % 2 == 0 else configs[::-1]
                        for config in order:
                            name, indices = plans[config]
                            if args.pin:  # backends started since (the pool's reconnections) go to CPU 0 as well
                                pin(descendants(db_pid), "0")
                            rate, nexus_us, db_us = load(
                                clusters[name], indices, kind, args.connections, args.seconds, args.paths, db_pid
                            )
                            results[kind][config].append(rate)
                            cpu[kind][config].append((nexus_us, db_us))
                            print(
                                f"round {r + 1} {kind} {config}: {rate:,.0f} req/s, CPU per request: Nexus "
                                f"{nexus_us:.0f} us, PostgreSQL {db_us:.0f} us",
                                flush=True,
                            )
                for kind, by_config in results.items():
                    report(kind, by_config, cpu[kind], args)
                if args.json:
                    args.json.write_text(
                        json.dumps(
                            {"cpus": os.cpu_count(), "pin": args.pin, "rounds": results, "cpu_us": cpu}, indent=2
                        )
                    )
            finally:
                for cluster in clusters.values():
                    cluster.close()
    finally:
        server.close()


if __name__ == "__main__":
    main()
