"""Handshakes between two TLS contexts, to see which certificates each side presents (imported by the tests).

No sockets on the network: a socketpair, the server side in a thread.  Each
side reports the serial number of the certificate the *other* side
presented, so a test can tell which SVID a context carries.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from tests.e2e.harness import wait_until


@dataclass
class Handshake:
    server_saw: int | None  # serial of the client's certificate, as the server verified it
    client_saw: int | None  # serial of the server's certificate, as the client verified it
    error: str = ""  # why the handshake failed, if it did


def _serial(der: bytes | None) -> int | None:
    return None if der is None else x509.load_der_x509_certificate(der).serial_number


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, timeout: float = 5.0) -> Handshake:
    left, right = socket.socketpair()
    left.settimeout(timeout)
    right.settimeout(timeout)
    seen: dict[str, Any] = {}

    def serve() -> None:
        try:
            with server.wrap_socket(left, server_side=True) as tls:
                seen["client_cert"] = tls.getpeercert(binary_form=True)
                tls.sendall(b"k")
        except (OSError, ssl.SSLError) as exc:
            seen["server_error"] = f"{exc.__class__.__name__}: {exc}"

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    result = Handshake(None, None)
    try:
        with client.wrap_socket(right, server_side=False) as tls:
            result.client_saw = _serial(tls.getpeercert(binary_form=True))
            tls.recv(1)  # under TLS 1.3 the server's verdict on our certificate arrives here
    except (OSError, ssl.SSLError) as exc:
        result.error = f"{exc.__class__.__name__}: {exc}"
    finally:
        right.close()
        thread.join(timeout)
        left.close()
    result.server_saw = _serial(seen.get("client_cert"))
    if "server_error" in seen:
        result.error = result.error or seen["server_error"]
        result.server_saw = None
    return result


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Poll `condition` every few milliseconds until it is truthy; fail after `timeout` seconds."""
    return wait_until(condition, what, timeout, every=0.005)
