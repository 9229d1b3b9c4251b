"""A keep-alive HTTP/1.1 client connection over mutual TLS (h11 on anyio).

One `HttpsConnection` talks to one origin and reuses one TLS connection
across requests, which is what keeps Nexus's forever-polling cheap
(DESIGN.md 2.7).  Errors are mapped at this edge, as httpcore does: callers
see `TransportError` with a short reason and nothing else.  A request that is
cancelled (for example by its deadline) closes the connection, shielded, so
a half-used h11 state is never reused.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

import anyio
import anyio.abc
import h11
from anyio.streams.tls import TLSAttribute, TLSStream

from .tls import PeerCheck, spiffe_id_of


class TransportError(Exception):
    """A request got no usable HTTP answer; the message says why, briefly."""


class PeerIdentityError(TransportError):
    pass


def parse_origin(url: str) -> tuple[str, int]:
    """(host, port) of an https URL; raises ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"not an https URL: {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"URL must be an origin only (https://host:port): {url!r}")
    return parts.hostname, parts.port or 443


class HttpsConnection:
    def __init__(
        self,
        url: str,
        ssl_context: ssl.SSLContext | Callable[[], ssl.SSLContext],
        peer_check: PeerCheck,
        *,
        expected_peer: str = "",
        max_response_bytes: int = 1024 * 1024,
        connect_timeout: float = 5.0,
        retry_stale: bool = True,
    ) -> None:
        """`retry_stale`: when a kept-alive connection closes before answering, send the
        request once more on a new connection.  Only for requests that are safe to repeat:
        the server may have acted on the first one before it closed (or died)."""
        self.host, self.port = parse_origin(url)
        self._host_header = url.split("://", 1)[1].rstrip("/").encode()
        self._ssl_context = ssl_context
        self._peer_check = peer_check
        self._expected_peer = expected_peer
        self._max_response_bytes = max_response_bytes
        self._connect_timeout = connect_timeout
        self._retry_stale = retry_stale
        self._stream: TLSStream | None = None
        self._conn: h11.Connection | None = None
        self._lock = anyio.Lock()
        self.connections_opened = 0

    async def request(
        self, method: str, path: str, body: bytes = b"", content_type: str = "application/json"
    ) -> tuple[int, bytes]:
        """Send one request and return (status, body).  Raises `TransportError`."""
        async with self._lock:
            try:
                return await self._attempt(method, path, body, content_type)
            except BaseException:
                await self.aclose()
                raise

    async def _attempt(self, method: str, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        reused = self._stream is not None
        try:
            return await self._exchange(method, path, body, content_type)
        except _StaleConnection:
            # The server closed a kept-alive connection before answering (a
            # restarted keeper does this): that says nothing about the server
            # now, so try once more on a fresh connection.
            await self.aclose()
            if not reused or not self._retry_stale:
                raise TransportError("connection closed before an answer") from None
        try:
            return await self._exchange(method, path, body, content_type)
        except _StaleConnection:
            raise TransportError("connection closed before an answer") from None

    async def _connect(self) -> tuple[TLSStream, h11.Connection]:
        if self._stream is not None and self._conn is not None:
            return self._stream, self._conn
        context = self._ssl_context if isinstance(self._ssl_context, ssl.SSLContext) else self._ssl_context()
        try:
            with anyio.fail_after(self._connect_timeout):
                tcp = await anyio.connect_tcp(self.host, self.port)
                try:
                    tls = await TLSStream.wrap(tcp, hostname=self.host, ssl_context=context, standard_compatible=False)
                except BaseException:
                    await tcp.aclose()
                    raise
        except TimeoutError:
            raise TransportError("connect timed out") from None
        except ssl.SSLError as exc:
            raise TransportError(f"TLS handshake failed: {exc.reason or exc.__class__.__name__}") from None
        except (OSError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
            raise TransportError(_os_reason(exc)) from None
        peer = spiffe_id_of(tls.extra(TLSAttribute.peer_certificate, None))
        if not self._peer_check(peer):
            await _close(tls)
            expected = f", expected {self._expected_peer}" if self._expected_peer else ""
            raise PeerIdentityError(f"peer presented {peer or 'no SPIFFE ID'}{expected}")
        self.connections_opened += 1
        self._stream = tls
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        return tls, self._conn

    async def _exchange(self, method: str, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        stream, conn = await self._connect()
        headers = [
            (b"host", self._host_header),
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"accept", b"application/json"),
        ]
        data = conn.send(h11.Request(method=method, target=path, headers=headers)) or b""
        data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        try:
            await stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, ssl.SSLError):
            raise _StaleConnection from None
        status = 0
        received_any = False
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                raise TransportError("malformed HTTP response") from None
            if event is h11.NEED_DATA:
                try:
                    incoming = await stream.receive(65536)
                except anyio.EndOfStream:
                    incoming = b""
                except (anyio.BrokenResourceError, OSError, ssl.SSLError):
                    if not received_any:
                        raise _StaleConnection from None
                    raise TransportError("connection lost during the response") from None
                if not incoming and not received_any:
                    raise _StaleConnection
                received_any = True
                conn.receive_data(incoming)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > self._max_response_bytes:
                    raise TransportError("response too large")
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise TransportError("connection closed during the response")
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            await self.aclose()
        return status, b"".join(chunks)

    async def aclose(self) -> None:
        stream, self._stream, self._conn = self._stream, None, None
        if stream is not None:
            await _close(stream)


class _StaleConnection(Exception):
    pass


def _os_reason(exc: BaseException) -> str:
    # anyio reports a failed connect as "All connection attempts failed" with the
    # per-address errors in the cause; the first of those says what happened.
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    if isinstance(cause, OSError):
        exc = cause
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    if isinstance(exc, OSError) and exc.args:
        return str(exc.args[0]).lower()
    if isinstance(exc, anyio.EndOfStream):
        return "connection closed during the handshake"
    return exc.__class__.__name__


async def _close(stream: anyio.abc.AsyncResource) -> None:
    with anyio.move_on_after(1, shield=True):
        with contextlib.suppress(OSError, ssl.SSLError, anyio.BrokenResourceError):
            await stream.aclose()
