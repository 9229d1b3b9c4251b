"""HTTP/1.1 over mutual TLS, served with h11 on anyio.

One task per connection, keep-alive, and limits on everything a client
controls: handshake time, idle time, time to deliver a whole request, header
size, body size and the number of open connections.  A client that breaks
any of them gets a 4xx (when HTTP is still possible) and a closed
connection; nothing a client sends can end the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import anyio
import anyio.abc
import h11
from anyio.streams.tls import TLSAttribute, TLSStream

from spike.protocol.api import ApiRequest, ApiResponse
from spike.protocol.wire import ErrorCode, error_body

from .tls import spiffe_id_of

log = logging.getLogger("spike.transports.server")

# The server's TLS context, or a function returning the current one: each new
# connection asks it, so a rotated SVID is presented from the next handshake on
# while connections already open keep theirs.
ContextSource = ssl.SSLContext | Callable[[], ssl.SSLContext]

# A handler answers at once, or with a future that another thread (the
# storage writer) resolves, for example once a group commit is durable.
Reply = ApiResponse | Future[ApiResponse]
Handler = Callable[[ApiRequest], Reply]

_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    411: b"Length Required",
    413: b"Content Too Large",
    415: b"Unsupported Media Type",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


_ACCEPT_RETRY_DELAY = 0.1


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 64 * 1024
    handshake_timeout: float = 10.0
    request_timeout: float = 10.0  # from a request's first byte to its last
    idle_timeout: float = 60.0  # keep-alive wait for the next request
    max_connections: int = 1024


class _ClientGone(Exception):
    """The connection ended or stalled: nothing more can be said to this client."""


class _Reject(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


class HttpsServer:
    """Serves `handler` to mTLS clients; the handler sees the peer's SPIFFE ID."""

    def __init__(
        self, ssl_context: ContextSource | None, handler: Handler, limits: ServerLimits | None = None
    ) -> None:
        # ssl_context=None serves plain HTTP: only for the loopback metrics listener.
        self._ssl_context = ssl_context
        self._handler = handler
        self.limits = limits or ServerLimits()
        self._open = 0
        self._accepting: anyio.CancelScope | None = None
        self._draining = False
        self._idle: set[anyio.CancelScope] = set()
        self._all_closed: anyio.Event | None = None

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def draining(self) -> bool:
        return self._draining

    async def serve(self, listener: anyio.abc.Listener[anyio.abc.SocketStream], *, grace: float = 5.0) -> None:
        """Serve until `drain()`; then let open requests finish for up to `grace` seconds."""
        self._accepting = anyio.CancelScope()
        self._all_closed = anyio.Event()
        if self._draining:
            self._accepting.cancel()
        async with anyio.create_task_group() as connections:
            with self._accepting:
                async with listener:
                    while True:
                        try:
                            await listener.serve(self._guarded, task_group=connections)
                        except* OSError as failed:
                            # accept() fails while the process is out of file descriptors
                            # or memory (EMFILE, ENFILE, ENOBUFS ...); that passes as
                            # connections close, so wait and accept again (as trio does)
                            # rather than end the server.  Open connections carry on.
                            reasons = sorted({str(getattr(e, "strerror", None) or e) for e in failed.exceptions})
                            log.warning("accepting a connection failed (%s): retrying", "; ".join(reasons))
                        await anyio.sleep(_ACCEPT_RETRY_DELAY)
            if self._open:
                with anyio.move_on_after(grace):
                    await self._all_closed.wait()
                if self._open:
                    log.warning("%d connection(s) still busy after %gs: closing them", self._open, grace)
            connections.cancel_scope.cancel()

    def drain(self) -> None:
        """Stop accepting, close idle keep-alive connections, finish requests under way."""
        self._draining = True
        if self._accepting is not None:
            self._accepting.cancel()
        for scope in self._idle:
            scope.cancel()
        if not self._open and self._all_closed is not None:
            self._all_closed.set()

    async def _guarded(self, stream: anyio.abc.SocketStream) -> None:
        if self._open >= self.limits.max_connections:
            log.warning("connection limit (%d) reached: closing a new connection", self._open)
            await _close(stream)
            return
        self._open += 1
        try:
            await self.handle_connection(stream)
        except Exception:
            # One connection's failure must never reach the listener's task group.
            log.exception("unexpected error on a connection")
        finally:
            self._open -= 1
            if self._draining and not self._open and self._all_closed is not None:
                self._all_closed.set()
            await _close(stream)

    async def handle_connection(self, stream: anyio.abc.ByteStream) -> None:
        if self._ssl_context is None:
            tls: anyio.abc.ByteStream = stream
            peer = None
        else:
            context = self._ssl_context if isinstance(self._ssl_context, ssl.SSLContext) else self._ssl_context()
            try:
                with anyio.fail_after(self.limits.handshake_timeout):
                    tls = await TLSStream.wrap(
                        stream, server_side=True, ssl_context=context, standard_compatible=False
                    )
            except (TimeoutError, OSError, ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
                log.debug("TLS handshake failed: %s", exc.__class__.__name__)
                return
            peer = spiffe_id_of(tls.extra(TLSAttribute.peer_certificate, None))
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        try:
            while not self._draining:
                try:
                    request = await self._read_request(tls, conn, peer)
                except _Reject as reject:
                    await self._send_error(tls, conn, reject.status)
                    return
                if request is None:
                    return
                reply = self._respond(request)
                response = reply if isinstance(reply, ApiResponse) else await _settled(reply, request)
                await _send_response(tls, conn, response, close=self._draining)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except _ClientGone:
            return
        finally:
            await _close(tls)

    def _respond(self, request: ApiRequest) -> Reply:
        try:
            return self._handler(request)
        except Exception:
            log.exception("handler failed on %s %s", request.method, request.path)
            return ApiResponse(500, error_body(ErrorCode.INTERNAL))

    async def _read_request(
        self, stream: anyio.abc.ByteStream, conn: h11.Connection, peer: object
    ) -> ApiRequest | None:
        limits = self.limits
        deadline = math.inf  # set once the request's first byte has arrived
        head: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Reject(exc.error_status_hint) from None
            if event is h11.NEED_DATA:
                if deadline == math.inf:
                    # Waiting for a request to begin: idle, so a drain may close it.
                    with anyio.CancelScope() as idle:
                        self._idle.add(idle)
                        try:
                            data = await _receive(stream, limits.idle_timeout, reject_on_timeout=False)
                        finally:
                            self._idle.discard(idle)
                    if idle.cancelled_caught:
                        return None
                else:
                    data = await _receive(stream, deadline - anyio.current_time(), reject_on_timeout=head is not None)
                if deadline == math.inf:
                    deadline = anyio.current_time() + limits.request_timeout
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                head = event
                if _head_size(event) > limits.max_header_bytes:
                    raise _Reject(431)
                if _content_length(event) > limits.max_body_bytes:
                    raise _Reject(413)
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > limits.max_body_bytes:
                    raise _Reject(413)
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                target = head.target.decode("ascii", "replace")
                path, _, query = target.partition("?")
                return ApiRequest(
                    content_type=_header(head, b"content-type").decode("ascii", "replace").partition(";")[0].strip(),
                    method=head.method.decode("ascii", "replace"),
                    path=path,
                    peer=peer,  # type: ignore[arg-type]
                    body=bytes(body),
                    query=query,
                )
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _send_error(self, stream: anyio.abc.ByteStream, conn: h11.Connection, status: int) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        code = ErrorCode.BAD_REQUEST if status < 500 else ErrorCode.INTERNAL
        with contextlib.suppress(_ClientGone, h11.LocalProtocolError):
            await _send_response(stream, conn, ApiResponse(status, error_body(code)), close=True)


async def _receive(stream: anyio.abc.ByteStream, wait: float, *, reject_on_timeout: bool) -> bytes:
    try:
        with anyio.fail_after(max(wait, 0.0)):
            return await stream.receive(65536)
    except TimeoutError:
        if reject_on_timeout:
            raise _Reject(408) from None
        raise _ClientGone from None
    except anyio.EndOfStream:
        return b""
    except (anyio.BrokenResourceError, OSError, ssl.SSLError):
        raise _ClientGone from None


def _head_size(request: h11.Request) -> int:
    # h11 bounds only a head that is still incomplete in its buffer; one that
    # arrives whole in a single read (a TLS record holds up to 16 KiB) is measured here.
    size = len(request.method) + len(request.target) + len(b"  HTTP/1.1\r\n\r\n")
    return size + sum(len(name) + len(value) + 4 for name, value in request.headers)


def _header(request: h11.Request, wanted: bytes) -> bytes:
    for name, value in request.headers:
        if name == wanted:
            return bytes(value)
    return b""


def _content_length(request: h11.Request) -> int:
    return int(_header(request, b"content-length") or 0)  # h11 has already checked it is a number


async def _settled(reply: Future[ApiResponse], request: ApiRequest) -> ApiResponse:
    """Wait for a handler's future without blocking the loop.

    Shielded: once a write is queued it completes whatever happens to this
    connection, so its answer is awaited even while the server shuts down.
    """
    response = ApiResponse(500, error_body(ErrorCode.INTERNAL))
    with anyio.CancelScope(shield=True):
        try:
            response = await asyncio.wrap_future(reply)
        except Exception:
            log.exception("handler failed on %s %s", request.method, request.path)
    return response


async def _send_response(
    stream: anyio.abc.ByteStream, conn: h11.Connection, response: ApiResponse, *, close: bool
) -> None:
    headers = [
        (b"content-type", response.content_type.encode()),
        (b"content-length", str(len(response.body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if close:
        headers.append((b"connection", b"close"))
    reason = _REASONS.get(response.status, b"")
    data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
    data = (data or b"") + (conn.send(h11.Data(data=response.body)) or b"")
    data += conn.send(h11.EndOfMessage()) or b""
    try:
        await stream.send(data)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, ssl.SSLError):
        raise _ClientGone from None


async def _close(stream: anyio.abc.AsyncResource) -> None:
    with anyio.move_on_after(1, shield=True):
        with contextlib.suppress(OSError, ssl.SSLError, anyio.BrokenResourceError):
            await stream.aclose()
