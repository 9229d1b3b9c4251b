"""Accepted connections send small writes at once (TCP_NODELAY), on whichever event loop runs the server.

uvloop sets TCP_NODELAY on the sockets it wraps; asyncio's own loop, which a keeper runs
on, does not set it on an accepted socket.  With Nagle's algorithm on, a TLS 1.3 server's
answer, written just after its session tickets, waits for the client's ACK of the tickets,
which Linux delays up to ~40 ms: a restarted Nexus waited that long for a keeper's shard in
about one poll in ten (issue 20).  spike's accept sets the option itself.
"""

from __future__ import annotations

import socket
from pathlib import Path

import anyio
import pytest

from spike.transports.server import accept

pytestmark = pytest.mark.anyio


def _nodelay(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
async def test_an_accepted_tcp_connection_has_nodelay(family: socket.AddressFamily, host: str) -> None:
    try:
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.bind((host, 0))
    except OSError:
        pytest.skip(f"no {host} here")
    with listener:
        listener.listen()
        listener.setblocking(False)
        with socket.create_connection(listener.getsockname()[:2]):
            with anyio.fail_after(5):
                conn = await accept(listener)
            with conn:
                assert _nodelay(conn)


async def test_a_unix_socket_connection_is_accepted_too(tmp_path: Path) -> None:
    """TCP_NODELAY is for TCP only: on a Unix socket, setting it would fail the accept."""
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()
        listener.setblocking(False)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
            with anyio.fail_after(5):
                conn = await accept(listener)
            conn.close()
        assert conn.family == socket.AF_UNIX
