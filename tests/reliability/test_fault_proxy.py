"""The fault proxy itself: each mode does what the chaos run relies on, against a plain TCP echo server."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.reliability.faultproxy import MODES, FaultProxy, FaultSchedule, ProxyLoop


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve_one(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(2)
        server.close()


@pytest.fixture
def proxy(echo_port: int) -> Iterator[FaultProxy]:
    host = ProxyLoop()
    made = FaultProxy(host, echo_port)
    try:
        yield made
    finally:
        made.close()
        host.close()


def echo(port: int, data: bytes = b"ping", timeout: float = 2.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return sock.recv(65536)


def test_pass_forwards_both_ways(proxy: FaultProxy) -> None:
    assert echo(proxy.port) == b"ping"
    assert proxy.counts.forwarded == 1
    assert proxy.counts.bytes_up == proxy.counts.bytes_down == 4


def test_drop_resets_new_connections_only(proxy: FaultProxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as kept:
        kept.sendall(b"a")
        assert kept.recv(10) == b"a"
        proxy.set_mode("drop")
        with pytest.raises((ConnectionError, OSError)):
            reply = echo(proxy.port)
            if reply == b"":
                raise ConnectionResetError("closed")
        kept.sendall(b"b")  # an open connection keeps flowing
        assert kept.recv(10) == b"b"
    assert proxy.counts.dropped == 1


def test_delay_holds_each_chunk(proxy: FaultProxy) -> None:
    proxy.set_mode("delay", 0.3)
    start = time.monotonic()
    assert echo(proxy.port) == b"ping"
    assert time.monotonic() - start >= 0.55  # held on the way there and on the way back


def test_blackhole_swallows_new_and_holds_open_connections(proxy: FaultProxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as held:
        held.sendall(b"a")
        assert held.recv(10) == b"a"
        proxy.set_mode("blackhole")
        with pytest.raises(TimeoutError):
            echo(proxy.port, timeout=0.3)  # accepted, never answered
        held.sendall(b"b")
        held.settimeout(0.3)
        with pytest.raises(TimeoutError):
            held.recv(10)
        proxy.heal()
        held.settimeout(2)
        assert held.recv(10) == b"b"  # the partition healed: the held bytes arrive
    assert proxy.counts.blackholed == 1
    assert echo(proxy.port) == b"ping"


def test_cut_resets_open_connections(proxy: FaultProxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as sock:
        sock.sendall(b"a")
        assert sock.recv(10) == b"a"
        assert proxy.cut() == 1
        with pytest.raises(ConnectionResetError):
            if sock.recv(10) == b"":
                raise AssertionError("closed cleanly, not reset")
    assert echo(proxy.port) == b"ping"  # new connections still pass


def test_target_down_is_a_reset(echo_port: int) -> None:
    host = ProxyLoop()
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead_port = unused.getsockname()[1]
    proxy = FaultProxy(host, dead_port)
    try:
        with pytest.raises((ConnectionError, OSError)):
            if echo(proxy.port) == b"":
                raise ConnectionResetError("closed")
        assert proxy.counts.upstream_failed == 1
    finally:
        proxy.close()
        host.close()


def test_schedule_is_replayable_by_seed() -> None:
    def draw(seed: int) -> list[object]:
        schedule = FaultSchedule(random.Random(seed), [1, 2, 3])
        return [schedule.next() for _ in range(50)]

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)
    assert {f.mode for f in draw(5)} == {*MODES[1:], "cut"}
