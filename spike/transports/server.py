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

Who has not authenticated yet cannot crowd out who has.  A connection goes
through three stages, each with its own budget: *silent* (accepted, nothing
received yet: it costs a file descriptor and waits for its first bytes),
*handshaking* (TLS under way) and *established* (TLS done: the peer's SVID
is verified).  When a silent or handshaking connection arrives and its stage
is full, the oldest one of that stage is closed to make room, so a flood of
sockets that never speak (or never finish TLS) only ever displaces its own
kind, and a real client, which speaks at once and finishes in a few round
trips, gets through whatever the flood's rate.  Both stages together must
end within the handshake timeout.  Established connections have the
`max_connections` budget; at that limit a new one is refused, unless its
peer is *preferred* (the keeper prefers Nexus and bootstrap): then the oldest
connection of a peer that is not preferred is closed to make room, idle
ones first.

Nor can an authenticated peer make the server hold memory it has no
business with.  A request whose body does not come with its head is first
judged by its head (`screen`: peer, route, action): a refusal is answered at
once and the body is read and thrown away as it comes, never held.  And the
request bytes held across all connections have a budget
(`max_buffered_bytes`): the connection whose bytes would take the total over
it gets a 503 and is closed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
import ssl
from collections.abc import Callable
from concurrent.futures import Future
from enum import Enum
from typing import cast

import anyio
import anyio.abc
import msgspec
from anyio.abc import SocketAttribute

from spike.protocol.api import ApiRequest, ApiResponse
from spike.protocol.identity import SpiffeId
from spike.protocol.wire import ErrorCode, error_body

from .http1 import CONTINUE, Head, HttpError, Request, RequestParser, response
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


class ServerLimits(msgspec.Struct, frozen=True):
    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 64 * 1024
    handshake_timeout: float = 3.0  # from accept to TLS done (first bytes, then the handshake)
    request_timeout: float = 10.0  # from a request's first byte to its last
    idle_timeout: float = 60.0  # keep-alive wait for the next request
    max_connections: int = 1024  # established: TLS done, the peer authenticated
    max_handshakes: int = 64  # TLS under way; the oldest is closed to make room for a new one
    max_silent: int = 256  # accepted, nothing received yet; the oldest is closed to make room
    max_buffered_bytes: int = 64 * 1024 * 1024  # request bytes held across all connections
    # (path, limit): paths whose bodies may exceed `max_body_bytes`, chosen by the request's head (a caller
    # the screen refuses by its head never has its body held, whatever the limit).
    larger_bodies: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if min(self.max_connections, self.max_handshakes, self.max_silent) < 1:
            raise ValueError("every connection budget must be at least 1")


Prefer = Callable[[SpiffeId | None], bool]
# Judges a request by its head (the body is empty): a refusal to answer at once, or None to read on.
Screen = Callable[[ApiRequest], ApiResponse | None]


class _Pending:
    """An accepted connection before it is established: its handshake task's cancel scope."""

    __slots__ = ("scope",)

    def __init__(self, deadline: float) -> None:
        self.scope = anyio.CancelScope(deadline=deadline)


class _Stage:
    """The connections at one stage before they are established: a bounded queue, oldest out first."""

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self._members: dict[_Pending, None] = {}  # insertion order: the oldest first
        self.shed = 0  # closed to make room, in the episode under way (said once per episode)
        self.shed_total = 0

    def __len__(self) -> int:
        return len(self._members)

    def admit(self, entry: _Pending) -> None:
        if len(self._members) >= self.limit:
            oldest = next(iter(self._members))
            del self._members[oldest]
            oldest.scope.cancel()
            if not self.shed:
                log.warning(
                    "%s connections at their limit (%d): closing the oldest to make room for each new one",
                    self.name,
                    self.limit,
                )
            self.shed += 1
            self.shed_total += 1
        elif self.shed and len(self._members) < self.limit // 2:
            log.info("%s connections below their limit again (%d closed to make room)", self.name, self.shed)
            self.shed = 0
        self._members[entry] = None

    def leave(self, entry: _Pending) -> None:
        self._members.pop(entry, None)

    def close_all(self) -> None:
        for entry in self._members:
            entry.scope.cancel()


async def accept(sock: socket.socket) -> socket.socket:
    """The next connection on a non-blocking listening socket, as a non-blocking socket.

    Not `loop.sock_accept`: on CPython 3.11 its callback sets the result of a future that a
    cancellation in the same loop iteration already cancelled (InvalidStateError in the loop's
    exception handler, and the accepted socket is lost), which stopping a server does.  Waiting
    for readability is cancelled cleanly, and the accept itself never waits.

    A TCP connection gets TCP_NODELAY here: uvloop sets it, asyncio's own loop (a keeper's)
    does not on an accepted socket.  Without it, a small write that follows another one not
    yet acknowledged waits for the client's delayed ACK (~40 ms on Linux): a keeper's answer
    right after its TLS 1.3 session tickets did in about one poll in ten (issue 20).
    """
    while True:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            await anyio.wait_readable(sock)
            continue
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn


class HttpsServer:
    """Serves `handler` to mTLS clients (plain HTTP if `ssl_context` is None: metrics only)."""

    def __init__(
        self,
        ssl_context: ContextSource | None,
        handler: Handler,
        limits: ServerLimits | None = None,
        *,
        prefer: Prefer | None = None,
        screen: Screen | None = None,
    ) -> None:
        """`prefer(peer)`: whether an authenticated peer may take the place of another one at the
        connection limit (see the module docstring); None prefers nobody.  `screen(request)`: judges
        a request whose body is still on its way by its head; None reads every body."""
        self._ssl_context = ssl_context
        self.handler = handler
        self.limits = limits or ServerLimits()
        self._prefer = prefer
        self._screen = screen
        self.buffered = 0  # request bytes held across all connections
        self.buffered_peak = 0  # the most held at once, since the owner last reset it
        self.refused_over_budget = 0  # connections refused for it, in the episode under way
        self.accepted = 0  # TCP connections accepted, for tests and metrics
        self.refused_at_limit = 0  # connections closed at once since the limit was last reached
        self.refused_peers = 0  # handshakes whose certificate is not the SPIFFE ID it claims
        self.made_room = 0  # established connections closed for a preferred peer
        self._connections: dict[_Connection, None] = {}  # insertion order: the oldest first
        self._accepting: anyio.CancelScope | None = None
        self._silent = _Stage("silent", self.limits.max_silent)
        self._handshaking = _Stage("handshaking", self.limits.max_handshakes)
        self._draining = False
        self._drained: anyio.Event | None = None
        self._all_closed: anyio.Event | None = None

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    @property
    def silent(self) -> int:
        """Accepted connections that have sent nothing yet."""
        return len(self._silent)

    @property
    def handshaking(self) -> int:
        """Connections whose TLS handshake is under way."""
        return len(self._handshaking)

    @property
    def shed(self) -> int:
        """Connections closed before TLS was done to make room for newer ones, since the start."""
        return self._silent.shed_total + self._handshaking.shed_total

    @property
    def _pending(self) -> int:
        return len(self._silent) + len(self._handshaking)

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
                conn = await accept(sock)
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
            if self._draining:
                conn.close()
                continue
            if self._prefer is None and len(self._connections) >= self.limits.max_connections:
                # Nobody could take an established connection's place: refuse before any TLS work.
                self._refuse_at_limit()
                conn.close()
                continue
            self._room_again()
            # Each connection waits and shakes hands on its own, so a slow or silent client delays nobody.
            entry = _Pending(anyio.current_time() + self.limits.handshake_timeout)
            self._silent.admit(entry)
            handshakes.start_soon(self._secure, loop, conn, entry)

    def _refuse_at_limit(self) -> None:
        # Said once per episode, not once per connection: a flood must not become a log flood.
        if not self.refused_at_limit:
            log.warning(
                "connection limit (%d) reached: closing new connections until there is room",
                self.limits.max_connections,
            )
        self.refused_at_limit += 1

    def _room_again(self) -> None:
        if self.refused_at_limit and len(self._connections) < self.limits.max_connections:
            log.info("accepting connections again (%d closed at the limit)", self.refused_at_limit)
            self.refused_at_limit = 0

    async def _secure(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, entry: _Pending) -> None:
        try:
            with entry.scope:  # cancelled to make room for a newer connection, or at the handshake deadline
                # A client speaks first (a ClientHello, or a request on a plain listener): until it
                # does, it costs a file descriptor and nothing else.
                if not await _first_bytes(conn):
                    conn.close()  # it hung up without a word
                    return
                self._silent.leave(entry)
                # The SSL context is taken now, per connection: a rotated SVID needs no restart.
                context = self.context()
                if context is None:
                    await loop.connect_accepted_socket(lambda: _Connection(self, entry), conn)
                    return
                self._handshaking.admit(entry)
                await loop.connect_accepted_socket(
                    lambda: _Connection(self, entry),
                    conn,
                    ssl=context,
                    ssl_handshake_timeout=self.limits.handshake_timeout,
                )
                return
            conn.close()  # its time is up, or a newer connection took its place
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.debug("TLS handshake failed: %s", exc.__class__.__name__)
            conn.close()
        except BaseException:
            conn.close()  # cancelled: the server is stopping
            raise
        finally:
            self._silent.leave(entry)
            self._handshaking.leave(entry)
            self._maybe_all_closed()

    def drain(self) -> None:
        """Stop accepting, close idle keep-alive connections, let requests under way finish."""
        self._draining = True
        if self._accepting is not None:
            self._accepting.cancel()
        self._silent.close_all()  # nothing asked yet: nothing to finish
        for connection in list(self._connections):
            connection.drain()
        if self._drained is not None:
            self._drained.set()
        self._maybe_all_closed()

    def _maybe_all_closed(self) -> None:
        if self._draining and not self._connections and not self._pending and self._all_closed is not None:
            self._all_closed.set()

    def _established(self, connection: _Connection, entry: _Pending) -> bool:
        """A connection finished its handshake: keep it (True) or refuse it, at the connection limit."""
        # From here on it is no longer a pending connection: nothing may cancel its handshake task.
        self._silent.leave(entry)
        self._handshaking.leave(entry)
        entry.scope.deadline = math.inf
        if len(self._connections) >= self.limits.max_connections:
            victim = self._room_for(connection) if connection.preferred else None
            if victim is None:
                self._refuse_at_limit()
                return False
            if not self.made_room:
                log.warning(
                    "connection limit (%d) reached: closing connections of other peers to admit %s",
                    self.limits.max_connections,
                    connection.peer,
                )
            self.made_room += 1
            victim.evict()
        else:
            self._room_again()
        self._connections[connection] = None
        return True

    def _room_for(self, newcomer: _Connection) -> _Connection | None:
        """The connection to close for a preferred peer: the oldest idle one of a peer not preferred, else
        the oldest one of such a peer; None if every connection is a preferred peer's."""
        others = [c for c in self._connections if not c.preferred]
        return next((c for c in others if c.idle), others[0] if others else None)

    def _closed(self, connection: _Connection) -> None:
        self._connections.pop(connection, None)
        self._maybe_all_closed()

    def _hold(self, grown: int, connection: _Connection) -> bool:
        """A connection holds `grown` more request bytes (fewer if negative): whether that is within budget."""
        self.buffered += grown
        budget = self.limits.max_buffered_bytes
        if grown <= 0:
            if self.refused_over_budget and self.buffered < budget // 2:
                log.info(
                    "request bytes held back under half their budget (%d connection(s) refused meanwhile)",
                    self.refused_over_budget,
                )
                self.refused_over_budget = 0
            return True
        self.buffered_peak = max(self.buffered_peak, self.buffered)
        if self.buffered <= budget:
            return True
        if not self.refused_over_budget:
            log.warning(
                "request bytes held across connections over their budget (%d MiB): refusing requests "
                "that would add to them (first: %s)",
                budget // 2**20,
                connection.peer or "a peer without SPIFFE ID",
            )
        self.refused_over_budget += 1
        return False


async def _first_bytes(conn: socket.socket) -> bool:
    """Wait until the client has sent something (True) or hung up (False); reads nothing."""
    while True:
        await anyio.wait_readable(conn)
        try:
            return bool(conn.recv(1, socket.MSG_PEEK))
        except (BlockingIOError, InterruptedError):
            continue  # woken without data after all
        except OSError:
            return False


class _Timer(Enum):
    """What a connection's one timer is waiting for."""

    IDLE = "idle"  # the next request, after the last answer went out
    REQUEST = "request"  # the rest of a request that has begun to arrive


class _Connection(asyncio.Protocol):
    """One client connection: TLS, then requests answered one at a time, in order."""

    def __init__(self, server: HttpsServer, entry: _Pending) -> None:
        self._server = server
        self._entry = entry
        self.preferred = False
        limits = server.limits
        self._limits = limits
        self._parser = RequestParser(
            max_head=limits.max_header_bytes, max_body=limits.max_body_bytes, larger_bodies=dict(limits.larger_bodies)
        )
        self._transport: asyncio.Transport | None = None
        self._writer: asyncio.Transport | None = None  # set once TLS (if any) is up
        self._peer: SpiffeId | None = None
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_kind: _Timer | None = None
        self._busy = False  # a reply is pending: later requests wait in the parser
        self._screened = 0  # the number of the last request head judged before its body
        self._held = 0  # request bytes this connection has counted against the server's budget
        self._write_paused = False
        self._closing = False
        self._tracked = False

    # ---------------------------------------------------------------- lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called once the TLS handshake (if any) is done.  uvloop's transports
        # implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self._writer = transport
        peer_certificate = transport.get_extra_info("peercert")
        self._peer = spiffe_id_of(peer_certificate) if isinstance(peer_certificate, dict) else None
        if self._peer is not None and not self._trusted(transport, self._peer):
            return
        prefer = self._server._prefer
        self.preferred = prefer is not None and prefer(self._peer)
        if not self._server._established(self, self._entry):
            self._close()  # at the connection limit: no HTTP, the peer sees the connection end
            return
        self._tracked = True
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
        self._release()
        self._untrack()

    def _release(self) -> None:
        """Give back what the parser holds, and its share of the server's budget."""
        self._parser.discard()
        self._account()

    @property
    def peer(self) -> SpiffeId | None:
        return self._peer

    @property
    def idle(self) -> bool:
        """Between requests: nothing under way, nothing half received."""
        return not self._busy and not self._parser.in_progress

    def evict(self) -> None:
        """Close to make room for another connection (its slot is free at once)."""
        self._untrack()
        self._close()

    def _untrack(self) -> None:
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
        self._release()
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
            self._timer_kind = None

    def _arm(self, kind: _Timer, delay: float, expire: Callable[[], None]) -> None:
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
        self._timer_kind = None
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
        # Over the budget, this connection adds to it no more; unless an answer of its own is on its
        # way (reading is paused then: one read at most), which a 503 must not replace.
        if not self._account() and not self._busy:
            self._fail(503)

    def _account(self) -> bool:
        """Count what the parser holds now against the server's budget: False if that takes it over."""
        held = self._parser.buffered
        grown, self._held = held - self._held, held
        return not grown or self._server._hold(grown, self)

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
                head = self._parser.head
                if head is not None and head.number != self._screened:
                    self._screened = head.number
                    if self._answered_early(head):
                        continue  # refused by its head: the body is skipped, later requests are read
                if self._parser.continue_wanted and self._writer is not None:
                    self._parser.continue_wanted = False
                    self._writer.write(CONTINUE)
                if self._parser.in_progress:
                    self._arm(_Timer.REQUEST, self._limits.request_timeout, self._request_too_slow)
                else:
                    self._arm(_Timer.IDLE, self._limits.idle_timeout, self._close)
                return
            self._cancel_timer()
            self._dispatch(request)

    def _api_request(self, method: str, target: str, headers: dict[bytes, bytes], body: bytes) -> ApiRequest:
        path, _, query = target.partition("?")
        return ApiRequest(
            method=method,
            path=path,
            peer=self._peer,
            body=body,
            query=query,
            content_type=headers.get(b"content-type", b"").partition(b";")[0].strip().decode("latin-1"),
            headers=headers,
        )

    def _answered_early(self, head: Head) -> bool:
        """Judge a request by its head while its body is on its way; True if it was refused."""
        screen = self._server._screen
        if screen is None or self._writer is None:
            return False
        request = self._api_request(head.method, head.target, head.headers, b"")
        try:
            refusal = screen(request)
        except Exception:
            log.exception("screening failed on %s %s", head.method, request.path)
            refusal = _INTERNAL_ERROR
        if refusal is None:
            return False
        # A client waiting for "100 Continue" may or may not send its body now: only a close is unambiguous.
        close = not head.keep_alive or self._parser.continue_wanted or self._server.draining
        self._writer.write(
            response(refusal.status, refusal.content_type, refusal.body, close=close, head=head.method == "HEAD")
        )
        if close:
            self._close()
        else:
            self._parser.skip_body()
        return True

    def _dispatch(self, request: Request) -> None:
        api_request = self._api_request(request.method, request.target, request.headers, request.body)
        path = api_request.path
        try:
            reply = self._server.handler(api_request)
        except Exception:
            log.exception("handler failed on %s %s", request.method, path)
            reply = _INTERNAL_ERROR
        if isinstance(reply, ApiResponse):
            self._answer(reply, request.keep_alive, request.method == "HEAD")
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
        self._answer(reply, request.keep_alive, request.method == "HEAD")
        if not self._closing:
            self._resume_reading()
            self._process()

    def _answer(self, reply: ApiResponse, keep_alive: bool, head: bool) -> None:
        close = not keep_alive or self._server.draining
        if self._writer is None:
            return
        self._writer.write(response(reply.status, reply.content_type, reply.body, close=close, head=head))
        if close:
            self._close()

    def _fail(self, status: int) -> None:
        code = ErrorCode.BAD_REQUEST if status < 500 else ErrorCode.INTERNAL
        # A request that was answered by its head gets no second answer for what its body did.
        if self._writer is not None and not self._closing and not self._parser.skipping:
            self._writer.write(response(status, "application/json", error_body(code), close=True))
        self._close()
