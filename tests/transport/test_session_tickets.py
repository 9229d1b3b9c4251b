"""spike's servers issue no TLS 1.3 session tickets.

No spike client resumes a session, and the two tickets OpenSSL sends after every
handshake cost both ends: a keeper ~15% more CPU per connection, a restarted Nexus
~1.2 ms for its first polls (issue 20).  TLS 1.2 session-ID resumption is not
affected (tests/transport/test_trust_domains.py checks what a resumed session may do).
"""

from __future__ import annotations

import ssl

import pytest

from spike.app.commands.devca import DevIdentity
from tests.transport.transport_rig import (
    in_thread,
    keeper_server,
    raw_client_context,
    read_response,
    request_bytes,
    tls_connect,
)

pytestmark = pytest.mark.anyio


def _ticket_after_a_request(port: int, context: ssl.SSLContext) -> bool:
    """One request on a TLS 1.3 connection; did the server hand out a session ticket by the time it answered?"""
    with tls_connect(port, context) as tls:
        assert tls.version() == "TLSv1.3"
        tls.sendall(request_bytes())
        answer = read_response(tls)  # tickets come right after the handshake, before any answer
        assert answer is not None and answer.status == 404
        session = tls.session
        return session is not None and session.has_ticket


async def test_a_keeper_hands_out_no_session_ticket(dev_identity: DevIdentity) -> None:
    nexus = raw_client_context(dev_identity.files("nexus"), dev_identity.files("nexus").bundle)
    async with keeper_server(dev_identity, 1) as k:
        assert not await in_thread(lambda: _ticket_after_a_request(k.served.port, nexus))
