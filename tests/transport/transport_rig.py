"""Loopback rig for the transport tests (imported by the test modules): real TLS, real sockets, servers in-process.

Servers run in the test's own event loop (anyio's pytest plugin, asyncio
backend) on 127.0.0.1, each behind a listener that counts accepted TCP
connections.  Negative cases talk to them with the standard library only
(`socket` + `ssl` in a worker thread), so what is refused is refused by the
server, not by our client.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from spike.app.commands.devca import CA_CERT, CA_KEY, DevIdentity, mint_svid
from spike.app.keeper import KeeperHandler
from spike.protocol.identity import TrustDomains
from spike.protocol.keeper import Keeper
from spike.transports.server import Handler, HttpsServer, ServerLimits
from spike.transports.tls import SvidFiles, client_context, server_context

TRUST_DOMAIN = "spike.test"  # as in tests/conftest.py
TRUST = TrustDomains.single(TRUST_DOMAIN)
NEXUS_ID = f"spiffe://{TRUST_DOMAIN}/spike/nexus"


# ---------------------------------------------------------------------- servers


class CountingListener(anyio.abc.Listener[anyio.abc.SocketStream]):
    """Wraps a TCP listener and counts the connections it accepts."""

    def __init__(self, inner: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
        self.inner = inner
        self.accepted = 0

    async def serve(
        self,
        handler: Callable[[anyio.abc.SocketStream], Any],
        task_group: anyio.abc.TaskGroup | None = None,
    ) -> None:
        async def counted(stream: anyio.abc.SocketStream) -> None:
            self.accepted += 1
            await handler(stream)

        await self.inner.serve(counted, task_group)

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def extra_attributes(self) -> Any:
        return self.inner.extra_attributes


class AcceptCount:
    """The server's own count of accepted TCP connections (it accepts on the event loop directly)."""

    def __init__(self, server: HttpsServer) -> None:
        self._server = server

    @property
    def accepted(self) -> int:
        return self._server.accepted


@dataclass
class Served:
    port: int
    server: HttpsServer
    listener: AcceptCount

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def serving(
    ssl_context: ssl.SSLContext,
    handler: Handler,
    limits: ServerLimits | None = None,
    *,
    port: int = 0,
) -> AsyncIterator[Served]:
    """Run an `HttpsServer` on 127.0.0.1 until the block ends (then every connection is closed)."""
    async with running(HttpsServer(ssl_context, handler, limits), port=port) as served:
        yield served


@contextlib.asynccontextmanager
async def running(server: HttpsServer, *, port: int = 0) -> AsyncIterator[Served]:
    """Run a server built elsewhere (e.g. by the app's own wiring) on 127.0.0.1 until the block ends."""
    inner = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
    bound = int(inner.listeners[0].extra(SocketAttribute.local_port))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, inner)
        try:
            yield Served(bound, server, AcceptCount(server))
        finally:
            tg.cancel_scope.cancel()


@dataclass
class KeeperServer:
    keeper: Keeper
    served: Served


@contextlib.asynccontextmanager
async def keeper_server(
    identity: DevIdentity, keeper_id: int = 1, limits: ServerLimits | None = None, *, port: int = 0
) -> AsyncIterator[KeeperServer]:
    """The real keeper (machine + app handler) with keeper `keeper_id`'s SVID."""
    keeper = Keeper(TRUST)
    context = server_context(identity.keeper(keeper_id))
    async with serving(context, KeeperHandler(keeper), limits, port=port) as served:
        yield KeeperServer(keeper, served)
    keeper.forget()


async def wait_for(condition: Callable[[], bool], timeout: float, what: str = "condition") -> float:
    """Wait until `condition()` holds; return how long it took.  Fails after `timeout` s."""
    start = anyio.current_time()
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.005)
    return anyio.current_time() - start


def in_thread(func: Callable[[], Any]) -> Awaitable[Any]:
    return anyio.to_thread.run_sync(func)


# ---------------------------------------------------------------------- identities


@functools.cache
def client_hello() -> bytes:
    """The first flight of a real TLS client (a ClientHello), taken from memory BIOs."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="k")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def raw_client_context(files: SvidFiles | None, bundle: Path) -> ssl.SSLContext:
    """A plain stdlib client context: trusts `bundle`, presents `files` (or no certificate)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(bundle))
    if files is not None:
        ctx.load_cert_chain(str(files.cert), str(files.key))
    return ctx


def mint_files(
    identity: DevIdentity,
    directory: Path,
    name: str,
    spiffe_id: str,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> SvidFiles:
    """An SVID signed by `identity`'s CA with any ID, valid from a day ago to a day ahead unless told otherwise."""
    now = dt.datetime.now(dt.UTC)
    not_before = now - dt.timedelta(days=1) if not_before is None else not_before
    not_after = now + dt.timedelta(days=1) if not_after is None else not_after
    ca_cert = x509.load_pem_x509_certificate((identity.directory / CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((identity.directory / CA_KEY).read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    cert_pem, key_pem = mint_svid(ca_cert, ca_key, spiffe_id, not_before=not_before, not_after=not_after)
    files = SvidFiles(directory / f"{name}.pem", directory / f"{name}-key.pem", identity.directory / CA_CERT)
    files.cert.write_bytes(cert_pem + ca_cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key_pem)
    return files


def nexus_client(identity: DevIdentity) -> ssl.SSLContext:
    return client_context(identity.files("nexus"))


# ---------------------------------------------------------------------- raw stdlib client


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def tls_connect(port: int, ctx: ssl.SSLContext, timeout: float = 5.0) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        return ctx.wrap_socket(sock, server_hostname="127.0.0.1")
    except BaseException:
        sock.close()
        raise


def request_bytes(path: str = "/v1/store/shard", body: bytes = b"{}", method: str = "POST") -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def read_response(sock: socket.socket) -> RawResponse | None:
    """One HTTP/1.1 response with a Content-Length body; None if the peer closed first."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            if buffer:
                raise AssertionError(f"connection closed inside a response head: {buffer!r}")
            return None
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("connection closed inside a response body")
        rest += chunk
    assert len(rest) == length, "more bytes than the Content-Length"
    return RawResponse(int(status_line.split(" ")[1]), headers, rest)


def raw_request(
    port: int, ctx: ssl.SSLContext, path: str = "/v1/store/shard", body: bytes = b"{}"
) -> RawResponse | None:
    """A complete, well-formed request on a fresh stdlib TLS connection."""
    with tls_connect(port, ctx) as sock:
        sock.sendall(request_bytes(path, body))
        return read_response(sock)


def refused(port: int, ctx: ssl.SSLContext, path: str = "/v1/store/shard", body: bytes = b"{}") -> BaseException | None:
    """Try a handshake and a well-formed request (to `path`); return the error that stopped it.

    With TLS 1.3 the client's handshake can finish before the server has
    checked the client certificate, so the server's refusal may only show up
    on the first read (an alert, a reset or an end of stream).  None means
    the connection ended cleanly without any HTTP answer.  A timeout or an
    HTTP response fails the test.
    """
    try:
        with tls_connect(port, ctx) as sock:
            sock.sendall(request_bytes(path, body))
            response = read_response(sock)
    except TimeoutError:
        raise AssertionError("the server neither answered nor refused") from None
    except (ssl.SSLError, ConnectionError) as exc:
        return exc
    assert response is None, f"a refused client got an HTTP answer: {response}"
    return None


def wait_closed(sock: socket.socket, timeout: float) -> tuple[float, bytes]:
    """Read until the server closes the connection; (seconds it took, bytes received)."""
    start = time.monotonic()
    sock.settimeout(timeout)
    received = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    except TimeoutError:
        raise AssertionError(f"still open after {timeout} s") from None
    except (ssl.SSLError, ConnectionError):
        pass
    return time.monotonic() - start, received
