"""Benchmark rows: time to rotate spike's root key with 3, 10 and 100 keepers, and to move custody (rekey).

For each keeper count N: N keepers (spike's own `Keeper` machines behind spike's
`HttpsServer`, mTLS, each on its own loopback port, all in one helper process
so that 100 fit on a small machine), a real `spike nexus` process (SQLite,
keepers polled every `--poll-interval`, threshold a majority of N) configured
with a TOML file, and `spike bootstrap`.  Then, `--rounds` times:

* **rotate**: ``POST /v1/operator/rotate`` as the superuser (what `spike operator
  rotate` sends), then Nexus's status read every 10 ms until the new epoch is
  in force and no rotation is under way; the time from the request to that
  status.  Before each round every keeper holds its shard of the epoch in force
  again (the old epoch retired).
* **rekey** (N = 3 only; keepers 4 and 5 wait empty): the configuration file
  moves custody from 2-of-3 to 3-of-5 (and back, keepers 4 and 5 retiring),
  Nexus is sent SIGHUP, and the time from the signal to the status showing the
  new threshold and keeper count in force, no rotation under way.

A rotation deals at the keepers' polls, so it takes about one poll interval
whatever N is; the rows show what N adds to that.  Secrets are not touched by
a rotation (the root key wraps the keyring only): the suite times rotation with
1,000 and 100,000 secrets stored (bench/suite.py, group ``rotation``).

    bench/.venv/bin/python bench/rotation.py --counts 3,10,100 --rounds 3 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from systems import Http, Processes, pick_port, tls_context, wait_until  # noqa: E402

TRUST_DOMAIN = "spike.ist"


def majority(count: int) -> int:
    return count // 2 + 1


# ---------------------------------------------------------------------- the keepers' process


def serve_keepers(count: int, identity_dir: Path, ports_file: Path) -> None:
    """`count` empty keepers, ids 1..count, each on its own port; the ports go to `ports_file`."""
    import anyio
    import anyio.abc

    from spike.app.commands.devca import DevIdentity
    from spike.app.keeper import KEEPER_LIMITS, KeeperHandler
    from spike.protocol.identity import TrustDomains
    from spike.protocol.keeper import Keeper
    from spike.transports.server import HttpsServer
    from spike.transports.tls import server_context

    async def main() -> None:
        identity = DevIdentity(identity_dir, TRUST_DOMAIN)
        trust = TrustDomains.single(TRUST_DOMAIN)
        servers = []
        ports = {}
        for keeper_id in range(1, count + 1):
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
            handler = KeeperHandler(Keeper(trust))
            servers.append((HttpsServer(server_context(identity.keeper(keeper_id)), handler, KEEPER_LIMITS), listener))
            inner = getattr(listener, "listeners", [listener])[0]
            ports[keeper_id] = int(inner.extra(anyio.abc.SocketAttribute.local_port))
        async with anyio.create_task_group() as tg:
            for server, listener in servers:
                tg.start_soon(server.serve, listener)
            await anyio.sleep(0.2)
            tmp = ports_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(ports))
            tmp.replace(ports_file)

    anyio.run(main)


# ---------------------------------------------------------------------- one deployment


class Deployment:
    """N keepers (plus `spare` more, empty, for a rekey), a Nexus configured by a file, bootstrapped."""

    def __init__(self, procs: Processes, root: Path, count: int, spare: int, poll_interval: float) -> None:
        from spike.app.commands.devca import mint_dev_identity

        self.procs = procs
        self.root = root
        self.count = count
        self.poll_interval = poll_interval
        root.mkdir(parents=True, exist_ok=True)
        self.logs = root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.identity = mint_dev_identity(root / "identity", TRUST_DOMAIN, range(1, count + spare + 1))
        ports_file = root / "ports.json"
        self.keepers_proc = procs.spawn(
            [sys.executable, str(HERE / "rotation.py"), "keepers", "--count", str(count + spare),
             "--identity", str(self.identity.directory), "--ports-file", str(ports_file)],
            env=self._env("nexus"), log=self.logs / "keepers.log",
        )  # fmt: skip
        wait_until(ports_file.exists, "the keepers to listen", 120, every=0.05)
        self.ports = {int(k): v for k, v in json.loads(ports_file.read_text()).items()}
        self.config = root / "spike.toml"
        self.configure(range(1, count + 1), majority(count))
        self.nexus_port = pick_port()
        self.nexus = procs.spawn(
            [sys.executable, "-m", "spike", "nexus", "--listen", f"127.0.0.1:{self.nexus_port}",
             "--data-dir", str(root / "data"), "--poll-interval", f"{poll_interval:g}s", "--config", str(self.config)],
            env=self._env("nexus"), log=self.logs / "nexus.log",
        )  # fmt: skip
        pilot = self.identity.files("pilot-superuser")
        self.http = Http(self.nexus_port, tls_context(pilot.bundle, pilot.cert, pilot.key), timeout=10.0)
        wait_until(lambda: self.status() is not None, "Nexus to answer", 60)
        done = subprocess.run(
            [sys.executable, "-m", "spike", "bootstrap", "--nexus", f"https://127.0.0.1:{self.nexus_port}"],
            env=self._env("bootstrap"), capture_output=True, timeout=300, check=False,
        )  # fmt: skip
        (self.logs / "bootstrap.log").write_bytes(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"spike bootstrap failed: {done.stdout!r} {done.stderr!r}")
        self.wait_settled()

    def _env(self, name: str) -> dict[str, str]:
        import os

        files = self.identity.files(name)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPIKE_")}
        env.update(
            SPIKE_SVID_CERT=str(files.cert), SPIKE_SVID_KEY=str(files.key), SPIKE_SVID_BUNDLE=str(files.bundle),
            SPIKE_TRUST_ROOT=TRUST_DOMAIN, SPIKE_LOG_LEVEL="info", PYTHONUNBUFFERED="1",
        )  # fmt: skip
        return env

    def configure(self, ids: range | list[int], threshold: int, retiring: list[int] | None = None) -> None:
        peers = ",".join(f"{i}=https://127.0.0.1:{self.ports[i]}" for i in ids)
        text = f'[nexus]\nkeepers = "{peers}"\nshares = {len(ids)}\nthreshold = {threshold}\n'
        if retiring:
            text += f'retiring_keepers = "{",".join(f"{i}=https://127.0.0.1:{self.ports[i]}" for i in retiring)}"\n'
        if threshold == 1:
            text += "allow_threshold_one = true\n"
        self.config.write_text(text)

    def status(self) -> dict[str, Any] | None:
        try:
            code, body = self.http.json("POST", "/v1/operator/status", {})
        except OSError:
            return None
        return body if code == 200 and isinstance(body, dict) else None

    def wait_settled(self, timeout: float = 120.0) -> dict[str, Any]:
        """READY, no rotation, every keeper of the record holding its verified shard (the old epoch retired)."""

        def settled() -> dict[str, Any] | None:
            body = self.status()
            if not body or body["phase"] != "ready" or body.get("rotation") is not None:
                return None
            members = [k for k in body["keepers"] if k["state"] != "removed"]
            if len(members) != body["shares"] or any(k["state"] != "holding" for k in members):
                return None
            return body

        result: dict[str, Any] = wait_until(settled, "Nexus settled", timeout, every=0.05)
        return result

    def rotate(self) -> float:
        """One rotation: from the request to the status showing the new epoch in force."""
        before = self.wait_settled()["epoch"]
        t0 = time.monotonic()
        code, body = self.http.json("POST", "/v1/operator/rotate", {})
        if code != 200:
            raise RuntimeError(f"rotate answered HTTP {code}: {body}")

        def committed() -> bool:
            body = self.status()
            return bool(body) and body["epoch"] > before and body.get("rotation") is None  # type: ignore[index]

        wait_until(committed, "the rotation to commit", 120, every=0.01)
        return time.monotonic() - t0

    def rekey(self, ids: list[int], threshold: int, retiring: list[int]) -> float:
        """Move custody by configuration and SIGHUP: from the signal to the new record in force."""
        before = self.wait_settled()["epoch"]
        self.configure(ids, threshold, retiring)
        t0 = time.monotonic()
        assert self.nexus is not None
        self.nexus.send_signal(signal.SIGHUP)

        def moved() -> bool:
            body = self.status()
            return (
                bool(body)
                and body["epoch"] > before  # type: ignore[index]
                and body.get("rotation") is None  # type: ignore[union-attr]
                and (body["threshold"], body["shares"]) == (threshold, len(ids))  # type: ignore[index]
            )

        wait_until(moved, "custody to move", 120, every=0.01)
        return time.monotonic() - t0

    def close(self) -> None:
        self.http.close()


def measure(counts: list[int], rounds: int, poll_interval: float, workdir: Path) -> dict[str, Any]:
    procs = Processes()
    out: dict[str, Any] = {"poll_interval": poll_interval, "rows": []}
    try:
        for count in counts:
            spare = 2 if count == 3 else 0
            print(f"rotation: {count} keepers (threshold {majority(count)}), poll interval {poll_interval:g}s",
                  file=sys.stderr, flush=True)  # fmt: skip
            deployment = Deployment(procs, workdir / f"n{count}", count, spare, poll_interval)
            times = [deployment.rotate() for _ in range(rounds)]
            out["rows"].append({"operation": "rotate", "keepers": count, "threshold": majority(count),
                                "seconds": times})  # fmt: skip
            print(f"  rotate, {count} keepers: median {statistics.median(times):.2f}s {times}", file=sys.stderr)
            if spare:
                grow, shrink = [], []
                for _ in range(rounds):
                    grow.append(deployment.rekey([1, 2, 3, 4, 5], 3, []))
                    shrink.append(deployment.rekey([1, 2, 3], 2, [4, 5]))
                out["rows"].append({"operation": "rekey 2-of-3 -> 3-of-5", "keepers": 5, "threshold": 3,
                                    "seconds": grow})  # fmt: skip
                out["rows"].append({"operation": "rekey 3-of-5 -> 2-of-3", "keepers": 3, "threshold": 2,
                                    "seconds": shrink})  # fmt: skip
                print(f"  rekey 2-of-3 -> 3-of-5: median {statistics.median(grow):.2f}s {grow}", file=sys.stderr)
                print(f"  rekey 3-of-5 -> 2-of-3: median {statistics.median(shrink):.2f}s {shrink}", file=sys.stderr)
            deployment.close()
            procs.stop_all()
    finally:
        procs.stop_all()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/rotation.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    keepers = sub.add_parser("keepers", help="(internal) host N empty keepers")
    keepers.add_argument("--count", type=int, required=True)
    keepers.add_argument("--identity", type=Path, required=True)
    keepers.add_argument("--ports-file", type=Path, required=True)
    parser.add_argument("--counts", default="3,10,100", help="keeper counts (default 3,10,100)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    if args.command == "keepers":
        serve_keepers(args.count, args.identity, args.ports_file)
        return 0
    with tempfile.TemporaryDirectory(prefix="spike-rotation-bench-") as tmp:
        result = measure([int(c) for c in args.counts.split(",")], args.rounds, args.poll_interval, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    for row in result["rows"]:
        print(f"{row['operation']:24} {row['keepers']:4} keepers  median {statistics.median(row['seconds']):6.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
