"""Connections that have not authenticated cannot crowd out those that have (issue 14, M3).

A keeper server in this process, with real TLS on loopback and small budgets;
the floods are plain sockets (silent, or stopping in the middle of a
ClientHello) opened by this test.  Every check is an outcome: who got an
answer, which sockets the server closed.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest

from spike.app.commands.devca import DevIdentity
from spike.app.keeper import KEEPER_LIMITS
from spike.protocol.keeper import Keeper
from spike.transports.server import ServerLimits
from spike.transports.tls import server_context
from tests.transport.transport_rig import (
    TRUST,
    client_hello,
    in_thread,
    keeper_server,
    raw_client_context,
    raw_request,
    read_response,
    request_bytes,
    running,
    tls_connect,
    wait_for,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def nexus(dev_identity: DevIdentity) -> ssl.SSLContext:
    return raw_client_context(dev_identity.files("nexus"), dev_identity.files("nexus").bundle)


def open_sockets(port: int, count: int, first_bytes: bytes = b"") -> list[socket.socket]:
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if first_bytes:
            sock.sendall(first_bytes)
        held.append(sock)
    return held


def closed_by_server(sock: socket.socket, wait: float) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True
    except TimeoutError:
        return False


def answered(port: int, ctx: ssl.SSLContext) -> int:
    """A request on a fresh TLS connection: its status (0 when the connection was closed first)."""
    try:
        answer = raw_request(port, ctx)
    except (ssl.SSLError, ConnectionError, TimeoutError):
        return 0
    return 0 if answer is None else answer.status


@contextlib.contextmanager
def closing(socks: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


async def test_silent_sockets_far_beyond_the_connection_limit_do_not_lock_clients_out(
    dev_identity: DevIdentity, nexus: ssl.SSLContext
) -> None:
    """Silent sockets used to hold connection slots for the whole handshake timeout: 4 of them locked
    out every client of a server with max_connections=4 for 30 s."""
    limits = ServerLimits(max_connections=4, handshake_timeout=30.0)
    async with keeper_server(dev_identity, 1, limits) as k:
        port = k.served.port
        with closing(await in_thread(lambda: open_sockets(port, 40))):
            await wait_for(lambda: k.served.listener.accepted >= 40, 5, "the silent sockets to be accepted")
            statuses = [await in_thread(lambda: answered(port, nexus)) for _ in range(5)]
            assert statuses == [404] * 5


async def test_the_oldest_silent_socket_makes_room_for_a_new_one(dev_identity: DevIdentity) -> None:
    limits = ServerLimits(max_silent=4, handshake_timeout=30.0)
    async with keeper_server(dev_identity, 1, limits) as k:
        port, server = k.served.port, k.served.server
        with closing(await in_thread(lambda: open_sockets(port, 6))) as held:
            await wait_for(lambda: server.accepted == 6, 5, "six sockets accepted")
            closed = [await in_thread(functools.partial(closed_by_server, s, 0.5)) for s in held]
            assert closed == [True, True, False, False, False, False]
            assert server.silent == 4


async def test_a_stalled_handshake_makes_room_for_a_client(dev_identity: DevIdentity, nexus: ssl.SSLContext) -> None:
    """Half a ClientHello, then nothing: such sockets displace each other, the oldest first, and a real
    client displaces the oldest of them."""
    limits = ServerLimits(max_handshakes=3, handshake_timeout=30.0)
    half = client_hello()[:40]
    async with keeper_server(dev_identity, 1, limits) as k:
        port, server = k.served.port, k.served.server
        with closing(await in_thread(lambda: open_sockets(port, 5, half))) as held:
            await wait_for(lambda: server.handshaking == 3 and server.shed == 2, 5, "three stalled handshakes")
            closed = [await in_thread(functools.partial(closed_by_server, s, 0.5)) for s in held]
            assert closed == [True, True, False, False, False]
            assert await in_thread(lambda: answered(port, nexus)) == 404
            assert await in_thread(functools.partial(closed_by_server, held[2], 2.0))  # the oldest left made room


class SilentFlood:
    """Opens silent sockets to a port, one a millisecond (the server shares this process), and keeps
    them: the server's silent stage turns over at that rate."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        held: list[socket.socket] = []
        while not self._stop.is_set():
            try:
                held.append(socket.create_connection(("127.0.0.1", self.port), timeout=1))
                self.opened += 1
            except OSError:
                continue
            if len(held) > 256:  # the flood's own descriptors: the oldest go (the server closed them long ago)
                held.pop(0).close()
            time.sleep(0.001)
        for sock in held:
            sock.close()

    def __enter__(self) -> SilentFlood:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)


async def test_a_client_gets_through_a_sustained_silent_flood(dev_identity: DevIdentity, nexus: ssl.SSLContext) -> None:
    # The silent stage holds 64 while the flood opens one a millisecond: a client's hello has tens of
    # milliseconds to arrive before its connection would be the oldest silent one (the server shares
    # this process with the flood, and CI machines are busy: 8 slots, 8 ms, failed there once).
    limits = ServerLimits(max_silent=64, max_handshakes=4, max_connections=4, handshake_timeout=30.0)
    async with keeper_server(dev_identity, 1, limits) as k:
        port, server = k.served.port, k.served.server
        with SilentFlood(port) as flood:
            await wait_for(lambda: server.shed > 200, 20, "the flood to turn the silent stage over")
            statuses = [await in_thread(lambda: answered(port, nexus)) for _ in range(10)]
            assert flood.opened > 264
        assert statuses == [404] * 10


async def test_nexus_takes_the_place_of_another_peer_at_a_keepers_connection_limit(
    dev_identity: DevIdentity, nexus: ssl.SSLContext
) -> None:
    """A peer with a valid SVID but no business with a keeper can hold every connection slot (64); Nexus
    (or bootstrap) still gets in, in place of the oldest idle one, and nobody else does."""
    from spike.app.keeper import keeper_server as real_keeper_server  # the app's own wiring

    keeper = Keeper(TRUST)
    other = raw_client_context(dev_identity.files("pilot-superuser"), dev_identity.files("nexus").bundle)
    limit = KEEPER_LIMITS.max_connections
    server = real_keeper_server(server_context(dev_identity.keeper(1)), keeper, TRUST)
    async with running(server) as served:
        held = [await in_thread(lambda: tls_connect(served.port, other)) for _ in range(limit)]
        try:
            await wait_for(lambda: server.open_connections == limit, 5)
            assert await in_thread(lambda: answered(served.port, other)) == 0  # another peer is refused
            inside = await in_thread(lambda: tls_connect(served.port, nexus))
            held.append(inside)
            assert await in_thread(functools.partial(use, inside)) == 404  # Nexus gets in ...
            assert await in_thread(functools.partial(closed_by_server, held[0], 2.0))  # ... in the oldest's place
            assert server.open_connections == limit
            assert await in_thread(lambda: answered(served.port, other)) == 0  # still no room for the others
            assert await in_thread(functools.partial(use, held[-2])) == 401  # who is in is still served
        finally:
            for sock in held:
                sock.close()
    keeper.forget()


def use(sock: ssl.SSLSocket) -> int:
    """A request on an open connection: its status (0 when the connection was closed first)."""
    sock.sendall(request_bytes())
    response = read_response(sock)
    return 0 if response is None else response.status
