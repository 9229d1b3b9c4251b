"""A few calls through the real mTLS server on loopback, with the operator's client.

The in-process tests call the route table directly; these prove what only the
server can: a write's future is awaited before the answer goes out (and
without blocking the event loop: reads are answered meanwhile), concurrent
writes from separate connections share a group commit, error codes reach the
client as its sentences, and the largest cipher payloads fit the server's and
the client's limits.
"""

from __future__ import annotations

import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import anyio
import pytest
from anyio.abc import SocketAttribute
from anyio.from_thread import start_blocking_portal

from spike.app.api.messages import (
    CIPHER_DECRYPT_PATH,
    CIPHER_ENCRYPT_PATH,
    EXTENSIONS_HEADER,
    SECRETS_PATH,
    SecretGetRequest,
    SecretGetResponse,
    SecretPutRequest,
    SecretPutResponse,
)
from spike.app.commands.client import NexusClient, NexusError
from spike.app.commands.devca import DevIdentity
from spike.app.nexus.cipher_api import MAX_PLAINTEXT
from spike.app.nexus.server import NEXUS_LIMITS
from spike.protocol.api import ApiRequest
from spike.transports.server import HttpsServer
from spike.transports.tls import server_context
from tests.api.api_helpers import TRUST, WAIT, Node


@pytest.fixture
def served(node: Node, dev_identity: DevIdentity) -> Iterator[str]:
    """The node's API behind the real HTTPS server (Nexus's limits), on an event loop in a thread."""
    with start_blocking_portal() as portal:
        listener = portal.call(partial(anyio.create_tcp_listener, local_host="127.0.0.1"))
        port = listener.listeners[0].extra(SocketAttribute.local_port)
        server = HttpsServer(server_context(dev_identity.files("nexus")), node.api, NEXUS_LIMITS)
        task = portal.start_task_soon(server.serve, listener)
        try:
            yield f"https://127.0.0.1:{port}"
        finally:
            task.cancel()


def client(url: str, identity: DevIdentity, role: str = "pilot-superuser") -> NexusClient:
    return NexusClient(url, identity.files(role), TRUST, timeout=WAIT)


def put(nexus: NexusClient, path: str, value: str, cas: int | None = None) -> int:
    answer = nexus.call(SECRETS_PATH, SecretPutRequest(path=path, values={"k": value}, cas=cas), SecretPutResponse)
    return answer.version


def get(nexus: NexusClient, path: str, version: int = 0) -> SecretGetResponse:
    return nexus.call(SECRETS_PATH, SecretGetRequest(path=path, version=version), SecretGetResponse, action="get")


def wait_for(condition: Callable[[], Any], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def test_put_and_get_over_mtls(served: str, dev_identity: DevIdentity) -> None:
    with client(served, dev_identity) as nexus:
        assert put(nexus, "tls/a", "one") == 1
        assert put(nexus, "tls/a", "two", cas=1) == 2
        got = get(nexus, "tls/a")
        assert (got.version, got.data) == (2, {"k": "two"})


def test_the_client_says_it_reads_spikes_answers(node: Node, dev_identity: DevIdentity) -> None:
    """Every request of spike's client carries the header that gets it spike's answers (409 and its reason)
    where SPIKE's Go Nexus would answer otherwise (spike/app/nexus/dialect.py)."""
    seen: list[bytes | None] = []

    def api(request: ApiRequest) -> Any:
        seen.append(request.headers.get(EXTENSIONS_HEADER))
        return node.api(request)

    with start_blocking_portal() as portal:
        listener = portal.call(partial(anyio.create_tcp_listener, local_host="127.0.0.1"))
        port = listener.listeners[0].extra(SocketAttribute.local_port)
        server = HttpsServer(server_context(dev_identity.files("nexus")), api, NEXUS_LIMITS)
        task = portal.start_task_soon(server.serve, listener)
        try:
            with client(f"https://127.0.0.1:{port}", dev_identity) as nexus:
                assert put(nexus, "tls/h", "one") == 1
                assert get(nexus, "tls/h").version == 1
        finally:
            task.cancel()
    assert seen == [b"1", b"1"]


def test_the_answer_waits_for_the_commit_and_the_loop_does_not(
    served: str, dev_identity: DevIdentity, node: Node
) -> None:
    """Writers on 8 connections queue behind a held commit: nobody is answered until it is released,
    reads are answered meanwhile, and then the 8 writes go out in one batch."""
    with client(served, dev_identity) as reader:
        put(reader, "tls/read", "before")
        busy, release = threading.Event(), threading.Event()

        def hold(db: sqlite3.Connection) -> None:
            busy.set()
            release.wait(WAIT)

        batches, writes = node.store.batches, node.store.writes
        node.store.submit(hold)
        assert busy.wait(WAIT)
        clients = [client(served, dev_identity) for _ in range(8)]
        try:
            with ThreadPoolExecutor(8) as pool:
                results = [pool.submit(put, c, f"tls/w{i}", str(i)) for i, c in enumerate(clients)]
                wait_for(lambda: node.store._queue.qsize() == 8, "the 8 writes to be queued")
                assert not any(r.done() for r in results)  # no answer before the commit
                assert get(reader, "tls/read").data == {"k": "before"}  # the event loop is free
                assert not any(r.done() for r in results)
                release.set()
                assert [r.result(WAIT) for r in results] == [1] * 8
        finally:
            release.set()
            for c in clients:
                c.close()
    assert (node.store.batches - batches, node.store.writes - writes) == (2, 9)  # the hold, then all 8 together


@pytest.mark.parametrize(
    ("call", "status", "code", "sentence"),
    [
        (lambda n: get(n, "no/such"), 404, "api_not_found", "not found"),
        (lambda n: put(n, "tls/c", "x", cas=5), 409, "api_conflict", "conflicts"),
        (lambda n: put(n, "tls//c", "x"), 400, "api_bad_request", "Nexus rejected the request: path must be segments"),
    ],
    ids=["not found", "conflict", "bad request"],
)
def test_error_codes_reach_the_client(
    served: str, dev_identity: DevIdentity, call: Callable[[NexusClient], Any], status: int, code: str, sentence: str
) -> None:
    with client(served, dev_identity) as nexus, pytest.raises(NexusError) as failure:
        call(nexus)
    assert (failure.value.status, failure.value.code) == (status, code)
    assert sentence in str(failure.value)


def test_not_ready_and_refused_reach_the_client(served: str, dev_identity: DevIdentity, node: Node) -> None:
    with client(served, dev_identity, "pilot-recover") as stranger, pytest.raises(NexusError) as refused:
        get(stranger, "tls/a")
    assert (refused.value.status, refused.value.code) == (401, "access_unauthorized")
    assert "refused this identity" in str(refused.value)
    node.lock()
    with client(served, dev_identity) as nexus, pytest.raises(NexusError) as waiting:
        get(nexus, "tls/a")
    assert (waiting.value.status, waiting.value.code) == (503, "state_not_ready")
    assert "not ready" in str(waiting.value)


def test_the_largest_cipher_payloads_fit(served: str, dev_identity: DevIdentity) -> None:
    """1 MiB of plaintext in, its ciphertext (1 MiB + 29 bytes) out, and back."""
    plaintext = bytes(range(256)) * (MAX_PLAINTEXT // 256)
    with client(served, dev_identity) as nexus:
        sealed = nexus.call_bytes(CIPHER_ENCRYPT_PATH, plaintext)
        assert len(sealed) == MAX_PLAINTEXT + 29
        assert nexus.call_bytes(CIPHER_DECRYPT_PATH, sealed) == plaintext
        with pytest.raises(NexusError) as failure:
            nexus.call_bytes(CIPHER_ENCRYPT_PATH, plaintext + b"!")
        assert failure.value.status == 400


def test_a_body_over_the_server_limit_is_refused_as_such(served: str, dev_identity: DevIdentity) -> None:
    with client(served, dev_identity) as nexus, pytest.raises(NexusError) as failure:
        nexus.call_bytes(CIPHER_ENCRYPT_PATH, b"z" * (NEXUS_LIMITS.max_body_bytes + 1))
    assert failure.value.status == 413, str(failure.value)


def test_a_write_whose_connection_breaks_is_never_sent_twice(dev_identity: DevIdentity) -> None:
    """Nexus takes a put and closes the connection without an answer (as when it dies with the write
    in flight): the client must not send the put again, and must say the connection broke rather than
    that Nexus refused it, so that the caller knows the write is in doubt."""
    context = server_context(dev_identity.files("nexus"))
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            with context.wrap_socket(raw, server_side=True) as conn:
                while True:
                    request = _read_request(conn)
                    if request is None:
                        break
                    received.append(request)
                    if len(received) == 2:
                        break  # the second request: taken, then the connection closes unanswered
                    body = b'{"version":1}'
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
                    conn.sendall(b"content-length: %d\r\n\r\n%s" % (len(body), body))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        url = f"https://127.0.0.1:{listener.getsockname()[1]}"
        with client(url, dev_identity) as nexus:
            assert put(nexus, "once/a", "1") == 1  # the connection is now kept alive
            with pytest.raises(NexusError) as failure:
                put(nexus, "once/a", "2")
        assert failure.value.status == 0
        assert "connection closed before an answer" in str(failure.value)
        assert len(received) == 2
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        listener.close()
        thread.join(timeout=WAIT)


def _read_request(conn: ssl.SSLSocket) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += conn.recv(65536)
    return head
