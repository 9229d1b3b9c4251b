"""Graceful stop, with real processes: SIGTERM and Ctrl-C drain Nexus, a second signal stops it at once.

When SIGTERM arrives Nexus has three client connections open: one idle
keep-alive connection, one write whose body is half sent, one request that
will never be finished.  It must stop accepting at once, close the idle
connection, let the half-sent write finish and acknowledge it, give up on
the stalled request after the grace period without acknowledging anything,
and exit 0 within the bound.  The next Nexus rebuilds its key from the
keepers and the acknowledged write reads back; the abandoned one is not
there.  A second run gets SIGINT (Ctrl-C) and then SIGTERM: it stops at once,
well before its long grace period, still with exit code 0.  Keepers stop on
SIGTERM with exit code 0 too.
"""

from __future__ import annotations

import json
import secrets
import signal
import socket
import ssl
import time
from typing import Any

import pytest

from spike.app.api.messages import (
    SECRETS_PATH,
    SecretGetRequest,
    SecretGetResponse,
    SecretPutRequest,
    SecretPutResponse,
)
from spike.app.commands.client import NexusError
from spike.transports.tls import client_context
from tests.e2e.harness import Cluster, SecretsSeen, wait_until

pytestmark = pytest.mark.e2e

GRACE = 2.0


class Raw:
    """A hand-driven HTTP/1.1 connection to Nexus over mTLS, to stop half-way through a request."""

    def __init__(self, c: Cluster, identity: str = "pilot-superuser") -> None:
        context = client_context(c.identity.files(identity))
        self.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", c.nexus_port), timeout=10))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_all(self) -> bytes:
        """Everything until the server closes the connection."""
        data = b""
        while chunk := self._recv():
            data += chunk
        return data

    def read_response(self) -> tuple[int, dict[str, str], bytes]:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self._recv()
            assert chunk, f"connection closed after {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        while len(body) < int(headers["content-length"]):
            body += self._recv()
        return int(status_line.split()[1]), headers, body

    def status(self) -> int:
        """A whole request (Nexus's status), and its answer's status code."""
        self.send(b"POST /v1/operator/status HTTP/1.1\r\nhost: nexus\r\ncontent-length: 2\r\n\r\n{}")
        return self.read_response()[0]

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(65536)
        except (ssl.SSLError, ConnectionResetError):
            return b""

    def close(self) -> None:
        self.sock.close()


def request(path: str, body: bytes) -> tuple[bytes, bytes]:
    """A POST split in two: the head and the first bytes of the body, then the rest."""
    head = (
        f"POST {path} HTTP/1.1\r\nhost: nexus\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body[:7], body[7:]


def put_body(path: str, value: str) -> bytes:
    return json.dumps({"path": path, "values": {"value": value}}).encode()


def stall(c: Cluster, value: str) -> Raw:
    """A connection with half a write sent, read by Nexus, and never finished."""
    stalled = Raw(c)
    stalled.send(request(SECRETS_PATH, put_body("drain/abandoned", value))[0])
    # A whole request on another connection, answered: Nexus has read what came before it.
    barrier = Raw(c)
    assert barrier.status() == 200
    barrier.close()
    return stalled


def refused(c: Cluster) -> bool:
    try:
        socket.create_connection(("127.0.0.1", c.nexus_port), timeout=1).close()
    except OSError:
        return True
    return False


def test_sigterm_finishes_a_write_under_way_and_exits_0_within_the_grace(
    make_cluster: Any, secrets_seen: SecretsSeen
) -> None:
    c: Cluster = make_cluster(nexus_env={"SPIKE_NEXUS_SHUTDOWN_GRACE": f"{GRACE:g}s"})
    secrets_seen.add_dir(c.data_dir)
    c.start()
    assert c.bootstrap().returncode == 0
    c.wait_status(lambda s: s["redundancy"] == 1, "every keeper holding")
    secrets_seen.add_keys(c, "shutdown")
    values = {name: secrets.token_urlsafe(24) for name in ("before", "inflight", "abandoned", "after")}
    for name, value in values.items():
        secrets_seen.add_secret(f"shutdown value {name}", value.encode())
    with c.client() as client:
        put = SecretPutRequest(path="drain/before", values={"value": values["before"]})
        assert client.call(SECRETS_PATH, put, SecretPutResponse).version == 1

    nexus = c.nexus()
    inflight = Raw(c)
    first, rest = request(SECRETS_PATH, put_body("drain/inflight", values["inflight"]))
    inflight.send(first)
    stalled = stall(c, values["abandoned"])
    idle = Raw(c)
    assert idle.status() == 200  # and then idle: a keep-alive connection

    nexus.popen.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    c.wait_log(nexus, r"received SIGTERM: finishing requests under way, then stopping")
    wait_until(lambda: refused(c), "Nexus to stop accepting connections", timeout=GRACE)
    assert idle.read_all() == b""  # the idle keep-alive connection is closed, with no answer
    assert time.monotonic() - signalled < GRACE

    inflight.send(rest)  # the write under way finishes and is acknowledged
    status, headers, body = inflight.read_response()
    assert (status, json.loads(body)) == (200, {"version": 1}), body
    assert headers.get("connection") == "close"
    assert nexus.alive()  # the stalled request still holds it, within the grace period

    assert stalled.read_all() == b""  # given up after the grace: closed, never acknowledged
    assert nexus.popen.wait(timeout=GRACE + 5) == 0
    took = time.monotonic() - signalled
    assert GRACE - 0.5 < took < GRACE + 3, took
    text = nexus.text()
    assert "1 connection(s) still busy after 2s: closing them" in text
    assert text.rstrip().endswith("Nexus stopped; the root key is gone from memory"), text[-500:]
    for raw in (idle, inflight, stalled):
        raw.close()

    # The next Nexus rebuilds its key from the keepers; what was acknowledged is there.
    c.start_nexus({"SPIKE_NEXUS_SHUTDOWN_GRACE": "30s"})
    c.wait_ready()
    with c.client() as client:
        for name in ("before", "inflight"):
            got = client.call(SECRETS_PATH, SecretGetRequest(path=f"drain/{name}"), SecretGetResponse, action="get")
            assert got.data == {"value": values[name]} and got.version == 1
        with pytest.raises(NexusError) as caught:
            client.call(SECRETS_PATH, SecretGetRequest(path="drain/abandoned"), SecretGetResponse, action="get")
        assert caught.value.code == "api_not_found"
        put = SecretPutRequest(path="drain/after", values={"value": values["after"]})
        assert client.call(SECRETS_PATH, put, SecretPutResponse).version == 1
    audit = [json.loads(line) for line in (c.data_dir / "audit.log").read_text().splitlines()]
    drained = [a for a in audit if a["path"] == "drain/inflight"]
    outcomes = [(a["action"], a["status"], a["decision"]) for a in drained]
    assert outcomes == [("", 200, "allowed"), ("get", 200, "allowed")], drained
    assert not [a for a in audit if a["path"] == "drain/abandoned" and a["action"] == ""]

    # Ctrl-C while a request is stalled, then SIGTERM again and again (someone impatient): the
    # second signal stops it at once, the ones after it do not cut its cleanup short.
    nexus = c.nexus()
    stalled = stall(c, values["abandoned"])
    nexus.popen.send_signal(signal.SIGINT)
    signalled = time.monotonic()
    c.wait_log(nexus, r"received SIGINT: finishing requests under way")
    while nexus.alive() and time.monotonic() - signalled < 10:
        nexus.popen.send_signal(signal.SIGTERM)
        time.sleep(0.002)
    assert nexus.popen.wait(timeout=10) == 0, nexus.text()[-2000:]
    assert time.monotonic() - signalled < 5  # not the 30 s grace
    text = nexus.text()
    assert "received SIGTERM again: stopping now" in text and "Traceback" not in text, text[-2000:]
    assert text.rstrip().endswith("Nexus stopped; the root key is gone from memory"), text[-2000:]
    assert stalled.read_all() == b""
    stalled.close()

    # Keepers stop on SIGTERM with 0, and say their shard is gone.
    for keeper_id in c.keeper_ids:
        c.keeper(keeper_id).popen.send_signal(signal.SIGTERM)
    for keeper_id in c.keeper_ids:
        keeper = c.keeper(keeper_id)
        assert keeper.popen.wait(timeout=10) == 0
        assert "keeper stopped; its shard is gone from memory" in keeper.text()
