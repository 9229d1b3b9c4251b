"""A request sent in the same write as the client's last TLS 1.3 handshake flight.

TLS 1.3 lets a client send application data right behind its Finished
message, and clients do (Go's, Python's asyncio streams): the server may
then see the first request before its own handshake call has returned.  That
request must still be answered, and with the peer's identity known: not
refused as coming from "a peer without SPIFFE ID", and not dropped.
"""

from __future__ import annotations

import json
import socket
import ssl

import pytest

from spike.app.commands.devca import DevIdentity
from tests.transport.transport_rig import in_thread, keeper_server, raw_client_context, request_bytes

pytestmark = pytest.mark.anyio


def handshake_then_request_in_one_write(port: int, ctx: ssl.SSLContext, request: bytes) -> tuple[int, bytes]:
    """Handshake through memory BIOs, so that the Finished flight and `request` leave in one `sendall`."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                data = sock.recv(65536)
                assert data, "closed during the handshake"
                incoming.write(data)
        tls.write(request)
        sock.sendall(outgoing.read())  # client Certificate, CertificateVerify, Finished + the request
        received = b""
        while b"\r\n\r\n" not in received or not received.endswith(b"}"):
            data = sock.recv(65536)  # a TimeoutError here is the bug: the answer was dropped
            assert data, f"closed before a whole answer: {received!r}"
            incoming.write(data)
            try:
                received += tls.read(65536)
            except ssl.SSLWantReadError:
                continue
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def test_request_behind_the_finished_message_is_answered_as_the_peer(dev_identity: DevIdentity) -> None:
    nexus = raw_client_context(dev_identity.files("nexus"), dev_identity.files("nexus").bundle)
    nexus.minimum_version = ssl.TLSVersion.TLSv1_3
    async with keeper_server(dev_identity, 1) as k:
        for _ in range(3):
            status, body = await in_thread(
                lambda: handshake_then_request_in_one_write(k.served.port, nexus, request_bytes())
            )
            # 404 (empty keeper, asked by Nexus), not 401: the peer's SPIFFE ID was known.
            assert (status, json.loads(body)) == (404, {"err": "api_not_found"})
