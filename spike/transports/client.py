"""A keep-alive HTTP/1.1 client connection over mutual TLS (h11 on the event loop's TLS).

One `HttpsConnection` talks to one origin and reuses one TLS connection
across requests, which is what keeps Nexus's forever-polling cheap
(docs/design.md 2.7).  The connection is an `asyncio.Protocol` on the loop's own
TLS (C code under uvloop) and h11 frames the messages: a poll costs a
fraction of what anyio's Python-level TLS stream did, which is what lets one
Nexus poll a thousand keepers a second (docs/benchmarks.md).  Errors are
mapped at this edge, once, as httpcore does: callers see `TransportError`
with a `FailureKind` (what the custody core decides on) and a short reason
in words, and nothing else.  A request that is cancelled (for example by
its deadline) drops the connection, so a half-used h11 state is never reused.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import Callable, Sequence
from typing import cast
from urllib.parse import urlsplit

import h11

from spike.protocol.events import FailureKind

from .peer_trust import refusal
from .tls import PeerCheck, spiffe_id_of


class TransportError(Exception):
    """A request got no usable HTTP answer: `kind` says why, the message says it briefly in words."""

    def __init__(self, message: str, kind: FailureKind = FailureKind.OTHER) -> None:
        super().__init__(message)
        self.kind = kind


class PeerIdentityError(TransportError):
    def __init__(self, message: str) -> None:
        super().__init__(message, FailureKind.PEER_IDENTITY)


def parse_origin(url: str) -> tuple[str, int]:
    """(host, port) of an https URL; raises ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"not an https URL: {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"URL must be an origin only (https://host:port): {url!r}")
    return parts.hostname, parts.port or 443


def _server_name(host: str, context: ssl.SSLContext) -> str:
    """What the TLS layer is told the server is called: the host, or "" for an IP address.

    An IP address is never sent as the TLS server name (SNI) and an SVID context
    checks no names, so leaving it out changes nothing on the wire; but the ssl
    module encodes every name it is given with the IDNA codec, whose import is
    ~1.2 ms of a restarted Nexus's first keeper polls (issue 20).
    """
    if context.check_hostname:
        return host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return ""


Outcome = tuple[int, bytes] | Exception  # (status, body), or why there is no answer
Callback = Callable[[Outcome], None]


class _Op:
    __slots__ = ("body", "content_type", "method", "on_done", "path", "retried", "reused")

    def __init__(self, method: str, path: str, body: bytes, content_type: str, on_done: Callback) -> None:
        self.method, self.path, self.body, self.content_type = method, path, body, content_type
        self.on_done = on_done
        self.retried = False
        self.reused = False


class HttpsConnection:
    """One keep-alive mTLS connection to one origin, one request at a time.

    `submit` is the driver's interface: no task and no await per request, the
    answer comes back through a callback (always from the event loop, never
    from inside `submit`), and a deadline is a loop timer.  `request` is the
    awaitable form for everything else (bootstrap, the CLI, tests).
    """

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
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        """`retry_stale`: when a kept-alive connection closes before answering, send the
        request once more on a new connection.  Only for requests that are safe to repeat:
        the server may have acted on the first one before it closed (or died).
        `headers`: sent with every request, after the ones every request has."""
        self.host, self.port = parse_origin(url)
        self._host_header = url.split("://", 1)[1].rstrip("/").encode()
        self._ssl_context = ssl_context
        self._peer_check = peer_check
        self._expected_peer = expected_peer
        self._max_response_bytes = max_response_bytes
        self._connect_timeout = connect_timeout
        self._retry_stale = retry_stale
        self._headers = tuple(headers)
        self._protocol: _ClientProtocol | None = None
        self._current: _Op | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._connecting: asyncio.Task[None] | None = None
        self.connections_opened = 0

    # ------------------------------------------------------------------ the two interfaces

    def submit(
        self,
        method: str,
        path: str,
        body: bytes,
        *,
        on_done: Callback,
        deadline: float | None = None,
        content_type: str = "application/json",
    ) -> None:
        """Send a request; `on_done` gets (status, body) or a `TransportError`, exactly once.

        `deadline` is in the running loop's time (`anyio.current_time()`).  A
        request still under way is abandoned (its callback gets an error).
        """
        loop = asyncio.get_running_loop()
        if self._current is not None:
            self._finish(self._current, TransportError("abandoned for a newer request", FailureKind.OTHER), drop=True)
        op = _Op(method, path, body, content_type, on_done)
        self._current = op
        if deadline is not None:
            self._timer = loop.call_at(deadline, self._timed_out, op)
        self._start(op)

    async def request(
        self, method: str, path: str, body: bytes = b"", content_type: str = "application/json"
    ) -> tuple[int, bytes]:
        """Send one request and return (status, body).  Raises `TransportError`.

        Cancelling the caller (e.g. its deadline) drops the connection.
        """
        answer: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

        def done(outcome: Outcome) -> None:
            if not answer.done():
                answer.set_result(outcome)

        self.submit(method, path, body, on_done=done, content_type=content_type)
        try:
            outcome = await answer
        except BaseException:
            current = self._current
            if current is not None and current.on_done is done:
                self._current = None
                self._cancel_timer()
                self._drop()
            raise
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def aclose(self) -> None:
        if self._current is not None:
            self._finish(self._current, TransportError("connection closed", FailureKind.CLOSED), drop=True)
        self._drop()

    # ------------------------------------------------------------------ one request

    def _start(self, op: _Op) -> None:
        protocol = self._protocol
        if protocol is None or protocol.closed:
            self._connecting = asyncio.get_running_loop().create_task(self._connect_and_send(op))
        else:
            op.reused = True
            self._send(protocol, op)

    async def _connect_and_send(self, op: _Op) -> None:
        try:
            protocol = await self._connect()
        except TransportError as exc:
            if op is self._current:
                self._finish(op, exc, drop=True)
            return
        if op is self._current:
            op.reused = False
            self._send(protocol, op)

    def _send(self, protocol: _ClientProtocol, op: _Op) -> None:
        conn = protocol.h11
        headers = [
            (b"host", self._host_header),
            (b"content-type", op.content_type.encode()),
            (b"content-length", str(len(op.body)).encode()),
            (b"accept", b"application/json"),
            *self._headers,
        ]
        data = conn.send(h11.Request(method=op.method, target=op.path, headers=headers)) or b""
        data += conn.send(h11.Data(data=op.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        try:
            protocol.send(data)
        except (OSError, RuntimeError):
            self._answered(op, protocol, _StaleConnection())
            return
        # Armed only once the bytes are out: a connection that refused them must not
        # report on this request again when it is finally lost (it would undo the retry).
        protocol.expect(self._max_response_bytes, lambda outcome: self._answered(op, protocol, outcome))

    def _answered(self, op: _Op, protocol: _ClientProtocol, outcome: Outcome) -> None:
        if op is not self._current or protocol is not self._protocol:
            return  # late: that request was abandoned or timed out, or this connection was dropped
        if isinstance(outcome, _StaleConnection):
            # The server closed a kept-alive connection before answering (a
            # restarted keeper does this): that says nothing about the server
            # now, so try once more on a fresh connection.
            self._drop()
            if op.reused and self._retry_stale and not op.retried:
                op.retried = True
                self._start(op)
                return
            self._finish(op, TransportError("connection closed before an answer", FailureKind.CLOSED), drop=True)
            return
        if isinstance(outcome, Exception):
            self._finish(op, outcome, drop=True)
            return
        conn = protocol.h11
        reusable = conn.our_state is h11.DONE and conn.their_state is h11.DONE
        if reusable:
            conn.start_next_cycle()
        self._finish(op, outcome, drop=not reusable)

    def _timed_out(self, op: _Op) -> None:
        self._timer = None
        if op is self._current:
            self._finish(op, TransportError("timed out", FailureKind.TIMEOUT), drop=True)

    def _finish(self, op: _Op, outcome: Outcome, *, drop: bool) -> None:
        self._current = None
        self._cancel_timer()
        if drop:
            self._drop()
        # Always later, from the loop: a callback never runs inside submit().
        asyncio.get_running_loop().call_soon(op.on_done, outcome)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _drop(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.abort()
        connecting, self._connecting = self._connecting, None
        if connecting is not None and not connecting.done():
            connecting.cancel()

    async def _connect(self) -> _ClientProtocol:
        context = self._ssl_context if isinstance(self._ssl_context, ssl.SSLContext) else self._ssl_context()
        loop = asyncio.get_running_loop()
        fresh = _ClientProtocol()
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(
                    lambda: fresh,
                    self.host,
                    self.port,
                    ssl=context,
                    server_hostname=_server_name(self.host, context),
                    ssl_handshake_timeout=self._connect_timeout,
                ),
                self._connect_timeout,
            )
        except TimeoutError:
            raise TransportError("connect timed out", FailureKind.TIMEOUT) from None
        except ssl.SSLError as exc:
            reason = f"TLS handshake failed: {exc.reason or exc.__class__.__name__}"
            raise TransportError(reason, FailureKind.TLS) from None
        except (OSError, ConnectionError) as exc:
            raise TransportError(*_os_failure(exc)) from None
        peer = spiffe_id_of(transport.get_extra_info("peercert"))
        if peer is not None:
            # Is the server's certificate really `peer`'s, i.e. anchored in its own trust domain's bundle?
            refused = refusal(transport.get_extra_info("ssl_object"), peer)
            if refused is not None:
                transport.abort()
                raise PeerIdentityError(f"peer presented {peer} (trust domain {peer.trust_domain}), refused: {refused}")
        if not self._peer_check(peer):
            transport.abort()
            expected = f", expected {self._expected_peer}" if self._expected_peer else ""
            raise PeerIdentityError(f"peer presented {peer or 'no SPIFFE ID'}{expected}")
        self.connections_opened += 1
        self._protocol = fresh
        return fresh


class _ClientProtocol(asyncio.Protocol):
    """One TLS connection: h11 frames the answer to the one request under way."""

    def __init__(self) -> None:
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._on_outcome: Callable[[Outcome], None] | None = None
        self._received_any = False
        self._status = 0
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's do not subclass asyncio's

    def expect(self, limit: int, on_outcome: Callable[[Outcome], None]) -> None:
        self._on_outcome = on_outcome
        self._received_any = False
        self._status, self._chunks, self._size, self._limit = 0, [], 0, limit

    def send(self, data: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise RuntimeError("connection closed")
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self._on_outcome is None:
            self.abort()  # bytes nobody asked for: this connection can no longer be trusted
            return
        self._received_any = True
        self.h11.receive_data(data)
        self._next_events()

    def eof_received(self) -> bool | None:
        if self._on_outcome is not None:
            if not self._received_any:
                self._deliver(_StaleConnection())  # closed before a single byte of an answer
            else:
                self.h11.receive_data(b"")
                self._next_events()
                self._deliver(TransportError("connection closed during the response", FailureKind.CLOSED))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._on_outcome is not None:
            lost = TransportError("connection lost during the response", FailureKind.CLOSED)
            self._deliver(_StaleConnection() if not self._received_any else lost)

    def _next_events(self) -> None:
        while self._on_outcome is not None:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError:
                self._deliver(TransportError("malformed HTTP response", FailureKind.BAD_HTTP))
                self.abort()
                return
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Response):
                self._status = event.status_code
            elif isinstance(event, h11.Data):
                self._size += len(event.data)
                if self._size > self._limit:
                    self._deliver(TransportError("response too large", FailureKind.BAD_HTTP))
                    self.abort()
                    return
                self._chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._deliver((self._status, b"".join(self._chunks)))
            elif isinstance(event, h11.ConnectionClosed):
                lost = TransportError("connection closed during the response", FailureKind.CLOSED)
                self._deliver(_StaleConnection() if not self._status else lost)

    def _deliver(self, outcome: Outcome) -> None:
        on_outcome, self._on_outcome = self._on_outcome, None
        if on_outcome is not None:
            on_outcome(outcome)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class _StaleConnection(Exception):
    pass


def _os_failure(exc: BaseException) -> tuple[str, FailureKind]:
    """Why a connect failed, in words and as a kind."""
    if isinstance(exc, ConnectionRefusedError):
        kind = FailureKind.REFUSED
    elif isinstance(exc, ConnectionError):  # reset or aborted while the handshake was under way
        kind = FailureKind.CLOSED
    elif isinstance(exc, OSError):  # no route, the name does not resolve, the network is down
        kind = FailureKind.UNREACHABLE
    else:
        kind = FailureKind.OTHER
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused", kind
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower(), kind
    if isinstance(exc, OSError) and exc.args:
        return str(exc.args[0]).lower(), kind
    if isinstance(exc, ConnectionError):
        return "connection closed during the handshake", kind
    return exc.__class__.__name__, kind
