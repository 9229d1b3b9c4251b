"""HTTP/1.1 over mutual TLS: spike's server, on the event loop's own transports.

Each connection is an `asyncio.Protocol`: bytes arrive in `data_received`,
the sans-IO `RequestParser` (spike/transports/http1.py) turns them into
requests, the handler answers inline (or with a future that the storage
writer thread resolves), and the answer is written in one call.  There is no
task and no await per request: with uvloop, TLS and socket I/O run in C,
which is what makes the server's per-request cost small (see
docs/benchmarks.md for the measurements that led here).  The process is
still run by anyio (`serve` is an anyio-cancellable coroutine); sockets are
accepted by our own loop (so running out of file descriptors is waited
out, not logged a thousand times) and each one's TLS handshake runs on its
own with the identity source's current SSL context: an SVID rotation needs
no restart.

Limits on everything a client controls: TLS handshake time, idle time
between requests, time to deliver a whole request (slow clients), head and
body size, open connections, and unread responses (a client that sends but
never reads is paused).  A client that breaks one gets a 4xx when HTTP is
still possible and a closed connection; nothing a client sends ends the
server or touches another connection.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import cast

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from spike.protocol.api import ApiRequest, ApiResponse
from spike.protocol.identity import SpiffeId
from spike.protocol.wire import ErrorCode, error_body

from .http1 import CONTINUE, HttpError, Request, RequestParser, response
from .peer_trust import refusal, warn_refused
from .tls import spiffe_id_of

log = logging.getLogger("spike.transports.server")

# A handler answers at once, or with a future that another thread (the
# storage writer) resolves, for example once a group commit is durable.
Reply = ApiResponse | Future[ApiResponse]
Handler = Callable[[ApiRequest], Reply]
ContextSource = ssl.SSLContext | Callable[[], ssl.SSLContext]

_INTERNAL_ERROR = ApiResponse(500, error_body(ErrorCode.INTERNAL))
_ACCEPT_RETRY_DELAY = 0.1
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_CLOSE_LINGER = 0.5  # seconds a closing connection may take to flush and say goodbye


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 64 * 1024
    handshake_timeout: float = 10.0
    request_timeout: float = 10.0  # from a request's first byte to its last
    idle_timeout: float = 60.0  # keep-alive wait for the next request
    max_connections: int = 1024


class HttpsServer:
    """Serves `handler` to mTLS clients (plain HTTP if `ssl_context` is None: metrics only)."""

    def __init__(self, ssl_context: ContextSource | None, handler: Handler, limits: ServerLimits | None = None) -> None:
        self._ssl_context = ssl_context
        self.handler = handler
        self.limits = limits or ServerLimits()
        self.accepted = 0  # TCP connections accepted, for tests and metrics
        self.refused_at_limit = 0  # connections closed at once since the limit was last reached
        self.refused_peers = 0  # handshakes whose certificate is not the SPIFFE ID it claims
        self._connections: set[_Connection] = set()
        self._accepting: anyio.CancelScope | None = None
        self._pending = 0  # accepted sockets still in their TLS handshake
        self._draining = False
        self._drained: anyio.Event | None = None
        self._all_closed: anyio.Event | None = None

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    @property
    def draining(self) -> bool:
        return self._draining

    def context(self) -> ssl.SSLContext | None:
        source = self._ssl_context
        return source if source is None or isinstance(source, ssl.SSLContext) else source()

    async def serve(self, listener: anyio.abc.Listener[anyio.abc.SocketStream], *, grace: float = 5.0) -> None:
        """Serve on the listener's sockets until `drain()` (or cancellation).

        After a drain, requests under way get up to `grace` seconds to finish;
        on cancellation every connection is closed at once.
        """
        self._drained = anyio.Event()
        self._all_closed = anyio.Event()
        sockets = [one.extra(SocketAttribute.raw_socket) for one in getattr(listener, "listeners", [listener])]
        try:
            async with anyio.create_task_group() as accepting:
                self._accepting = accepting.cancel_scope
                for sock in sockets:
                    accepting.start_soon(self._accept_loop, sock, accepting)
                if self._draining:
                    self.drain()
            # Accepting has stopped: nobody new can connect while requests finish.
            with anyio.CancelScope(shield=True):
                await listener.aclose()
            await self._drained.wait()
            if self._connections:
                with anyio.move_on_after(grace):
                    await self._all_closed.wait()
                if self._connections:
                    log.warning("%d connection(s) still busy after %gs: closing them", len(self._connections), grace)
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
            for connection in list(self._connections):
                connection.abort()

    async def _accept_loop(self, sock: socket.socket, handshakes: anyio.abc.TaskGroup) -> None:
        loop = asyncio.get_running_loop()
        starved = False
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                # Out of file descriptors or memory: that passes as connections
                # close; wait and accept again (as trio does), saying so once.
                if not starved:
                    log.warning("accepting connections failed (%s): retrying", exc.strerror)
                    starved = True
                await anyio.sleep(_ACCEPT_RETRY_DELAY)
                continue
            starved = False
            self.accepted += 1
            if self._draining or self._pending + len(self._connections) >= self.limits.max_connections:
                if not self._draining:
                    # Said once per episode, not once per connection: a flood must not become a log flood.
                    if not self.refused_at_limit:
                        log.warning(
                            "connection limit (%d) reached: closing new connections until there is room",
                            self.limits.max_connections,
                        )
                    self.refused_at_limit += 1
                conn.close()
                continue
            if self.refused_at_limit:
                log.info("accepting connections again (%d closed at the limit)", self.refused_at_limit)
                self.refused_at_limit = 0
            # Each handshake runs on its own, so a slow or silent client delays nobody.
            self._pending += 1
            handshakes.start_soon(self._secure, loop, conn)

    async def _secure(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        # The SSL context is taken now, per connection: a rotated SVID needs no restart.
        context = self.context()
        try:
            if context is None:
                await loop.connect_accepted_socket(lambda: _Connection(self), conn)
            else:
                await loop.connect_accepted_socket(
                    lambda: _Connection(self),
                    conn,
                    ssl=context,
                    ssl_handshake_timeout=self.limits.handshake_timeout,
                )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.debug("TLS handshake failed: %s", exc.__class__.__name__)
            conn.close()
        except BaseException:
            conn.close()  # cancelled: the server is stopping
            raise
        finally:
            self._pending -= 1
            self._maybe_all_closed()

    def drain(self) -> None:
        """Stop accepting, close idle keep-alive connections, let requests under way finish."""
        self._draining = True
        if self._accepting is not None:
            self._accepting.cancel()
        for connection in list(self._connections):
            connection.drain()
        if self._drained is not None:
            self._drained.set()
        self._maybe_all_closed()

    def _maybe_all_closed(self) -> None:
        if self._draining and not self._connections and not self._pending and self._all_closed is not None:
            self._all_closed.set()

    def _opened(self, connection: _Connection) -> None:
        self._connections.add(connection)

    def _closed(self, connection: _Connection) -> None:
        self._connections.discard(connection)
        self._maybe_all_closed()


class _Connection(asyncio.Protocol):
    """One client connection: TLS, then requests answered one at a time, in order."""

    def __init__(self, server: HttpsServer) -> None:
        self._server = server
        limits = server.limits
        self._limits = limits
        self._parser = RequestParser(max_head=limits.max_header_bytes, max_body=limits.max_body_bytes)
        self._transport: asyncio.Transport | None = None
        self._writer: asyncio.Transport | None = None  # set once TLS (if any) is up
        self._peer: SpiffeId | None = None
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_kind = ""  # "idle" or "request"
        self._busy = False  # a reply is pending: later requests wait in the parser
        self._write_paused = False
        self._closing = False
        self._tracked = False

    # ---------------------------------------------------------------- lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called once the TLS handshake (if any) is done.  uvloop's transports
        # implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self._server._opened(self)
        self._tracked = True
        self._ready(transport, transport.get_extra_info("peercert"))

    def _ready(self, transport: asyncio.Transport, peer_certificate: object) -> None:
        self._writer = transport
        self._peer = spiffe_id_of(peer_certificate) if isinstance(peer_certificate, dict) else None
        if self._peer is not None and not self._trusted(transport, self._peer):
            return
        if self._server.draining:
            self.drain()
        else:
            self._process()  # answers what arrived during the handshake, then arms the idle timer

    def _trusted(self, transport: asyncio.Transport, peer: SpiffeId) -> bool:
        """Whether the peer's chain ends in its own trust domain's bundle; if not, it is cut off unanswered.

        Checked before anything it sent (even in the handshake's flight) is read.
        """
        tls = transport.get_extra_info("ssl_object")
        reason = refusal(tls, peer)
        if reason is None:
            return True
        self._server.refused_peers += 1
        if tls is not None:
            address = transport.get_extra_info("peername")
            who = f"a client at {address[0]}:{address[1]}" if isinstance(address, tuple) else "a client"
            warn_refused(tls, who, peer, reason)
        self.abort()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()

    def _lost(self) -> None:
        self._closing = True
        self._cancel_timer()
        if self._tracked:
            self._tracked = False
            self._server._closed(self)

    def abort(self) -> None:
        self._closing = True
        transport = self._writer or self._transport
        if transport is not None:
            transport.abort()
        self._lost()

    def drain(self) -> None:
        """Close now if idle; otherwise after the answer under way."""
        if not self._busy and not self._parser.in_progress:
            self._close()

    def _close(self) -> None:
        self._closing = True
        self._cancel_timer()
        writer = self._writer
        if writer is not None:
            # close() flushes what is written, then TLS waits for the peer's
            # close_notify; a peer that never sends it must not hold the socket.
            writer.close()
            self._loop.call_later(_CLOSE_LINGER, writer.abort)
        elif self._transport is not None:
            self._transport.abort()

    # ---------------------------------------------------------------- timers

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_kind = ""

    def _arm(self, kind: str, delay: float, expire: Callable[[], None]) -> None:
        # Armed once per kind: the idle wait starts when the last answer went out, and bytes that
        # start no request (empty lines, which RFC 9112 lets a server skip) must not start it again,
        # or a client sending "\r\n" now and then would hold its connection for ever; a request
        # must be finished within its limit from its first byte, however it trickles.
        if self._timer_kind == kind:
            return
        self._cancel_timer()
        self._timer = self._loop.call_later(delay, expire)
        self._timer_kind = kind

    def _request_too_slow(self) -> None:
        self._timer = None
        self._timer_kind = ""
        if self._parser.head_received:
            self._fail(408)
        else:
            self._close()  # not even a whole head: nothing to answer

    # ---------------------------------------------------------------- data

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._parser.feed(data)
        if not self._busy and self._writer is not None:
            self._process()

    def eof_received(self) -> bool | None:
        if not self._busy:
            self._close()
        return None

    def pause_writing(self) -> None:
        # The client does not read its answers: stop reading its requests.
        self._write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if not self._busy:
            self._resume_reading()
            self._process()

    def _pause_reading(self) -> None:
        if self._writer is not None and self._writer.is_reading():
            self._writer.pause_reading()

    def _resume_reading(self) -> None:
        if self._writer is not None and not self._writer.is_reading() and not self._closing:
            self._writer.resume_reading()

    def _process(self) -> None:
        while not self._busy and not self._closing and not self._write_paused:
            try:
                request = self._parser.next_request()
            except HttpError as exc:
                log.debug("refused a request: %s", exc)
                self._fail(exc.status)
                return
            if request is None:
                if self._parser.continue_wanted and self._writer is not None:
                    self._parser.continue_wanted = False
                    self._writer.write(CONTINUE)
                if self._parser.in_progress:
                    self._arm("request", self._limits.request_timeout, self._request_too_slow)
                else:
                    self._arm("idle", self._limits.idle_timeout, self._close)
                return
            self._cancel_timer()
            self._dispatch(request)

    def _dispatch(self, request: Request) -> None:
        target = request.target
        path, _, query = target.partition("?")
        api_request = ApiRequest(
            method=request.method,
            path=path,
            peer=self._peer,
            body=request.body,
            query=query,
            content_type=request.headers.get(b"content-type", b"").partition(b";")[0].strip().decode("latin-1"),
        )
        try:
            reply = self._server.handler(api_request)
        except Exception:
            log.exception("handler failed on %s %s", request.method, path)
            reply = _INTERNAL_ERROR
        if isinstance(reply, ApiResponse):
            self._answer(reply, request.keep_alive)
            return
        # Wait for the writer thread; later pipelined requests stay in the parser.
        self._busy = True
        self._pause_reading()
        waiting = asyncio.wrap_future(reply, loop=self._loop)
        waiting.add_done_callback(lambda done: self._settled(done, request))

    def _settled(self, done: asyncio.Future[ApiResponse], request: Request) -> None:
        if done.cancelled() or done.exception() is not None:
            if not done.cancelled():
                log.error("handler failed on %s %s", request.method, request.target, exc_info=done.exception())
            reply = _INTERNAL_ERROR
        else:
            reply = done.result()
        self._busy = False
        if self._closing:
            return
        self._answer(reply, request.keep_alive)
        if not self._closing:
            self._resume_reading()
            self._process()

    def _answer(self, reply: ApiResponse, keep_alive: bool) -> None:
        close = not keep_alive or self._server.draining
        if self._writer is None:
            return
        self._writer.write(response(reply.status, reply.content_type, reply.body, close=close))
        if close:
            self._close()

    def _fail(self, status: int) -> None:
        code = ErrorCode.BAD_REQUEST if status < 500 else ErrorCode.INTERNAL
        if self._writer is not None and not self._closing:
            self._writer.write(response(status, "application/json", error_body(code), close=True))
        self._close()
