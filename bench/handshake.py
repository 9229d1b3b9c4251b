"""What a new mTLS connection costs, and what the per-domain trust check adds to it.

    .venv/bin/python bench/handshake.py [--connections 2000] [--rounds 5]

One process, one event loop (uvloop when installed, as Nexus runs): spike's
`HttpsServer` with the real `KeeperHandler`, and spike's `HttpsConnection`
as Nexus's client, on loopback.  Each iteration opens a new connection (a
full TLS 1.3 handshake, both certificates verified, both sides' post-handshake
checks), sends one shard read, gets the 404 and closes.  Both SVIDs and
both sides' trust come from two trust domains' bundles (spike.test and
other.test, one labelled file), the configuration the check is for.  Prints
the wall and CPU time per connection for each round (CPU is the process's,
client and server together), the median of the rounds, then, where the
code has it (`spike.transports.peer_trust`), the check itself in isolation
on a real connection: a remembered certificate, and one looked at afresh.

Run it against the code before the check with
``PYTHONPATH=<checkout of the old spike> .venv/bin/python bench/handshake.py``
from a directory outside the repository; results go in the report, not here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketAttribute

import spike
from spike.app.commands.devca import CA_CERT, mint_dev_identity
from spike.app.keeper import KeeperHandler
from spike.protocol.identity import TrustDomains
from spike.protocol.keeper import Keeper
from spike.transports.client import HttpsConnection
from spike.transports.event_loop import backend_options
from spike.transports.server import HttpsServer
from spike.transports.tls import SvidFiles, client_context, keeper_check, server_context

TD = "spike.test"
TRUST = TrustDomains(nexus=TD, keeper=TD, bootstrap=TD, pilot="other.test")


def identities(directory: Path) -> tuple[SvidFiles, SvidFiles]:
    ours = mint_dev_identity(directory / "ours", TD, [1])
    theirs = mint_dev_identity(directory / "theirs", "other.test", [1])
    both = directory / "both.pem"
    both.write_bytes((ours.directory / CA_CERT).read_bytes() + (theirs.directory / CA_CERT).read_bytes())
    keeper, nexus = ours.keeper(1), ours.files("nexus")
    return SvidFiles(keeper.cert, keeper.key, both), SvidFiles(nexus.cert, nexus.key, both)


async def rounds(keeper: SvidFiles, nexus: SvidFiles, connections: int, count: int) -> dict[str, Any]:
    server = HttpsServer(server_context(keeper), KeeperHandler(Keeper(TRUST)))
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = int(listener.listeners[0].extra(SocketAttribute.local_port))
    client = client_context(nexus)
    url = f"https://127.0.0.1:{port}"
    results: dict[str, Any] = {"rounds": []}
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, listener)
        connection = HttpsConnection(url, client, keeper_check(TRUST, 1))
        for _ in range(50):  # warm-up
            await connection.request("POST", "/v1/store/shard", b"{}")
            await connection.aclose()
        for _ in range(count):
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(connections):
                status, _ = await connection.request("POST", "/v1/store/shard", b"{}")
                assert status == 404, status
                await connection.aclose()  # the next request opens a new connection: a full handshake
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            results["rounds"].append(
                {"wall_us": round(wall / connections * 1e6, 1), "cpu_us": round(cpu / connections * 1e6, 1)}
            )
        results["median_wall_us"] = statistics.median(r["wall_us"] for r in results["rounds"])
        results["median_cpu_us"] = statistics.median(r["cpu_us"] for r in results["rounds"])
        results["check"] = await isolated_check(port, client)
        tg.cancel_scope.cancel()
    return results


async def isolated_check(port: int, client: Any) -> dict[str, float] | None:
    """The per-domain check alone, on the client side of one real connection (µs per call)."""
    try:
        from spike.transports.peer_trust import verifier_of
    except ImportError:
        return None  # the code before the check
    from spike.protocol.identity import SpiffeId

    stream = await anyio.connect_tcp("127.0.0.1", port, ssl_context=client, tls_standard_compatible=False)
    ssl_object = stream.extra(anyio.streams.tls.TLSAttribute.ssl_object)
    peer = SpiffeId(TD, "/spike/keeper/1")
    verifier = verifier_of(client)
    calls = 20000
    assert verifier.refusal(ssl_object, peer) is None
    started = time.perf_counter()
    for _ in range(calls):
        verifier.refusal(ssl_object, peer)  # remembered
    remembered = (time.perf_counter() - started) / calls * 1e6
    started = time.perf_counter()
    for _ in range(calls):
        verifier._accepted.clear()
        verifier.refusal(ssl_object, peer)  # looked at afresh: the verified chain, the anchor's bundle
    fresh = (time.perf_counter() - started) / calls * 1e6
    await stream.aclose()
    return {"remembered_us": round(remembered, 2), "fresh_us": round(fresh, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--connections", type=int, default=2000, help="new connections per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        keeper, nexus = identities(Path(directory))
        result = anyio.run(rounds, keeper, nexus, args.connections, args.rounds, backend_options=backend_options())
    result["spike"] = spike.__file__
    print(json.dumps(result))


if __name__ == "__main__":
    main()
