"""The same Vault client against spike's Vault API and against OpenBao, in one run: hvac KV v2 PUT and GET.

    .venv/bin/python bench/vault_clients.py              # 2,000 PUTs and 2,000 GETs per system, in 4 rounds
    .venv/bin/python bench/vault_clients.py --ops 200    # a smoke run

Both servers run on loopback as bench/systems.py starts them: spike (three keepers,
Nexus on SQLite, bootstrapped) and OpenBao (raft storage, initialised and unsealed,
KV v2 at secret/).  One hvac client (requests, one kept-alive TLS connection) talks
to each, one request at a time: what a program using hvac sees.  spike is measured
twice, with a token from `auth/cert/login` and with the client certificate alone;
OpenBao with its root token (its cert auth is not what is measured here, its KV is).
Rounds alternate between the systems, so that a change in the machine's load falls
on all of them.  Reported per operation: client-side latency (median, p90, p99),
operations per second, and the server's CPU time (utime + stime of the server
process over the round, divided by the operations).  Results: stdout and
bench/results/vault-clients-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import hvac
from systems import BaoDeployment, Processes, SpikeDeployment, cpu_seconds

MOUNT = "secret"
KEYS = 50  # distinct secret paths written and read in turn


def _client_spike(spike: SpikeDeployment, *, login: bool) -> hvac.Client:
    pilot = spike.identity.files("pilot-superuser")
    client = hvac.Client(url=spike.nexus_url, cert=(str(pilot.cert), str(pilot.key)), verify=str(pilot.bundle))
    client.token = None  # never VAULT_TOKEN or ~/.vault-token
    if login:
        client.auth.cert.login(cert_pem=str(pilot.cert), key_pem=str(pilot.key))
    return client


def _client_bao(bao: BaoDeployment) -> hvac.Client:
    return hvac.Client(url=f"https://127.0.0.1:{bao.port}", token=bao.root_token, verify=str(bao.ca))


def _round(client: hvac.Client, pid: int, ops: int, label: str) -> dict[str, Any]:
    kv = client.secrets.kv.v2
    out: dict[str, Any] = {}
    for op in ("put", "get"):
        lat: list[float] = []
        cpu0 = cpu_seconds(pid)
        start = time.perf_counter()
        for i in range(ops):
            path = f"bench/{label}/k{i % KEYS}"
            t0 = time.perf_counter()
            if op == "put":
                kv.create_or_update_secret(path, secret={"user": "admin", "password": f"p{i:08d}"}, mount_point=MOUNT)
            else:
                kv.read_secret_version(path, raise_on_deleted_version=True, mount_point=MOUNT)
            lat.append(time.perf_counter() - t0)
        wall = time.perf_counter() - start
        out[op] = {"latencies": lat, "wall": wall, "cpu": cpu_seconds(pid) - cpu0}
    return out


def _summary(runs: list[dict[str, Any]], op: str) -> dict[str, float]:
    lat = sorted(x for run in runs for x in run[op]["latencies"])
    wall = sum(run[op]["wall"] for run in runs)
    cpu = sum(run[op]["cpu"] for run in runs)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1e6

    return {
        "ops": len(lat),
        "median_us": statistics.median(lat) * 1e6,
        "p90_us": pct(0.90),
        "p99_us": pct(0.99),
        "ops_per_s": len(lat) / wall,
        "server_cpu_us_per_op": cpu / len(lat) * 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=2000, help="PUTs and GETs per system (default 2000)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds the operations are split into (default 4)")
    args = parser.parse_args()
    procs = Processes()
    root = Path(tempfile.mkdtemp(prefix="spike-vault-bench-"))
    try:
        spike = SpikeDeployment(procs, root / "spike")
        spike.start()
        spike.bootstrap()
        spike.wait_ready()
        bao = BaoDeployment(procs, root / "openbao")
        bao.start()
        assert spike.nexus is not None and bao.server is not None
        systems = {
            "spike, token from cert login": (_client_spike(spike, login=True), spike.nexus.pid),
            "spike, certificate only": (_client_spike(spike, login=False), spike.nexus.pid),
            "OpenBao, token": (_client_bao(bao), bao.server.pid),
        }
        per_round = max(1, args.ops // args.rounds)
        for label, (client, pid) in systems.items():  # warm-up: connections, caches, first writes
            _round(client, pid, min(KEYS * 2, per_round), label.split(",")[0])
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label in systems}
        for _ in range(args.rounds):
            for label, (client, pid) in systems.items():
                runs[label].append(_round(client, pid, per_round, label.split(",")[0]))
        results = {label: {op: _summary(r, op) for op in ("put", "get")} for label, r in runs.items()}
    finally:
        procs.stop_all()
    print(f"hvac {version('hvac')}, {args.ops} operations of each kind per system, one client, one at a time")
    print(f"{'system':32} {'op':4} {'median µs':>10} {'p90 µs':>8} {'p99 µs':>8} {'ops/s':>8} {'server CPU µs/op':>17}")
    for label, ops in results.items():
        for op, s in ops.items():
            print(
                f"{label:32} {op:4} {s['median_us']:10.0f} {s['p90_us']:8.0f} {s['p99_us']:8.0f} "
                f"{s['ops_per_s']:8.0f} {s['server_cpu_us_per_op']:17.0f}"
            )
    out = Path(__file__).parent / "results" / f"vault-clients-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"argv": sys.argv[1:], "results": results}, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
