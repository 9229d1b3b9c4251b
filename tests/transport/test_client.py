"""The keep-alive mTLS client against real servers: server identity, reuse, reconnects, limits."""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSStream

from spike.app.commands.devca import DevIdentity
from spike.app.keeper import KeeperHandler
from spike.protocol.api import ApiRequest, ApiResponse
from spike.protocol.events import FailureKind
from spike.protocol.identity import Role
from spike.protocol.keeper import Keeper
from spike.transports.blocking import ClientSession
from spike.transports.client import HttpsConnection, PeerIdentityError, TransportError
from spike.transports.server import ServerLimits
from spike.transports.tls import keeper_check, role_check, server_context
from tests.transport.transport_rig import (
    TRUST,
    CountingListener,
    in_thread,
    keeper_server,
    nexus_client,
    serving,
    wait_for,
)

pytestmark = pytest.mark.anyio

SHARD_PATH = "/v1/store/shard"
CONTRIBUTE_PATH = "/v1/store/contribute"
CONTRIBUTION = json.dumps({"shard": list(range(1, 33)), "id": 1, "epoch": 1}).encode()
EMPTY = (404, b'{"err":"api_not_found"}')


def for_keeper(url: str, identity: DevIdentity, keeper_id: int = 1, **kwargs: float) -> HttpsConnection:
    return HttpsConnection(
        url,
        nexus_client(identity),
        keeper_check(TRUST, keeper_id),
        expected_peer=str(TRUST.id_of(Role.KEEPER, keeper_id)),
        **kwargs,  # type: ignore[arg-type]
    )


class Recording:
    """A keeper handler that remembers every request it was given."""

    def __init__(self) -> None:
        self.keeper = Keeper(TRUST)
        self._inner = KeeperHandler(self.keeper)
        self.requests: list[ApiRequest] = []

    def __call__(self, request: ApiRequest) -> ApiResponse:
        self.requests.append(request)
        return self._inner(request)


# ---------------------------------------------------------------------- who the server is


async def test_keeper_with_another_keeper_id_is_refused_before_the_request(dev_identity: DevIdentity) -> None:
    handler = Recording()
    async with serving(server_context(dev_identity.keeper(2)), handler) as served:
        connection = for_keeper(served.url, dev_identity, 1)
        with pytest.raises(PeerIdentityError) as caught:
            await connection.request("POST", CONTRIBUTE_PATH, CONTRIBUTION)
        message = str(caught.value)
        assert "spiffe://spike.test/spike/keeper/2" in message
        assert "expected spiffe://spike.test/spike/keeper/1" in message
        # Keeper 1's shard never reached keeper 2: no request was sent at all.
        assert handler.requests == []
        assert not handler.keeper.holds_shard
        assert connection.connections_opened == 0
        # The same connection object, pointed at the right keeper id, works (control).
        right = for_keeper(served.url, dev_identity, 2)
        assert await right.request("POST", SHARD_PATH, b"{}") == EMPTY
        await right.aclose()


async def test_role_check_refuses_a_keeper_posing_as_nexus(dev_identity: DevIdentity) -> None:
    async with keeper_server(dev_identity, 1) as k:
        connection = HttpsConnection(k.served.url, nexus_client(dev_identity), role_check(TRUST, Role.NEXUS))
        with pytest.raises(PeerIdentityError, match="keeper/1"):
            await connection.request("POST", SHARD_PATH, b"{}")


@pytest.mark.parametrize("rogue", ["same_domain_foreign_ca", "foreign_identity"])
async def test_server_from_an_untrusted_ca_fails_the_handshake(
    rogue: str, dev_identity: DevIdentity, request: pytest.FixtureRequest
) -> None:
    identity: DevIdentity = request.getfixturevalue(rogue)
    handler = Recording()
    async with serving(server_context(identity.keeper(1)), handler) as served:
        connection = for_keeper(served.url, dev_identity, 1)
        with pytest.raises(TransportError) as caught:
            await connection.request("POST", CONTRIBUTE_PATH, CONTRIBUTION)
        assert not isinstance(caught.value, PeerIdentityError)
        assert str(caught.value).startswith("TLS handshake failed")
        assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
        assert handler.requests == []
        assert connection.connections_opened == 0


async def test_nothing_listening_is_a_transport_error(dev_identity: DevIdentity) -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(SocketAttribute.local_port)
    await listener.aclose()
    connection = for_keeper(f"https://127.0.0.1:{port}", dev_identity)
    with pytest.raises(TransportError, match="connection refused"):
        await connection.request("POST", SHARD_PATH, b"{}")


# ---------------------------------------------------------------------- keep-alive and reconnects


async def test_requests_share_one_tls_connection(dev_identity: DevIdentity) -> None:
    async with keeper_server(dev_identity, 1) as k:
        connection = for_keeper(k.served.url, dev_identity)
        try:
            for _ in range(5):
                assert await connection.request("POST", SHARD_PATH, b"{}") == EMPTY
            assert await connection.request("POST", CONTRIBUTE_PATH, CONTRIBUTION) == (200, b"{}")
            status, _ = await connection.request("POST", SHARD_PATH, b"{}")
            assert status == 200
        finally:
            await connection.aclose()
        assert connection.connections_opened == 1
        assert k.served.listener.accepted == 1


async def test_restarted_server_is_reached_again_transparently(dev_identity: DevIdentity) -> None:
    async with keeper_server(dev_identity, 1) as k:
        port = k.served.port
        connection = for_keeper(k.served.url, dev_identity)
        for _ in range(3):
            assert await connection.request("POST", SHARD_PATH, b"{}") == EMPTY
        assert connection.connections_opened == 1
    # The server is gone and has closed the kept-alive connection; a new one takes the port.
    try:
        async with keeper_server(dev_identity, 1, port=port) as k2:
            # The first request on the stale connection fails and is retried once, on a new one.
            assert await connection.request("POST", SHARD_PATH, b"{}") == EMPTY
            assert connection.connections_opened == 2
            assert await connection.request("POST", SHARD_PATH, b"{}") == EMPTY
            assert connection.connections_opened == 2
            assert k2.served.listener.accepted == 1
    finally:
        await connection.aclose()


async def test_a_connection_closing_under_the_request_is_retried_once_and_only_once(dev_identity: DevIdentity) -> None:
    """The kept-alive connection is already closing (its loss not yet reported) when a request comes.

    The write is refused at once and the request goes to a new connection; the old
    connection's loss, reported a moment later, must not count as that request's answer.
    """
    async with keeper_server(dev_identity, 1) as k:
        connection = for_keeper(k.served.url, dev_identity)
        try:
            assert await connection.request("POST", SHARD_PATH, b"{}") == EMPTY
            old = connection._protocol
            assert old is not None and old.transport is not None
            old.transport.close()  # what an EOF from the server does; connection_lost comes later
            assert await connection.request("POST", SHARD_PATH, b"{}") == EMPTY
            assert connection.connections_opened == 2
            await anyio.sleep(0.05)  # the old connection's loss is reported by now: nothing changes
            assert await connection.request("POST", SHARD_PATH, b"{}") == EMPTY
            assert connection.connections_opened == 2
        finally:
            await connection.aclose()


async def test_connection_closed_by_the_idle_timeout_is_reopened(dev_identity: DevIdentity) -> None:
    async with keeper_server(dev_identity, 1, ServerLimits(idle_timeout=0.2)) as k:
        connection = for_keeper(k.served.url, dev_identity)
        try:
            assert await connection.request("POST", SHARD_PATH, b"{}") == EMPTY
            await wait_for(lambda: k.served.server.open_connections == 0, 2, "the idle close")
            assert await connection.request("POST", SHARD_PATH, b"{}") == EMPTY
        finally:
            await connection.aclose()
        assert connection.connections_opened == 2
        assert k.served.listener.accepted == 2


# ---------------------------------------------------------------------- servers that misbehave

Behaviour = Callable[[TLSStream], Awaitable[None]]


@contextlib.asynccontextmanager
async def misbehaving(identity: DevIdentity, behaviour: Behaviour) -> AsyncIterator[CountingListener]:
    """A TLS server with keeper 1's SVID that does `behaviour` instead of speaking HTTP."""
    context = server_context(identity.keeper(1))
    listener = CountingListener(await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0))

    async def handle(stream: anyio.abc.SocketStream) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError, OSError):
            tls = await TLSStream.wrap(stream, server_side=True, ssl_context=context, standard_compatible=False)
            try:
                await behaviour(tls)
            finally:
                await tls.aclose()

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            yield listener
        finally:
            tg.cancel_scope.cancel()


def url_of(listener: CountingListener) -> str:
    return f"https://127.0.0.1:{listener.inner.listeners[0].extra(SocketAttribute.local_port)}"  # type: ignore[attr-defined]


async def _hang_up_after_request(tls: TLSStream) -> None:
    await tls.receive()


async def _answer_then_hang_up_next(tls: TLSStream) -> None:
    await tls.receive()
    await tls.send(b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}")
    await tls.receive()


async def _never_answer(tls: TLSStream) -> None:
    await tls.receive()
    await anyio.sleep_forever()


async def _huge_answer(tls: TLSStream) -> None:
    await tls.receive()
    await tls.send(b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n" + b"x" * 5000)
    await anyio.sleep_forever()


async def _garbage_answer(tls: TLSStream) -> None:
    await tls.receive()
    await tls.send(b"NOT HTTP AT ALL\r\n\r\n")
    await anyio.sleep_forever()


async def test_fresh_connection_closed_before_an_answer_is_not_retried(dev_identity: DevIdentity) -> None:
    async with misbehaving(dev_identity, _hang_up_after_request) as listener:
        connection = for_keeper(url_of(listener), dev_identity)
        with pytest.raises(TransportError, match="closed before an answer"):
            await connection.request("POST", SHARD_PATH, b"{}")
        assert listener.accepted == 1


def first_connection_then(later: Behaviour) -> Behaviour:
    """The first connection answers one request and hangs up on the next; later ones do `later`."""
    seen = 0

    async def behaviour(tls: TLSStream) -> None:
        nonlocal seen
        seen += 1
        if seen == 1:
            await _answer_then_hang_up_next(tls)
        else:
            await later(tls)

    return behaviour


async def _answer_once(tls: TLSStream) -> None:
    await tls.receive()
    await tls.send(b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}")
    await anyio.sleep_forever()


async def test_stale_connection_is_retried_once_on_a_new_connection(dev_identity: DevIdentity) -> None:
    async with misbehaving(dev_identity, first_connection_then(_answer_once)) as listener:
        connection = for_keeper(url_of(listener), dev_identity)
        assert await connection.request("POST", SHARD_PATH, b"{}") == (404, b"{}")
        assert await connection.request("POST", SHARD_PATH, b"{}") == (404, b"{}")
        assert listener.accepted == 2
        assert connection.connections_opened == 2
        await connection.aclose()


async def test_stale_connection_is_retried_only_once(dev_identity: DevIdentity) -> None:
    async with misbehaving(dev_identity, first_connection_then(_hang_up_after_request)) as listener:
        connection = for_keeper(url_of(listener), dev_identity)
        assert await connection.request("POST", SHARD_PATH, b"{}") == (404, b"{}")
        with pytest.raises(TransportError, match="closed before an answer"):
            await connection.request("POST", SHARD_PATH, b"{}")
        assert listener.accepted == 2


async def test_oversized_and_garbage_answers_are_transport_errors(dev_identity: DevIdentity) -> None:
    async with misbehaving(dev_identity, _huge_answer) as listener:
        connection = for_keeper(url_of(listener), dev_identity, max_response_bytes=4096)
        with pytest.raises(TransportError, match="response too large"):
            await connection.request("POST", SHARD_PATH, b"{}")
    async with misbehaving(dev_identity, _garbage_answer) as listener:
        connection = for_keeper(url_of(listener), dev_identity)
        with pytest.raises(TransportError, match="malformed HTTP response"):
            await connection.request("POST", SHARD_PATH, b"{}")


async def test_request_cancelled_by_its_deadline_drops_the_connection(dev_identity: DevIdentity) -> None:
    async with misbehaving(dev_identity, _never_answer) as listener:
        connection = for_keeper(url_of(listener), dev_identity)
        with anyio.move_on_after(0.2) as scope:
            await connection.request("POST", SHARD_PATH, b"{}")
        assert scope.cancelled_caught
        assert connection.connections_opened == 1
        # The half-used connection is not reused: the next request opens another.
        with anyio.move_on_after(0.2):
            await connection.request("POST", SHARD_PATH, b"{}")
        assert connection.connections_opened == 2
        assert listener.accepted == 2


# ---------------------------------------------------------------------- the blocking face


async def test_blocking_session_reuses_and_times_out(dev_identity: DevIdentity) -> None:
    async with keeper_server(dev_identity, 1) as k, misbehaving(dev_identity, _never_answer) as silent:

        def use() -> tuple[list[tuple[int, bytes]], str]:
            with ClientSession(nexus_client(dev_identity), timeout=0.3) as session:
                keeper = session.connect(k.served.url, keeper_check(TRUST, 1))
                answers = [keeper.post(SHARD_PATH) for _ in range(3)]
                mute = session.connect(url_of(silent), keeper_check(TRUST, 1))
                try:
                    mute.post(SHARD_PATH)
                except TransportError as exc:
                    return answers, str(exc)
                raise AssertionError("a server that never answers did not time out")

        answers, error = await in_thread(use)
        assert answers == [EMPTY] * 3
        assert error == "no answer within 0.3 s"
        assert k.served.listener.accepted == 1


def test_rejects_non_origin_urls() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for url in ("http://k:1", "https://k:1/path", "https://user@k:1", "k:1"):
        with pytest.raises(ValueError, match="URL"):
            HttpsConnection(url, context, lambda peer: True)


# ---------------------------------------------------------------------- why there is no answer, mapped once


async def failure_of(connection: HttpsConnection, deadline: float | None = None) -> TransportError:
    """The error `submit` hands its callback (the driver's interface), for one request."""
    done = anyio.Event()
    outcomes: list[object] = []

    def on_done(outcome: object) -> None:
        outcomes.append(outcome)
        done.set()

    connection.submit("POST", SHARD_PATH, b"{}", on_done=on_done, deadline=deadline)  # type: ignore[arg-type]
    await done.wait()
    [outcome] = outcomes
    assert isinstance(outcome, TransportError), outcome
    await connection.aclose()
    return outcome


async def test_each_failure_reaches_the_driver_with_its_kind(
    dev_identity: DevIdentity, foreign_identity: DevIdentity
) -> None:
    """What the custody core decides on (issue 15): the kind, set where the exception is caught."""
    kinds: dict[str, FailureKind] = {}
    async with serving(server_context(dev_identity.keeper(2)), Recording()) as served:
        kinds["another keeper's SVID"] = (await failure_of(for_keeper(served.url, dev_identity, 1))).kind
    async with serving(server_context(foreign_identity.keeper(1)), Recording()) as served:
        kinds["an untrusted CA"] = (await failure_of(for_keeper(served.url, dev_identity, 1))).kind
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(SocketAttribute.local_port)
    await listener.aclose()
    kinds["nothing listening"] = (await failure_of(for_keeper(f"https://127.0.0.1:{port}", dev_identity))).kind
    for name, behaviour in (("hung up", _hang_up_after_request), ("not HTTP", _garbage_answer)):
        async with misbehaving(dev_identity, behaviour) as bad:
            kinds[name] = (await failure_of(for_keeper(url_of(bad), dev_identity))).kind
    async with misbehaving(dev_identity, _huge_answer) as bad:
        too_large = for_keeper(url_of(bad), dev_identity, max_response_bytes=4096)
        kinds["too large"] = (await failure_of(too_large)).kind
    async with misbehaving(dev_identity, _never_answer) as bad:
        deadline = anyio.current_time() + 0.3
        kinds["silent"] = (await failure_of(for_keeper(url_of(bad), dev_identity), deadline)).kind
    assert kinds == {
        "another keeper's SVID": FailureKind.PEER_IDENTITY,
        "an untrusted CA": FailureKind.TLS,
        "nothing listening": FailureKind.REFUSED,
        "hung up": FailureKind.CLOSED,
        "not HTTP": FailureKind.BAD_HTTP,
        "too large": FailureKind.BAD_HTTP,
        "silent": FailureKind.TIMEOUT,
    }
