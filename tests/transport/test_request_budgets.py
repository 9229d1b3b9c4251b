"""Request heads are judged before bodies are held, and held bytes have a budget (issue 14, L1).

A server in this process with a `screen` that refuses one path by its head,
and a small budget for the request bytes held across connections.  What the
clients see: the refusal before the body is sent; the body then read and
thrown away, the connection serving on; a 503 for the connection that would
take the held bytes over the budget, and room again once others finish.
"""

from __future__ import annotations

import contextlib
import json
import ssl

import pytest

from spike.app.commands.devca import DevIdentity
from spike.app.keeper import KeeperHandler
from spike.protocol.api import ApiRequest, ApiResponse
from spike.protocol.keeper import Keeper
from spike.transports.server import HttpsServer, ServerLimits
from spike.transports.tls import server_context
from tests.transport.transport_rig import (
    TRUST,
    in_thread,
    raw_client_context,
    read_response,
    running,
    tls_connect,
    wait_for,
)

pytestmark = pytest.mark.anyio

LIMITS = ServerLimits(max_body_bytes=256 * 1024, max_buffered_bytes=300 * 1024, request_timeout=30.0)
REFUSED = ApiResponse(403, b'{"err":"access_unauthorized"}')


def head(path: str, length: int, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: k", f"Content-Length: {length}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture
def nexus(dev_identity: DevIdentity) -> ssl.SSLContext:
    return raw_client_context(dev_identity.files("nexus"), dev_identity.files("nexus").bundle)


def make_server(dev_identity: DevIdentity, screened: list[str]) -> HttpsServer:
    handler = KeeperHandler(Keeper(TRUST))

    def screen(request: ApiRequest) -> ApiResponse | None:
        screened.append(request.path)
        assert request.body == b""
        return REFUSED if request.path == "/forbidden" else None

    return HttpsServer(server_context(dev_identity.keeper(1)), handler, LIMITS, screen=screen)


async def test_a_refusal_comes_before_the_body_and_the_body_is_skipped(
    dev_identity: DevIdentity, nexus: ssl.SSLContext
) -> None:
    screened: list[str] = []
    server = make_server(dev_identity, screened)
    async with running(server) as served:

        def exchange() -> list[int]:
            statuses = []
            body = b"{" + b" " * (LIMITS.max_body_bytes - 2) + b"}"
            with tls_connect(served.port, nexus, timeout=20) as sock:
                sock.sendall(head("/forbidden", len(body)) + body[:100])
                first = read_response(sock)  # the rest of the body is not even sent yet
                assert first is not None and first.headers.get("connection") != "close"
                statuses.append(first.status)
                assert server.buffered < 4096  # what came of the body was not kept
                sock.sendall(body[100:] + head("/v1/store/shard", 2) + b"{}")
                second = read_response(sock)
                assert second is not None
                statuses.append(second.status)
            return statuses

        assert await in_thread(exchange) == [403, 404]
        assert screened.count("/forbidden") == 1  # judged once, by its head


async def test_a_refusal_to_a_client_waiting_for_100_continue_closes_the_connection(
    dev_identity: DevIdentity, nexus: ssl.SSLContext
) -> None:
    async with running(make_server(dev_identity, [])) as served:

        def exchange() -> tuple[int, str]:
            with tls_connect(served.port, nexus, timeout=20) as sock:
                sock.sendall(head("/forbidden", 1000, "Expect: 100-continue"))
                answer = read_response(sock)
                assert answer is not None
                assert sock.recv(100) == b""  # closed
                return answer.status, answer.headers.get("connection", "")

        assert await in_thread(exchange) == (403, "close")


async def test_held_request_bytes_have_a_budget(dev_identity: DevIdentity, nexus: ssl.SSLContext) -> None:
    """Two partial bodies of 200 KiB fit no 300 KiB budget: the second gets a 503; once the first is done,
    the bytes are given back and a third goes through."""
    server = make_server(dev_identity, [])
    body = b"{" + b" " * (200 * 1024 - 2) + b"}"
    async with running(server) as served:
        first = await in_thread(lambda: tls_connect(served.port, nexus, timeout=20))
        try:
            await in_thread(lambda: first.sendall(head("/v1/store/shard", len(body)) + body[:-1]))
            await wait_for(lambda: server.buffered >= len(body) - 1, 5, "the first body held")

            def second() -> int:
                with tls_connect(served.port, nexus, timeout=20) as sock:
                    with contextlib.suppress(OSError, ssl.SSLError):  # the server may close before it is all sent
                        sock.sendall(head("/v1/store/shard", len(body)) + body[:-1])
                    answer = read_response(sock)
                    assert answer is not None
                    assert json.loads(answer.body) == {"err": "api_internal_error"}
                    return answer.status

            assert await in_thread(second) == 503
            await in_thread(lambda: first.sendall(body[-1:]))
            answer = await in_thread(lambda: read_response(first))
            assert answer is not None and answer.status == 404  # the request within the budget is served
            await wait_for(lambda: server.buffered == 0, 5, "the bytes given back")
        finally:
            first.close()

        def third() -> int:
            with tls_connect(served.port, nexus, timeout=20) as sock:
                sock.sendall(head("/v1/store/shard", len(body)) + body)
                answer = read_response(sock)
                assert answer is not None
                return answer.status

        assert await in_thread(third) == 404
