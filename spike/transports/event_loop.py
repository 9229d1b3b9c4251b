"""Which event loop runs spike's async code: for servers (spike.transports.runner) and the CLI's portal.

Its own module so that a client command, which needs the choice but never serves, does not import the
server (spike.transports.runner imports spike.transports.server and its HTTP/1.1 parser).
"""

from __future__ import annotations

from typing import Any


def backend_options() -> dict[str, Any]:
    """uvloop when it is installed: its C event loop and TLS roughly halve the server's cost per request."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}
