"""How long `spike dev --data-dir DIR` takes to say it is ready, first run and later runs.

    .venv/bin/python bench/dev_ready.py                # median of 5 first runs and of 5 second runs
    .venv/bin/python bench/dev_ready.py --runs 9 --spike dist/spike

Each run starts `spike dev --data-dir DIR` as a user does and times from starting the process to
the line `Ctrl-C stops everything.` on its standard output (everything is up: keepers started,
Nexus started, the key bootstrapped or restored from the recovery shards, every keeper re-seeded),
then stops it with SIGINT and waits for it to exit. Each round takes a new data dir: its first run
bootstraps; the second run on the same dir starts empty keepers and restores the same key from the
recovery shards the first one wrote (issue 18: "ready in under 2 s after the first run").
The suite has the same rows, beside OpenBao's dev server (bench/user_rows.py, `bench/run --only user`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from user_rows import spike_dev_ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="rounds to time (default 5)")
    parser.add_argument("--spike", help="the spike executable (default: this interpreter's `-m spike`)")
    args = parser.parse_args()
    command = [os.path.abspath(args.spike)] if args.spike else [sys.executable, "-m", "spike"]
    first: list[float] = []
    later: list[float] = []
    for _ in range(args.runs):  # each round: a new data dir, its first run, then a second run on it
        with tempfile.TemporaryDirectory(prefix="spike-dev-bench-") as tmp:
            data_dir = Path(tmp) / "dev"
            first.append(spike_dev_ready(command, data_dir, dict(os.environ)))
            later.append(spike_dev_ready(command, data_dir, dict(os.environ)))
    for name, times in (("first run (bootstrap)", first), ("second run (restore)", later)):
        print(
            f"spike dev --data-dir, {name}: median {statistics.median(times):.2f} s of {len(times)} "
            f"(min {min(times):.2f}, max {max(times):.2f})"
        )


if __name__ == "__main__":
    main()
