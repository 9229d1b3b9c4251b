"""A keeper server and a polling Nexus client, in process, through rotations pushed by the Workload API.

The keeper is the real `HttpsServer` + `KeeperHandler`, given its source's
`server_context` (the factory form); Nexus's side is the real
`HttpsConnection`, given its source's `client_context`.  While both poll
without pause, the Workload API rotates the keeper's SVID, Nexus's SVID, adds
a CA, re-issues everyone from it and removes the old CA.  Nothing may fail:
the kept-alive connection carries on with the identities it was made with,
and every new connection presents the current SVID.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketAttribute

from spike.app.keeper import KeeperHandler
from spike.protocol.identity import TrustDomains
from spike.protocol.keeper import Keeper
from spike.protocol.wire import KEEPER_SHARD_PATH
from spike.transports.client import HttpsConnection, TransportError
from spike.transports.server import HttpsServer
from spike.transports.tls import keeper_check
from spike.transports.workload_api import WorkloadApiSource
from tests.e2e.harness import presented_serial
from tests.identity.tls_probe import handshake
from tests.identity.workload_api import TestCa, WorkloadApi

pytestmark = pytest.mark.anyio

TD = "spike.test"
TRUST = TrustDomains.single(TD)


@dataclass
class Poller:
    """Polls the keeper as Nexus does; counts answers and failures."""

    connection: HttpsConnection
    fresh_each_time: bool
    answers: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(self.answers.values())

    async def run(self) -> None:
        while True:
            try:
                status, _ = await self.connection.request("POST", KEEPER_SHARD_PATH, b"{}")
                self.answers[status] = self.answers.get(status, 0) + 1
            except TransportError as exc:
                self.failures.append(str(exc))
            if self.fresh_each_time:
                await self.connection.aclose()
            await anyio.sleep(0.002)


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.005)


async def test_polling_and_serving_continue_through_svid_and_ca_rotations(workload_api: WorkloadApi) -> None:
    workload_api.add("keeper-1", f"spiffe://{TD}/spike/keeper/1")
    workload_api.add("nexus", f"spiffe://{TD}/spike/nexus")
    keeper_identity = WorkloadApiSource(workload_api.address("keeper-1"), timeout=5, trust_domains={TD})
    nexus_identity = WorkloadApiSource(workload_api.address("nexus"), timeout=5, trust_domains={TD})
    with keeper_identity, nexus_identity:
        keeper = Keeper(TRUST)
        server = HttpsServer(keeper_identity.server_context, KeeperHandler(keeper))
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = int(listener.listeners[0].extra(SocketAttribute.local_port))
        url = f"https://127.0.0.1:{port}"
        kept_alive = Poller(HttpsConnection(url, nexus_identity.client_context, keeper_check(TRUST, 1)), False)
        reconnecting = Poller(HttpsConnection(url, nexus_identity.client_context, keeper_check(TRUST, 1)), True)

        async def settled(*expected: tuple[WorkloadApiSource, str]) -> None:
            """Both sources hold what the agent sent; new connections show it; polling went on meanwhile."""
            await until(
                lambda: all(src.current.serial == workload_api.serial(name) for src, name in expected),
                "the sources to take the rotation",
            )
            shown = await anyio.to_thread.run_sync(presented_serial, port, nexus_identity.client_context())
            assert shown == workload_api.serial("keeper-1")
            seen = handshake(keeper_identity.server_context(), nexus_identity.client_context())
            assert (seen.server_saw, seen.error) == (workload_api.serial("nexus"), "")
            marks = kept_alive.requests, reconnecting.requests
            await until(
                lambda: kept_alive.requests > marks[0] + 3 and reconnecting.requests > marks[1] + 3,
                "both pollers to go on",
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, listener)
            tg.start_soon(kept_alive.run)
            tg.start_soon(reconnecting.run)
            await settled((keeper_identity, "keeper-1"), (nexus_identity, "nexus"))

            workload_api.issue("keeper-1")  # the keeper's SVID rotates
            await settled((keeper_identity, "keeper-1"))
            workload_api.issue("nexus")  # then Nexus's
            await settled((nexus_identity, "nexus"))

            new_ca = TestCa.new(TD, "next CA")  # a CA rotation, in SPIRE's order
            workload_api.set_bundle([workload_api.signing_ca, new_ca])
            await until(
                lambda: keeper_identity.current.authorities == nexus_identity.current.authorities == 2,
                "the new CA in both bundles",
            )
            workload_api.issue_all(new_ca)
            await settled((keeper_identity, "keeper-1"), (nexus_identity, "nexus"))
            workload_api.set_bundle([new_ca])
            await until(
                lambda: keeper_identity.current.authorities == nexus_identity.current.authorities == 1,
                "the old CA gone from both bundles",
            )
            await settled((keeper_identity, "keeper-1"), (nexus_identity, "nexus"))
            tg.cancel_scope.cancel()

        await kept_alive.connection.aclose()
        keeper.forget()

    assert kept_alive.failures == []
    assert reconnecting.failures == []
    assert set(kept_alive.answers) == set(reconnecting.answers) == {404}  # an empty keeper, read by Nexus
    # The kept-alive connection was never dropped: rotation leaves open connections alone.
    assert kept_alive.connection.connections_opened == 1
    # One handshake per request (plus the one the end may have cut short), each with the SVIDs of its moment.
    assert reconnecting.connection.connections_opened - reconnecting.requests in (0, 1)
    # Each: the first SVID, its own re-issue, the CA added, the new-CA SVID, the old CA removed.
    assert keeper_identity.generation == nexus_identity.generation == 5
