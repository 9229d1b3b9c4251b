"""A synchronous face on the async client, for the CLI and bootstrap.

The command-line tools are plain sequential programs; they run their
requests through one anyio blocking portal (an event loop in a helper
thread) so that they share the exact client code, TLS and error mapping of
the servers.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from types import TracebackType

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal

from spike.protocol.events import FailureKind

from .client import HttpsConnection, TransportError
from .event_loop import backend_options
from .tls import PeerCheck


class BlockingConnection:
    def __init__(self, portal: BlockingPortal, connection: HttpsConnection, timeout: float) -> None:
        self._portal = portal
        self._connection = connection
        self._timeout = timeout

    def post(
        self,
        path: str,
        body: bytes = b"{}",
        *,
        timeout: float | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, bytes]:
        """(status, body); raises `TransportError` (a timeout included)."""
        return self._portal.call(self._post, path, body, timeout or self._timeout, content_type)

    async def _post(self, path: str, body: bytes, timeout: float, content_type: str) -> tuple[int, bytes]:
        try:
            with anyio.fail_after(timeout):
                return await self._connection.request("POST", path, body, content_type)
        except TimeoutError:
            raise TransportError(f"no answer within {timeout:g} s", FailureKind.TIMEOUT) from None

    def close(self) -> None:
        self._portal.call(self._connection.aclose)


class ClientSession:
    """Owns the portal; hands out blocking connections that share it.

    `ssl_context` may be a function returning the current context (an identity
    source's `client_context`): each new connection then uses the current SVID.
    """

    def __init__(self, ssl_context: ssl.SSLContext | Callable[[], ssl.SSLContext], *, timeout: float = 10.0) -> None:
        self._ssl_context = ssl_context
        self._timeout = timeout
        self._stack = ExitStack()
        self._portal = self._stack.enter_context(start_blocking_portal(backend_options=backend_options()))
        self._connections: list[BlockingConnection] = []

    def connect(
        self,
        url: str,
        peer_check: PeerCheck,
        *,
        expected_peer: str = "",
        max_response_bytes: int = 1024 * 1024,
        retry_stale: bool = True,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> BlockingConnection:
        connection = BlockingConnection(
            self._portal,
            HttpsConnection(
                url,
                self._ssl_context,
                peer_check,
                expected_peer=expected_peer,
                max_response_bytes=max_response_bytes,
                retry_stale=retry_stale,
                headers=headers,
            ),
            self._timeout,
        )
        self._connections.append(connection)
        return connection

    def close(self) -> None:
        for connection in self._connections:
            connection.close()
        self._stack.close()

    def __enter__(self) -> ClientSession:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
