"""A closed-loop HTTPS load generator: keep-alive connections, client certificates, several processes.

The same client drives spike and OpenBao, so their numbers compare.  Each
worker process owns some connections and keeps exactly one request in flight
on each (no pipelining), using non-blocking TLS sockets and a selector: very
little Python per request, so the client is not what is measured.

Every worker opens its connections (TLS handshakes included) first and then
waits; the load starts in all workers at once, after `on_start` has run in
the parent (the suite reads the server's CPU time there), so set-up costs
are outside the measured window.

    python bench/loadgen.py --url https://127.0.0.1:8553 --cert c.pem --key k.pem --ca ca.pem \
        --connections 16 --processes 2 --duration 10 --request get-spike --paths 1000

Which secret each request names:

* default: a deterministic walk over ``bench/s0 .. bench/s<paths-1>``;
* ``--sample K``: K paths drawn at random (``--seed``) among the ``paths``, cycled;
* ``--seed-range A:B``: every path ``A .. B-1`` exactly once, split among the
  connections, then stop (used to fill a store quickly; ``--duration`` is a cap).

Prints one JSON object: requests, errors, seconds, throughput, latency percentiles.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue as queue_module
import random
import selectors
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

CONNECT_TIMEOUT = 10.0
STALL_TIMEOUT = 30.0  # no answer on any connection for this long: give up


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    cert: str | None
    key: str | None
    ca: str | None
    token: str | None


@dataclass(frozen=True)
class Paths:
    """Which secret index each request uses (see the module docstring)."""

    count: int = 1000
    sample: tuple[int, ...] = ()
    seed_range: tuple[int, int] | None = None


@dataclass
class Result:
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    failure: str = ""


def build_request(kind: str, target: Target, index: int, counter: int, payload: int) -> bytes:
    host = f"{target.host}:{target.port}"
    value = "v" * payload
    if kind == "get-spike":
        path, body = "/v1/store/secrets?action=get", f'{{"path":"bench/s{index}"}}'
    elif kind == "put-spike":
        path, body = "/v1/store/secrets", f'{{"path":"bench/s{index}","values":{{"value":"{value}{counter}"}}}}'
    elif kind == "get-bao":
        return (
            f"GET /v1/secret/data/bench/s{index} HTTP/1.1\r\nHost: {host}\r\nX-Vault-Token: {target.token}\r\n\r\n"
        ).encode()
    elif kind == "put-bao":
        body = f'{{"data":{{"value":"{value}{counter}"}}}}'
        return (
            f"POST /v1/secret/data/bench/s{index} HTTP/1.1\r\nHost: {host}\r\nX-Vault-Token: {target.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
        ).encode()
    else:
        raise SystemExit(f"unknown request kind {kind}")
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()


def client_context(target: Target) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["http/1.1"])
    if target.ca:
        ctx.load_verify_locations(target.ca)
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if target.cert:
        ctx.load_cert_chain(target.cert, target.key)
    return ctx


class Conn:
    __slots__ = ("body_at", "buf", "index", "indices", "request", "sent_at", "sock", "want")

    def __init__(self, sock: ssl.SSLSocket, index: int, indices: Iterator[int] | None) -> None:
        self.sock = sock
        self.index = index
        self.indices = indices  # seed mode: the paths this connection still has to write
        self.buf = bytearray()
        self.sent_at = 0.0
        self.want = -1  # total bytes of the current response once its head is parsed
        self.request = b""
        self.body_at = 0


def connect(target: Target, ctx: ssl.SSLContext, attempts: int = 3) -> ssl.SSLSocket:
    for attempt in range(1, attempts + 1):
        raw = socket.create_connection((target.host, target.port), timeout=CONNECT_TIMEOUT)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock = ctx.wrap_socket(raw, server_hostname=target.host)
        except (OSError, ssl.SSLError):
            raw.close()
            if attempt == attempts:
                raise
            time.sleep(0.2 * attempt)
            continue
        sock.setblocking(False)
        return sock
    raise AssertionError("unreachable")


def _chunked_complete(buf: bytearray, start: int) -> int:
    """Total length of a chunked body that starts at `start` once complete, else -1."""
    pos = start
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return -1
        size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
        pos = line_end + 2 + size + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", line_end)  # trailers, if any, end with an empty line
            return end + 4 if end >= 0 else -1
        if pos > len(buf):
            return -1


def worker(
    target: Target,
    kind: str,
    connections: int,
    duration: float,
    paths: Paths,
    payload: int,
    offset: int,
    total_connections: int,
    ready: mp.Queue,
    go: mp.Event,
    results: mp.Queue,
) -> None:
    result = Result()
    try:
        _worker(target, kind, connections, duration, paths, payload, offset, total_connections, ready, go, result)
    except Exception as exc:  # reported to the parent, which fails the run with it
        result.failure = f"{exc.__class__.__name__}: {exc}"
        ready.put("failed")
    results.put(result.__dict__)


def _worker(
    target: Target,
    kind: str,
    connections: int,
    duration: float,
    paths: Paths,
    payload: int,
    offset: int,
    total_connections: int,
    ready: mp.Queue,
    go: mp.Event,
    result: Result,
) -> None:
    ctx = client_context(target)
    selector = selectors.DefaultSelector()

    def indices_for(i: int) -> Iterator[int] | None:
        if paths.seed_range is None:
            return None
        start, stop = paths.seed_range
        return iter(range(start + i, stop, total_connections))

    conns = [Conn(connect(target, ctx), offset + i, indices_for(offset + i)) for i in range(connections)]
    latencies = result.latencies
    statuses = result.statuses
    counter = 0
    sample = paths.sample

    def next_index(conn: Conn) -> int | None:
        if conn.indices is not None:
            return next(conn.indices, None)
        spot = conn.index * 7919 + counter
        return sample[spot % len(sample)] if sample else spot % paths.count

    def send(conn: Conn, again: bool = False) -> bool:
        nonlocal counter
        if not again:
            counter += 1
            index = next_index(conn)
            if index is None:
                return False
            conn.request = build_request(kind, target, index, counter, payload)
        conn.sock.setblocking(True)
        conn.sock.sendall(conn.request)
        conn.sock.setblocking(False)
        conn.sent_at = time.perf_counter()
        conn.buf.clear()
        conn.want = -1
        return True

    def reconnect(conn: Conn) -> None:
        # The server closed a keep-alive connection (it should not): count it, open
        # a new one and send the same request again, so that seeding loses nothing.
        result.errors += 1
        selector.unregister(conn.sock)
        conn.sock.close()
        conn.sock = connect(target, ctx)
        selector.register(conn.sock, selectors.EVENT_READ, conn)
        send(conn, again=True)

    ready.put("ready")
    if not go.wait(timeout=120):
        raise RuntimeError("the parent never started the run")
    start = time.perf_counter()
    stop = start + duration
    active = 0
    for conn in conns:
        if send(conn):
            selector.register(conn.sock, selectors.EVENT_READ, conn)
            active += 1
    last_answer = start
    while active:
        now = time.perf_counter()
        if now >= stop:
            break
        events = selector.select(timeout=min(1.0, max(0.0, stop - now)))
        if not events and time.perf_counter() - last_answer > STALL_TIMEOUT:
            raise RuntimeError(f"no answer for {STALL_TIMEOUT:g}s")
        for key, _ in events:
            conn = key.data
            closed = False
            while True:
                try:
                    chunk = conn.sock.recv(65536)
                except ssl.SSLWantReadError:
                    break
                except (ConnectionError, ssl.SSLError):
                    chunk = b""
                if not chunk:
                    closed = True
                    break
                conn.buf += chunk
                if conn.sock.pending() == 0:
                    break
            if closed:
                reconnect(conn)
                continue
            buf = conn.buf
            if conn.want == -1:
                head_end = buf.find(b"\r\n\r\n")
                if head_end < 0:
                    continue
                head = bytes(buf[:head_end]).lower()
                status = int(head[9:12])
                code = str(status)
                statuses[code] = statuses.get(code, 0) + 1
                if status >= 300:
                    result.errors += 1
                marker = head.find(b"content-length:")
                if marker >= 0:
                    end = head.find(b"\r\n", marker)
                    conn.want = head_end + 4 + int(head[marker + 15 : end if end >= 0 else len(head)])
                elif b"transfer-encoding: chunked" in head:
                    conn.body_at = head_end + 4
                    conn.want = -2
                else:
                    conn.want = head_end + 4
            if conn.want == -2:
                total = _chunked_complete(buf, conn.body_at)
                if total < 0:
                    continue
                conn.want = total
            if len(buf) >= conn.want:
                done = time.perf_counter()
                last_answer = done
                latencies.append(done - conn.sent_at)
                try:
                    more = done < stop and send(conn)
                except (OSError, ssl.SSLError):  # the server closed the connection after answering
                    reconnect(conn)
                    continue
                if not more:
                    selector.unregister(conn.sock)
                    active -= 1
    result.seconds = time.perf_counter() - start
    result.requests = len(latencies)
    for conn in conns:
        conn.sock.close()


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def run(
    target: Target,
    kind: str,
    connections: int,
    processes: int,
    duration: float,
    paths: Paths | int = 1000,
    payload: int = 32,
    *,
    on_start: Callable[[], None] = lambda: None,
    timeout: float | None = None,
) -> dict[str, object]:
    """Run the load; `on_start` runs once every connection is open, just before the load starts."""
    if isinstance(paths, int):
        paths = Paths(paths)
    processes = max(1, min(processes, connections))
    context = mp.get_context("fork")
    ready: mp.Queue = context.Queue()
    results: mp.Queue = context.Queue()
    go = context.Event()
    per = [connections // processes + (1 if i < connections % processes else 0) for i in range(processes)]
    procs = []
    offset = 0
    for count in per:
        args = (target, kind, count, duration, paths, payload, offset, connections, ready, go, results)
        p = context.Process(target=worker, args=args, daemon=True)
        offset += count
        p.start()
        procs.append(p)
    limit = timeout if timeout is not None else duration + STALL_TIMEOUT + 60
    try:
        states = [ready.get(timeout=CONNECT_TIMEOUT + 30) for _ in procs]
        if "failed" not in states:
            on_start()
        go.set()
        collected = [results.get(timeout=limit) for _ in procs]
    except queue_module.Empty:
        raise RuntimeError("load generator workers did not report in time") from None
    finally:
        go.set()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    failures = [r["failure"] for r in collected if r["failure"]]
    if failures:
        raise RuntimeError("load generator failed: " + "; ".join(failures))
    latencies = sorted(x for r in collected for x in r["latencies"])
    seconds = max(r["seconds"] for r in collected)
    total = sum(r["requests"] for r in collected)
    statuses: dict[str, int] = {}
    for r in collected:
        for code, n in r["statuses"].items():
            statuses[code] = statuses.get(code, 0) + n
    return {
        "requests": total,
        "errors": sum(r["errors"] for r in collected),
        "statuses": statuses,
        "seconds": seconds,
        "throughput": total / seconds if seconds else 0.0,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p90_ms": percentile(latencies, 0.90) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": (latencies[-1] if latencies else float("nan")) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--ca")
    parser.add_argument("--token", default=os.environ.get("BAO_TOKEN"))
    parser.add_argument("--request", required=True, choices=["get-spike", "put-spike", "get-bao", "put-bao"])
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--paths", type=int, default=1000)
    parser.add_argument("--sample", type=int, default=0, help="cycle over this many random paths among --paths")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seed-range", help="A:B: write paths A..B-1 once each, then stop")
    parser.add_argument("--payload", type=int, default=32, help="bytes of value per PUT")
    args = parser.parse_args()
    parts = urlsplit(args.url)
    target = Target(parts.hostname or "127.0.0.1", parts.port or 443, args.cert, args.key, args.ca, args.token)
    sample = tuple(random.Random(args.seed).sample(range(args.paths), args.sample)) if args.sample else ()
    seed_range = None
    if args.seed_range:
        a, b = args.seed_range.split(":")
        seed_range = (int(a), int(b))
    paths = Paths(args.paths, sample, seed_range)
    out = run(target, args.request, args.connections, args.processes, args.duration, paths, args.payload)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
