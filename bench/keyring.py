"""Benchmark rows: what key rotations cost with 1,000 and 100,000 secrets stored, spike and OpenBao side by side.

spike, in one process on its store (the operations the API routes call; SQLite
with fsync on, as deployed, and PostgreSQL with --postgres):

* data-key rotation (`rotate_data_key`: a new keyring term, one write);
* the store's part of a root key rotation (the keyring wrapped under the new
  root key, stored with the pending rotation, committed, opened again with the
  new key: what is independent of the keepers; dealing shards is polling's);
* the optional re-wrap of every stored value to the newest term (values/s).

OpenBao (the real server from bench/.venv, raft storage, KV v2, TLS on
loopback, as bench/run starts it), with the same number of secrets written:

* ``POST /v1/sys/rotate/keyring`` (`bao operator rotate`: a new keyring term);
* a root key rotation with 3 of its 5 unseal keys (``sys/rotate/root/init``,
  then ``update`` three times: `bao operator rotate-keys`, formerly `rekey`).

Both are expected flat in the number of secrets: neither re-encrypts stored
values for a rotation.  OpenBao has no re-wrap of stored values (it never
re-encrypts them), so that row is spike's alone.

    bench/.venv/bin/python bench/keyring.py [--counts 1000,100000] [--rounds 5] [--postgres] [--no-openbao]
                                           [--json out.json]

Run from the repository (it imports spike from ./spike, and tests/pg_server.py for --postgres).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from spike.app.store.data_keys import RewrapCursor  # noqa: E402
from spike.protocol.material import RootKey  # noqa: E402
from spike.protocol.pending import PendingRotation  # noqa: E402
from spike.protocol.record import seal_key  # noqa: E402

BURST = 512  # puts in flight while seeding (one group commit each, at most)


def ms(seconds: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(seconds) * 1000, "min_ms": min(seconds) * 1000, "runs": len(seconds)}


def timed(op: Callable[[], Any], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        op()
        out.append(time.perf_counter() - start)
    return out


# ---------------------------------------------------------------------- spike


class SpikeStore:
    def __init__(self, kind: str, workdir: Path) -> None:
        self.key = RootKey.generate(os.urandom)
        self.record, _ = seal_key(self.key, epoch=1, threshold=2, keeper_ids=[1, 2, 3])
        self.pg: Any = None
        if kind == "sqlite":
            from spike.app.store.sqlite import SqliteBackend

            self.store: Any = SqliteBackend(workdir / "data")
        else:
            import pg_server

            from spike.app.store.postgres import PostgresBackend

            bindir = pg_server.find_bindir()
            if bindir is None:
                raise SystemExit("PostgreSQL's server binaries are missing (apt-get install postgresql)")
            self.pg = pg_server.PgServer(bindir, durable=True)
            self.store = PostgresBackend(self.pg.database())
        self.store.install_key_record(self.record, replace=None)
        self.store.unlock(self.key, 1)
        self.stored = 0

    def seed(self, upto: int) -> float:
        start = time.perf_counter()
        while self.stored < upto:
            batch = range(self.stored, min(upto, self.stored + BURST))
            futures = [self.store.put(f"bench/s{i}", {"v": f"value-{i:08d}"}, None) for i in batch]
            for future in futures:
                future.result(120)
            self.stored = batch.stop
        return time.perf_counter() - start

    def rotate_root(self) -> None:
        new_key = RootKey.generate(os.urandom)
        new, _ = seal_key(new_key, epoch=self.record.epoch + 1, threshold=2, keeper_ids=[1, 2, 3])
        pending = PendingRotation.seal(self.key, self.record, new_key, new)
        start = time.perf_counter()
        wrapped = self.store.keyring().wrap(new_key, new.epoch)
        assert self.store.persist_rotation(pending, wrapped)
        assert self.store.commit_rotation(pending)
        self.store.unlock(new_key, new.epoch)
        self.last = time.perf_counter() - start
        self.key, self.record = new_key, pending.record

    def rewrap_all(self) -> tuple[int, float]:
        term = self.store.keyring().active
        cursor: RewrapCursor | None = RewrapCursor()
        done = 0
        start = time.perf_counter()
        while cursor is not None:
            batch = self.store.rewrap_batch(term, cursor)
            done, cursor = done + batch.rewrapped, batch.next
        return done, time.perf_counter() - start


def spike_rows(kind: str, counts: list[int], rounds: int, workdir: Path) -> list[dict[str, Any]]:
    rows = []
    spike = SpikeStore(kind, workdir)
    try:
        for n in counts:
            seeded = spike.seed(n)
            print(f"spike ({kind}): {n} secrets stored (+{seeded:.1f}s)", file=sys.stderr)
            data_key = timed(spike.store.rotate_data_key, rounds)
            root = []
            for _ in range(rounds):
                spike.rotate_root()
                root.append(spike.last)
            assert spike.store.get(f"bench/s{n - 1}", 0)[1] == {"v": f"value-{n - 1:08d}"}
            values, seconds = spike.rewrap_all()
            rows += [
                {"system": f"spike ({kind})", "secrets": n, "row": "data-key rotation", **ms(data_key)},
                {"system": f"spike ({kind})", "secrets": n, "row": "root key rotation: keyring re-wrap", **ms(root)},
                {
                    "system": f"spike ({kind})",
                    "secrets": n,
                    "row": "re-wrap of every stored value",
                    "values": values,
                    "seconds": seconds,
                    "values_per_s": values / seconds,
                },
            ]
    finally:
        spike.store.close()
        if spike.pg is not None:
            spike.pg.close()
    return rows


# ---------------------------------------------------------------------- OpenBao


def openbao_rows(counts: list[int], rounds: int, workdir: Path) -> tuple[list[dict[str, Any]], str]:
    import subprocess

    from systems import BaoDeployment, Http, Processes

    procs = Processes()
    rows = []
    try:
        bao = BaoDeployment(procs, workdir / "bao")
        bao.start()
        version = bao.cli("version").strip()
        http = Http(bao.port, bao.ctx, timeout=120.0)
        headers = {"X-Vault-Token": bao.root_token}
        stored = 0

        def rotate_keyring() -> None:
            status, body = http.json("POST", "/v1/sys/rotate/keyring", {}, headers)
            if status not in (200, 204):
                raise RuntimeError(f"sys/rotate/keyring answered {status}: {body}")

        def rotate_root() -> None:
            status, body = http.json(
                "POST", "/v1/sys/rotate/root/init", {"secret_shares": 5, "secret_threshold": 3}, headers
            )
            if status != 200:
                raise RuntimeError(f"sys/rotate/root/init answered {status}: {body}")
            body = body.get("data") or body
            if "nonce" not in body:
                raise RuntimeError(f"sys/rotate/root/init answered without a nonce: {body}")
            nonce, new_keys = body["nonce"], None
            for key in bao.unseal_keys[:3]:
                status, body = http.json("POST", "/v1/sys/rotate/root/update", {"key": key, "nonce": nonce}, headers)
                if status != 200:
                    raise RuntimeError(f"sys/rotate/root/update answered {status}: {body}")
                body = body.get("data") or body
                new_keys = body.get("keys_base64") or new_keys
            if not new_keys:
                raise RuntimeError("the root key rotation returned no new keys")
            bao.unseal_keys = list(new_keys)

        for n in counts:
            t = bao.target()
            argv = [
                sys.executable, str(ROOT / "bench" / "loadgen.py"), "--url", f"https://{t.host}:{t.port}",
                "--ca", str(t.ca), "--request", "put-bao", "--connections", "16", "--processes", "2",
                "--duration", "3000", "--seed-range", f"{stored}:{n}",
            ]  # fmt: skip
            seeded = subprocess.run(
                argv, env={**os.environ, "BAO_TOKEN": bao.root_token}, capture_output=True, check=True, timeout=3600
            )
            out = json.loads(seeded.stdout)
            print(f"OpenBao: {n} secrets stored (+{out['seconds']:.1f}s, {out['errors']} errors)", file=sys.stderr)
            stored = n
            rows += [
                {"system": "OpenBao", "secrets": n, "row": "data-key rotation", **ms(timed(rotate_keyring, rounds))},
                {
                    "system": "OpenBao",
                    "secrets": n,
                    "row": "root key rotation: keyring re-wrap",
                    "note": "init + 3 unseal keys, over HTTPS",
                    **ms(timed(rotate_root, rounds)),
                },
            ]
        http.close()
    finally:
        procs.stop_all()
    return rows, version


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1000,100000", help="secrets stored at each measure (cumulative)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--postgres", action="store_true", help="spike on PostgreSQL too (fsync on)")
    parser.add_argument("--no-openbao", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    rows: list[dict[str, Any]] = []
    version = None
    with tempfile.TemporaryDirectory(prefix="spike-bench-keyring-") as tmp:
        workdir = Path(tmp)
        rows += spike_rows("sqlite", counts, args.rounds, workdir / "sqlite")
        if args.postgres:
            rows += spike_rows("postgres", counts, args.rounds, workdir / "postgres")
        if not args.no_openbao:
            bao_rows, version = openbao_rows(counts, args.rounds, workdir)
            rows += bao_rows
    print(f"{'row':38} {'system':18} {'secrets':>8} {'median':>12} {'min':>10}")
    for row in rows:
        if "values_per_s" in row:
            median = f"{row['values_per_s']:,.0f}/s"
            low = f"{row['seconds']:.1f}s"
        else:
            median, low = f"{row['median_ms']:.2f} ms", f"{row['min_ms']:.2f} ms"
        print(f"{row['row']:38} {row['system']:18} {row['secrets']:>8,} {median:>12} {low:>10}")
    if args.json:
        args.json.write_text(
            json.dumps({"cores": os.cpu_count(), "openbao": version, "rounds": args.rounds, "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
