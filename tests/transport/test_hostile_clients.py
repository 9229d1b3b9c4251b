"""Hostile and broken clients against a real keeper server with small limits.

Each case speaks raw bytes over a standard-library TLS (or plain TCP)
socket, checks the server's answer or the moment it hangs up, and then
checks that the server still answers a well-formed request on a new
connection and has no connection left open.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from spike.app.commands.devca import DevIdentity
from spike.app.keeper import KeeperHandler
from spike.protocol.api import ApiRequest, ApiResponse
from spike.protocol.keeper import Keeper
from spike.transports.server import ServerLimits
from spike.transports.tls import server_context
from tests.transport.transport_rig import (
    TRUST,
    KeeperServer,
    in_thread,
    keeper_server,
    raw_client_context,
    raw_request,
    read_response,
    refused,
    request_bytes,
    serving,
    tls_connect,
    wait_closed,
    wait_for,
)

pytestmark = pytest.mark.anyio

LIMITS = ServerLimits(
    max_header_bytes=1024,
    max_body_bytes=1024,
    handshake_timeout=0.3,
    request_timeout=0.3,
    idle_timeout=0.3,
    max_connections=3,
)
SLACK = 1.0  # how much later than its limit a hang-up may come, on a loaded machine
BAD_REQUEST = {"err": "api_bad_request"}


@pytest.fixture
def nexus(dev_identity: DevIdentity) -> ssl.SSLContext:
    return raw_client_context(dev_identity.files("nexus"), dev_identity.files("nexus").bundle)


async def still_serving(k: KeeperServer, nexus: ssl.SSLContext) -> None:
    """A well-formed request on a new connection is answered, and nothing is left open."""
    answer = await in_thread(lambda: raw_request(k.served.port, nexus))
    assert answer is not None
    assert (answer.status, json.loads(answer.body)) == (404, {"err": "api_not_found"})
    await wait_for(lambda: k.served.server.open_connections == 0, 2, "connections to be closed")


@contextmanager
def connected(port: int, ctx: ssl.SSLContext) -> Iterator[ssl.SSLSocket]:
    with tls_connect(port, ctx) as sock:
        yield sock


def send_expect_status(port: int, ctx: ssl.SSLContext, *pieces: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `pieces` (one TLS write each), then read the answer and the hang-up."""
    with connected(port, ctx) as sock:
        for piece in pieces:
            sock.sendall(piece)
        response = read_response(sock)
        assert response is not None, "closed without an answer"
        _, rest = wait_closed(sock, LIMITS.idle_timeout + SLACK)
        assert rest == b""
        return response.status, response.headers, response.body


# ---------------------------------------------------------------------- size limits


async def test_body_at_the_limit_is_read(dev_identity: DevIdentity, nexus: ssl.SSLContext) -> None:
    body = b"{}" + b" " * (LIMITS.max_body_bytes - 2)
    async with keeper_server(dev_identity, 1, LIMITS) as k:
        answer = await in_thread(lambda: raw_request(k.served.port, nexus, body=body))
        assert answer is not None and answer.status == 404


async def test_content_length_over_the_limit_gets_413(dev_identity: DevIdentity, nexus: ssl.SSLContext) -> None:
    head = (
        b"POST /v1/store/shard HTTP/1.1\r\nHost: k\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {LIMITS.max_body_bytes + 1}\r\n\r\n".encode()
    )
    async with keeper_server(dev_identity, 1, LIMITS) as k:
        # Only the head is sent: the server must refuse on the declared length alone.
        status, headers, body = await in_thread(lambda: send_expect_status(k.served.port, nexus, head))
        assert (status, json.loads(body)) == (413, BAD_REQUEST)
        assert headers["connection"] == "close"
        await still_serving(k, nexus)


async def test_chunked_body_growing_past_the_limit_gets_413(dev_identity: DevIdentity, nexus: ssl.SSLContext) -> None:
    head = b"POST /v1/store/shard HTTP/1.1\r\nHost: k\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"190\r\n" + b" " * 0x190 + b"\r\n"  # 400 bytes: the third one crosses 1024
    async with keeper_server(dev_identity, 1, LIMITS) as k:
        status, _, body = await in_thread(lambda: send_expect_status(k.served.port, nexus, head, chunk, chunk, chunk))
        assert (status, json.loads(body)) == (413, BAD_REQUEST)
        await still_serving(k, nexus)


async def test_chunked_body_within_the_limit_is_read(dev_identity: DevIdentity, nexus: ssl.SSLContext) -> None:
    head = b"POST /v1/store/shard HTTP/1.1\r\nHost: k\r\nTransfer-Encoding: chunked\r\n\r\n"
    pieces = (head, b"2\r\n{}\r\n", b"190\r\n" + b" " * 0x190 + b"\r\n", b"0\r\n\r\n")
    async with keeper_server(dev_identity, 1, LIMITS) as k:

        def exchange() -> int:
            with connected(k.served.port, nexus) as sock:
                for piece in pieces:
                    sock.sendall(piece)
                response = read_response(sock)
                assert response is not None
                return response.status

        assert await in_thread(exchange) == 404


async def test_headers_under_the_limit_are_read(dev_identity: DevIdentity, nexus: ssl.SSLContext) -> None:
    head = b"POST /v1/store/shard HTTP/1.1\r\nHost: k\r\nContent-Length: 2\r\n"
    padding = b"X-Padding: " + b"a" * (LIMITS.max_header_bytes - len(head) - 100) + b"\r\n"
    async with keeper_server(dev_identity, 1, LIMITS) as k:

        def exchange() -> int:
            with connected(k.served.port, nexus) as sock:
                sock.sendall(head + padding + b"\r\n{}")
                response = read_response(sock)
                assert response is not None
                return response.status

        assert await in_thread(exchange) == 404


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "many-writes"])
async def test_oversized_headers_get_431(split: bool, dev_identity: DevIdentity, nexus: ssl.SSLContext) -> None:
    # In one write the whole head arrives in one TLS record and one read, which h11 alone
    # does not bound; in many writes h11's incomplete-head limit trips first.
    big = b"X-Padding: " + b"a" * (2 * LIMITS.max_header_bytes) + b"\r\n"
    head = b"POST /v1/store/shard HTTP/1.1\r\nHost: k\r\n" + big + b"Content-Length: 2\r\n\r\n{}"
    pieces = [head[i : i + 200] for i in range(0, len(head), 200)] if split else [head]
    async with keeper_server(dev_identity, 1, LIMITS) as k:
        status, _, body = await in_thread(lambda: send_expect_status(k.served.port, nexus, *pieces))
        assert (status, json.loads(body)) == (431, BAD_REQUEST)
        await still_serving(k, nexus)


# ---------------------------------------------------------------------- malformed HTTP


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n",
        b"POST /v1/store/shard HTTP/1.1\r\nHost: k\r\nContent-Length: lots\r\n\r\n",
        b"POST /v1/store/shard HTTP/1.1\r\nHost: k\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"POST /v1/store/shard HTTP/1.1\r\nBad Header\r\n\r\n",
        b"POST /v1/store/shard HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"\x16\x03\x01\x00\x05hello\r\n\r\n",
        b"POST /v1/store/shard HTTP/1.1\nHost: k\nContent-Length: 2\n\n{}",  # bare LF: refused, not timed out
        b"POST /v1/store/shard HTTP/1.1\r\nHost: k\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX: a\n\r\n"
        b"POST /v1/store/contribute HTTP/1.1\r\nHost: k\r\nContent-Length: 2\r\n\r\n{}",  # a request in the trailers
        b"POST /v1/store/shard HTTP/1.1\r\nHost: k\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\nX\x00: a\r\n\r\n",
    ],
    ids=[
        "garbage",
        "bad-length",
        "two-lengths",
        "bad-header",
        "no-host",
        "binary",
        "bare-lf",
        "trailer-lf",
        "trailer-nul",
    ],
)
async def test_malformed_http_gets_400(data: bytes, dev_identity: DevIdentity, nexus: ssl.SSLContext) -> None:
    async with keeper_server(dev_identity, 1, LIMITS) as k:
        status, _, body = await in_thread(lambda: send_expect_status(k.served.port, nexus, data))
        assert (status, json.loads(body)) == (400, BAD_REQUEST)
        await still_serving(k, nexus)


async def test_chunked_http10_is_answered_and_the_connection_closed(
    dev_identity: DevIdentity, nexus: ssl.SSLContext
) -> None:
    """RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 is suspect framing: answer, then close (keep-alive or not)."""
    data = (
        b"POST /v1/store/shard HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n"
    )
    async with keeper_server(dev_identity, 1, LIMITS) as k:
        status, headers, _ = await in_thread(lambda: send_expect_status(k.served.port, nexus, data))
        assert status == 404
        assert headers.get("connection") == "close"
        await still_serving(k, nexus)


# ---------------------------------------------------------------------- slow and idle clients


async def test_half_a_head_then_silence_is_cut_off(dev_identity: DevIdentity, nexus: ssl.SSLContext) -> None:
    async with keeper_server(dev_identity, 1, LIMITS) as k:

        def stall() -> tuple[float, bytes]:
            with connected(k.served.port, nexus) as sock:
                sock.sendall(b"POST /v1/store/shard HTTP/1.1\r\nHost: k\r\n")
                return wait_closed(sock, LIMITS.request_timeout + SLACK)

        took, received = await in_thread(stall)
        assert LIMITS.request_timeout * 0.8 <= took
        # A clean 408 or a bare hang-up are both acceptable; anything else is not.
        assert received == b"" or received.startswith(b"HTTP/1.1 408 ")
        await still_serving(k, nexus)


async def test_half_a_body_then_silence_gets_408(dev_identity: DevIdentity, nexus: ssl.SSLContext) -> None:
    async with keeper_server(dev_identity, 1, LIMITS) as k:

        def stall() -> tuple[float, bytes]:
            with connected(k.served.port, nexus) as sock:
                sock.sendall(request_bytes(body=b"{}" + b" " * 98)[:-50])
                return wait_closed(sock, LIMITS.request_timeout + SLACK)

        took, received = await in_thread(stall)
        assert LIMITS.request_timeout * 0.8 <= took
        assert received.startswith(b"HTTP/1.1 408 ")
        await still_serving(k, nexus)


async def test_slow_loris_is_cut_off_at_the_request_deadline(dev_identity: DevIdentity, nexus: ssl.SSLContext) -> None:
    """A byte every 50 ms keeps no receive waiting long; the whole request still has a deadline."""
    async with keeper_server(dev_identity, 1, LIMITS) as k:

        def trickle() -> float:
            data = request_bytes(body=b"{}" + b" " * 200)
            with connected(k.served.port, nexus) as sock:
                start = time.monotonic()
                # One byte every 50 ms until a write fails (the second write after the
                # server's hang-up does); never long enough for the idle timeout.
                for byte in data:
                    if time.monotonic() - start > LIMITS.request_timeout + SLACK:
                        raise AssertionError("the trickle was never cut off")
                    try:
                        sock.sendall(bytes([byte]))
                    except (ssl.SSLError, ConnectionError):
                        return time.monotonic() - start
                    time.sleep(0.05)
                raise AssertionError("the whole request went through")

        took = await in_thread(trickle)
        assert LIMITS.request_timeout * 0.8 <= took < LIMITS.request_timeout + SLACK
        await still_serving(k, nexus)


async def test_idle_keep_alive_connection_is_closed(dev_identity: DevIdentity, nexus: ssl.SSLContext) -> None:
    async with keeper_server(dev_identity, 1, LIMITS) as k:

        def idle() -> tuple[float, bytes]:
            with connected(k.served.port, nexus) as sock:
                for _ in range(2):  # kept alive between requests ...
                    sock.sendall(request_bytes())
                    response = read_response(sock)
                    assert response is not None and response.status == 404
                return wait_closed(sock, LIMITS.idle_timeout + SLACK)  # ... until idle too long

        took, received = await in_thread(idle)
        assert received == b""
        assert LIMITS.idle_timeout * 0.8 <= took
        await still_serving(k, nexus)


async def test_connection_without_a_request_is_closed(dev_identity: DevIdentity, nexus: ssl.SSLContext) -> None:
    async with keeper_server(dev_identity, 1, LIMITS) as k:

        def idle() -> tuple[float, bytes]:
            with connected(k.served.port, nexus) as sock:
                return wait_closed(sock, LIMITS.idle_timeout + SLACK)

        took, received = await in_thread(idle)
        assert received == b""
        assert LIMITS.idle_timeout * 0.8 <= took
        await still_serving(k, nexus)


# ---------------------------------------------------------------------- TLS that never happens


@pytest.mark.parametrize(
    "data",
    [b"", b"\x16\x03\x01\x02\x00\x01"],  # nothing at all; the start of a ClientHello
    ids=["silent", "half-client-hello"],
)
async def test_stalled_handshake_is_closed(data: bytes, dev_identity: DevIdentity, nexus: ssl.SSLContext) -> None:
    async with keeper_server(dev_identity, 1, LIMITS) as k:

        def stall() -> tuple[float, bytes]:
            with socket.create_connection(("127.0.0.1", k.served.port)) as sock:
                sock.sendall(data)
                return wait_closed(sock, LIMITS.handshake_timeout + SLACK)

        took, received = await in_thread(stall)
        assert received == b""
        assert LIMITS.handshake_timeout * 0.8 <= took
        await still_serving(k, nexus)


@pytest.mark.parametrize(
    "data",
    [
        b"POST /v1/store/shard HTTP/1.1\r\nHost: k\r\nContent-Length: 2\r\n\r\n{}",  # plain HTTP
        b"\x16\x03\x01\x00\x10" + b"\xff" * 16,  # a handshake record of nonsense
        bytes(range(256)) * 4,
    ],
    ids=["plain-http", "bad-record", "noise"],
)
async def test_garbage_instead_of_tls_is_closed(data: bytes, dev_identity: DevIdentity, nexus: ssl.SSLContext) -> None:
    async with keeper_server(dev_identity, 1, LIMITS) as k:

        def garbage() -> tuple[float, bytes]:
            with socket.create_connection(("127.0.0.1", k.served.port)) as sock:
                sock.sendall(data)
                return wait_closed(sock, LIMITS.handshake_timeout + SLACK)

        took, received = await in_thread(garbage)
        assert b"HTTP" not in received  # at most a TLS alert
        assert took < LIMITS.handshake_timeout * 0.8  # refused at once, not timed out
        await still_serving(k, nexus)


# ---------------------------------------------------------------------- connection limit


async def test_max_connections_is_enforced(dev_identity: DevIdentity, nexus: ssl.SSLContext) -> None:
    limits = ServerLimits(max_connections=3, idle_timeout=10.0)
    async with keeper_server(dev_identity, 1, limits) as k:
        port, server = k.served.port, k.served.server
        held: list[ssl.SSLSocket] = []
        try:
            for _ in range(limits.max_connections):
                sock = await in_thread(lambda: tls_connect(port, nexus))
                held.append(sock)
            await wait_for(lambda: server.open_connections == limits.max_connections, 2)
            # One over the limit: closed before any HTTP, while the others stay usable.
            await in_thread(lambda: refused(port, nexus))
            assert server.open_connections == limits.max_connections

            def use(sock: ssl.SSLSocket) -> int:
                sock.sendall(request_bytes())
                response = read_response(sock)
                assert response is not None
                return response.status

            assert [await in_thread(functools.partial(use, s)) for s in held] == [404] * 3
            held.pop().close()
            await wait_for(lambda: server.open_connections == limits.max_connections - 1, 2)
            answer = await in_thread(lambda: raw_request(port, nexus))
            assert answer is not None and answer.status == 404
        finally:
            for sock in held:
                sock.close()
        await still_serving(k, nexus)


# ---------------------------------------------------------------------- a failing handler


async def test_handler_exception_gives_500_and_serving_goes_on(
    dev_identity: DevIdentity, nexus: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    keeper_handler = KeeperHandler(Keeper(TRUST))

    def handler(request: ApiRequest) -> ApiResponse:
        if request.path == "/boom":
            raise RuntimeError("handler bug")
        return keeper_handler(request)

    async with serving(server_context(dev_identity.keeper(1)), handler, LIMITS) as served:

        def exchange() -> list[tuple[int, bytes]]:
            with connected(served.port, nexus) as sock:
                out = []
                for path in ("/boom", "/v1/store/shard", "/boom", "/v1/store/shard"):
                    sock.sendall(request_bytes(path))
                    response = read_response(sock)
                    assert response is not None
                    out.append((response.status, response.body))
                return out

        answers = await in_thread(exchange)
        failed = (500, b'{"err":"api_internal_error"}')
        empty = (404, b'{"err":"api_not_found"}')
        assert answers == [failed, empty, failed, empty]  # and on the same connection
        assert "handler failed on POST /boom" in caplog.text
        assert "handler bug" not in answers[0][1].decode()
        answer = await in_thread(lambda: raw_request(served.port, nexus))
        assert answer is not None and answer.status == 404


# ---------------------------------------------------------------------- out of file descriptors


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files in /proc/self/fd")
async def test_running_out_of_file_descriptors_does_not_end_the_server(
    dev_identity: DevIdentity, nexus: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    """accept() fails with EMFILE while the process is at its limit; the server waits it out."""
    clients = 30
    async with keeper_server(dev_identity, 1, ServerLimits(handshake_timeout=5)) as k:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        held: list[socket.socket] = []
        try:
            # Room for our client sockets and three accepted ones: the fourth accept fails.
            in_use = len(os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + clients + 3, hard))
            for _ in range(clients):  # the kernel completes these from the listen backlog
                held.append(socket.create_connection(("127.0.0.1", k.served.port), timeout=2))
            await wait_for(lambda: "Too many open files" in caplog.text, 2, "accept to hit EMFILE")
        finally:
            for sock in held:
                sock.close()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        await wait_for(lambda: k.served.listener.accepted == clients, 2, "the backlog to be accepted")
        await still_serving(k, nexus)
