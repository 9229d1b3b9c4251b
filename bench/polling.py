"""The polling row: one Nexus custody loop polling many keepers every second.

Two processes, started by the suite (which first mints the identities and
writes a throw-away key file, so that both sides agree without talking):

``polling.py keepers --count N --identity DIR --keys F --ports-file P``
    N keepers in one anyio process: each is spike's own `Keeper` machine
    behind spike's `HttpsServer` (mTLS, the keeper's own SVID), on its own
    loopback port, already holding its shard (as keepers do once Nexus has
    seeded them).  Writes the ports to P and serves until killed.  Keepers
    share a process only to fit 1,000 of them on a 2-core machine; each still
    has its own port, TLS connection and shard.

``polling.py nexus --identity DIR --keys F --ports-file P --seconds S --windows W``
    The measured side: spike's `NexusCustody` machines driven by spike's
    `CustodyDriver` over real keep-alive mTLS connections, exactly as
    `spike nexus` drives them, without the API server beside them.  A custody
    machine names keepers 1-255 (their Shamir x), so N keepers are split into
    ceil(N/250) machines, all on one event loop in this one process.  Each
    machine starts RECOVERING with its key record, as a restarted Nexus does,
    rebuilds its key from the first answers and from then on polls on its
    grid.  Before the machines start, every keep-alive connection is opened
    (a few handshakes at a time), as a Nexus that has run for a while has
    them; machines start a fraction of an interval apart.  The run waits until
    every keeper is seen holding, lets one more interval pass, then measures W
    windows of S/W seconds: this process's CPU time, and the lateness of every
    scheduled poll (`CustodyDriver.lateness`: when the request was sent minus
    when the grid said it was due).  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from spike.app.commands.devca import DevIdentity, mint_dev_identity
from spike.app.keeper import KEEPER_LIMITS, KeeperHandler
from spike.protocol.api import ApiRequest
from spike.protocol.effects import KeeperState, KeeperStateChanged, Report
from spike.protocol.events import Answer, ResponseReceived
from spike.protocol.identity import Role, TrustDomains
from spike.protocol.keeper import Keeper
from spike.protocol.material import RootKey
from spike.protocol.nexus import NexusCustody, PollSchedule
from spike.protocol.record import KeyRecord, seal_key
from spike.protocol.wire import KEEPER_CONTRIBUTE_PATH, ShardContribution, encode
from spike.transports.custody_driver import CustodyDriver
from spike.transports.server import HttpsServer
from spike.transports.tls import client_context, server_context

TRUST_DOMAIN = "spike.ist"
GROUP = 250  # keepers per custody machine (ids 1..250)
EPOCH = 1


def groups_of(count: int) -> list[int]:
    """Sizes of the custody machines for `count` keepers: as even as possible, none above GROUP."""
    machines = math.ceil(count / GROUP)
    return [count // machines + (1 if i < count % machines else 0) for i in range(machines)]


def threshold_for(size: int) -> int:
    return min(2, size)


def prepare(directory: Path, count: int, key_file: Path) -> DevIdentity:
    """Mint the SVIDs (keepers 1..largest group, nexus) and one throw-away root key per machine."""
    import os

    identity = mint_dev_identity(directory, TRUST_DOMAIN, range(1, max(groups_of(count)) + 1))
    keys = [RootKey.generate(os.urandom).secret_bytes().hex() for _ in groups_of(count)]
    key_file.write_text(json.dumps(keys))
    key_file.chmod(0o600)
    return identity


def sealed(key_file: Path, count: int) -> list[tuple[list[int], int, KeyRecord, dict[int, Any]]]:
    """Per machine: keeper ids, threshold, key record, shares."""
    keys = json.loads(key_file.read_text())
    out = []
    for size, key_hex in zip(groups_of(count), keys, strict=True):
        ids = list(range(1, size + 1))
        threshold = threshold_for(size)
        record, shares = seal_key(RootKey(bytes.fromhex(key_hex)), epoch=EPOCH, threshold=threshold, keeper_ids=ids)
        out.append((ids, threshold, record, shares))
    return out


def run_loop(fn: Any, *args: Any) -> Any:
    """Run on the event loop `spike nexus` and `spike keeper` use (uvloop where spike picks it)."""
    try:
        from spike.transports.event_loop import backend_options
    except ImportError:  # a spike without the hook: anyio's default asyncio loop
        return anyio.run(fn, *args)
    return anyio.run(fn, *args, backend="asyncio", backend_options=backend_options())


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---------------------------------------------------------------------- keepers


async def serve_keepers(count: int, identity_dir: Path, key_file: Path, ports_file: Path) -> None:
    identity = DevIdentity(identity_dir, TRUST_DOMAIN)
    trust = TrustDomains.single(TRUST_DOMAIN)
    nexus = trust.id_of(Role.NEXUS)
    contexts: dict[int, Any] = {}
    servers = []
    layout: list[list[int]] = []
    for ids, _, _, shares in sealed(key_file, count):
        ports = []
        for keeper_id in ids:
            if keeper_id not in contexts:
                contexts[keeper_id] = server_context(identity.keeper(keeper_id))
            keeper = Keeper(trust)
            body = encode(ShardContribution.of(shares[keeper_id]))
            seeded = keeper.handle(ApiRequest("POST", KEEPER_CONTRIBUTE_PATH, nexus, body))
            if seeded.response.status != 200:
                raise SystemExit(f"could not seed keeper {keeper_id}: HTTP {seeded.response.status}")
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
            servers.append((HttpsServer(contexts[keeper_id], KeeperHandler(keeper), KEEPER_LIMITS), listener))
            inner = getattr(listener, "listeners", [listener])[0]
            ports.append(int(inner.extra(anyio.abc.SocketAttribute.local_port)))
        layout.append(ports)
    async with anyio.create_task_group() as tg:
        for server, listener in servers:
            tg.start_soon(server.serve, listener)
        await anyio.sleep(0.2)  # every server is accepting before the ports are announced
        tmp = ports_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(layout))
        tmp.replace(ports_file)


# ---------------------------------------------------------------------- Nexus side


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def drive(
    identity_dir: Path, key_file: Path, layout: list[list[int]], seconds: float, windows: int, interval: float
) -> dict[str, Any]:
    count = sum(len(g) for g in layout)
    identity = DevIdentity(identity_dir, TRUST_DOMAIN)
    trust = TrustDomains.single(TRUST_DOMAIN)
    ctx = client_context(identity.files("nexus"))
    # What `spike nexus --poll-interval 1s` uses: 10% jitter, a request timeout of min(2 s, interval/2).
    schedule = PollSchedule(interval=interval, jitter=0.1, request_timeout=min(2.0, interval / 2))
    rng = random.SystemRandom()
    answers = {"ok": 0, "failed": 0}
    reasons: dict[str, int] = {}
    changes: dict[str, int] = {}  # keepers leaving HOLDING, by the state they went to

    def on_answer(request: Any, answer: Answer, took: float) -> None:
        if isinstance(answer, ResponseReceived) and answer.status == 200:
            answers["ok"] += 1
        else:
            answers["failed"] += 1
            reason = getattr(answer, "reason", None) or f"HTTP {getattr(answer, 'status', '?')}"
            reasons[reason] = reasons.get(reason, 0) + 1

    def on_report(report: Report) -> None:
        if isinstance(report, KeeperStateChanged) and report.state is not KeeperState.HOLDING:
            changes[report.state.value] = changes.get(report.state.value, 0) + 1

    drivers: list[CustodyDriver] = []
    plans = sealed(key_file, count)
    result: dict[str, Any] = {"keepers": count, "machines": len(layout), "interval": interval}

    def holding() -> int:
        return sum(v.state.value == "holding" for d in drivers for v in d.custody.keepers())

    def opened() -> int:
        return sum(c.connections_opened for d in drivers for c in d._connections.values())

    warm = anyio.Semaphore(16)

    async def warm_up(connection: Any) -> None:
        async with warm:
            for _ in range(5):
                try:
                    with anyio.fail_after(10):
                        await connection.request("POST", "/v1/store/shard", b"{}")
                    return
                except Exception:
                    await anyio.sleep(0.1)

    started = time.monotonic()
    for (ids, threshold, record, _), ports in zip(plans, layout, strict=True):
        urls = {i: f"https://127.0.0.1:{port}" for i, port in zip(ids, ports, strict=True)}
        custody = NexusCustody(ids, threshold=threshold, schedule=schedule, rng=rng, now=0.0, record=record)
        drivers.append(
            CustodyDriver(custody, urls, ssl_context=ctx, trust=trust, on_report=on_report, on_answer=on_answer)
        )
    async with anyio.create_task_group() as warming:
        for driver in drivers:
            for connection in driver._connections.values():
                warming.start_soon(warm_up, connection)
    result["warm_up_seconds"] = time.monotonic() - started
    result["warm_connections"] = opened()
    async with anyio.create_task_group() as tg:
        started = time.monotonic()
        for driver, (ids, threshold, record, _) in zip(drivers, plans, strict=True):
            # A machine's first round goes out at once (a restarted Nexus recovers as fast as
            # its keepers answer); the machines start a fraction of an interval apart.
            driver.custody = NexusCustody(
                ids, threshold=threshold, schedule=schedule, rng=rng, now=anyio.current_time(), record=record
            )
            tg.start_soon(driver.run)
            await anyio.sleep(interval / len(plans))
        while holding() < count and time.monotonic() - started < 60:
            await anyio.sleep(0.1)
        result["setup_seconds"] = time.monotonic() - started
        result["holding_at_start"] = holding()
        await anyio.sleep(interval)  # one more round: the grid is steady
        marks = [len(d.lateness.samples) for d in drivers]
        answers.update(ok=0, failed=0)
        reasons.clear()
        changes.clear()
        per_window: list[dict[str, Any]] = []
        pooled: list[float] = []
        window = seconds / windows
        for _ in range(windows):
            cpu0, wall0, opened0 = time.process_time(), time.monotonic(), opened()
            ok0, failed0 = answers["ok"], answers["failed"]
            await anyio.sleep(window)
            cpu1, wall1 = time.process_time(), time.monotonic()
            samples: list[float] = []
            for n, d in enumerate(drivers):
                now_len = len(d.lateness.samples)
                samples.extend(d.lateness.samples[marks[n] : now_len])
                marks[n] = now_len
            pooled.extend(samples)
            per_window.append(
                {
                    "seconds": wall1 - wall0,
                    "cpu_percent": 100 * (cpu1 - cpu0) / (wall1 - wall0),
                    "polls": len(samples),
                    "lateness_p50_ms": percentile(samples, 0.5) * 1000,
                    "lateness_p99_ms": percentile(samples, 0.99) * 1000,
                    "lateness_max_ms": (max(samples) if samples else float("nan")) * 1000,
                    "answers_ok": answers["ok"] - ok0,
                    "answers_failed": answers["failed"] - failed0,
                    "connections_opened": opened() - opened0,
                }
            )
        result["windows"] = per_window
        result["polls"] = len(pooled)
        result["polls_per_second"] = len(pooled) / sum(w["seconds"] for w in per_window)
        result["lateness_p50_ms"] = percentile(pooled, 0.5) * 1000
        result["lateness_p99_ms"] = percentile(pooled, 0.99) * 1000
        result["lateness_max_ms"] = (max(pooled) if pooled else float("nan")) * 1000
        result["holding_at_end"] = holding()
        result["failure_reasons"] = dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:5])
        result["left_holding"] = changes  # e.g. unreachable: a poll got no answer within its timeout
        states: dict[str, int] = {}
        for d in drivers:
            for v in d.custody.keepers():
                states[v.state.value] = states.get(v.state.value, 0) + 1
        result["states_at_end"] = states
        result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        tg.cancel_scope.cancel()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["keepers", "nexus", "prepare"])
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--identity", type=Path, required=True)
    parser.add_argument("--keys", type=Path, required=True)
    parser.add_argument("--ports-file", type=Path)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args()
    raise_fd_limit()
    if args.role == "prepare":
        prepare(args.identity, args.count, args.keys)
    elif args.role == "keepers":
        run_loop(serve_keepers, args.count, args.identity, args.keys, args.ports_file)
    else:
        layout = json.loads(args.ports_file.read_text())
        result = run_loop(drive, args.identity, args.keys, layout, args.seconds, args.windows, args.interval)
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")


if __name__ == "__main__":
    main()
