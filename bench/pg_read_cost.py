"""CPU and wall time of one secret read, in process and one at a time: SQLite against PostgreSQL.

No TLS, no HTTP, no concurrency: the cost of the store's read path alone, split
into its layers: `get` on the calling thread; `get` through `read()`, as Nexus
calls it (a read thread on PostgreSQL); on PostgreSQL, the pool's `query` with
`SELECT 1` and a bare psycopg connection with `SELECT 1`.
Compare with `bench/pg_vs_sqlite.py`'s CPU per request under load to see what
concurrency adds.  Uses the tests' PostgreSQL (tests/pg_server.py) and key
record (tests/store/store_helpers.py).

    PYTHONPATH=. .venv/bin/python bench/pg_read_cost.py [--reads 3000]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.store.store_helpers import open_backend  # noqa: E402

PATHS = 50


def cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime, usage.ru_stime


def measure(label: str, reads: int, one: Callable[[int], object]) -> None:
    wall, (user, system) = time.perf_counter(), cpu()
    for i in range(reads):
        one(i)
    wall, (user2, system2) = time.perf_counter() - wall, cpu()
    per = 1e6 / reads
    print(
        f"{label:42s} wall {wall * per:7.1f} us  user {(user2 - user) * per:6.1f} us  "
        f"system {(system2 - system) * per:6.1f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=3000)
    reads = parser.parse_args().reads
    for kind in ("sqlite", "postgres"):
        measure_backend(kind, reads)


def measure_backend(kind: str, reads: int) -> None:
    backend: Any = open_backend(kind, Path(tempfile.mkdtemp(prefix="spike-read-cost-")))
    try:
        for i in range(PATHS):
            backend.put(f"bench/{i}", {"password": "x" * 20}, None).result()
        measure(f"{kind}: get, on this thread", reads, lambda i: backend.get(f"bench/{i % PATHS}", 0))
        measure(
            f"{kind}: get through read() (Nexus's way)",
            reads,
            lambda i: backend.read(lambda: backend.get(f"bench/{i % PATHS}", 0)).result(),
        )
        if kind == "postgres":
            import psycopg

            measure("postgres: pool query, SELECT 1", reads, lambda i: backend._db.query(_select_one))
            with psycopg.connect(backend._url, autocommit=True) as conn:
                measure("postgres: bare connection, SELECT 1", reads, lambda i: _select_one(conn))
    finally:
        backend.close()


def _select_one(conn: Any) -> object:
    return conn.execute("SELECT 1").fetchone()


if __name__ == "__main__":
    main()
