"""The cost of spike's own HTTP/1.1 request parser against h11's, in one run.

Why spike's servers have a parser of their own (spike/transports/http1.py)
rather than h11, which its client uses: this measures both, server side, on
the same requests, in the same process, interleaved round by round.  Per
request kind and per parser it reports the median over the rounds of the CPU
time per request (``time.process_time``), for parsing alone (bytes in, the
request's method, target, headers and body out) and for a whole exchange as a
server does it (parse, then write a small JSON answer and get ready for the
next request).

    python bench/http_parsers.py            # 7 rounds of 0.5 s per parser and kind
    python bench/http_parsers.py --rounds 3 --seconds 0.2 --json

Needs only spike's own dependencies (h11 is one).  Nothing here is a test: the
numbers go to docs/benchmarks.md with the command that produced them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import h11

from spike.transports.http1 import RequestParser, response

HEAD_LIMIT = 16 * 1024
BODY_LIMIT = 1024 * 1024 + 64 * 1024


def _sized(path: bytes, body: bytes) -> bytes:
    return (
        b"POST " + path + b" HTTP/1.1\r\nHost: nexus:8553\r\nUser-Agent: spike/0.1.0\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body


def _chunked(path: bytes, body: bytes, chunk: int) -> bytes:
    out = b"POST " + path + b" HTTP/1.1\r\nHost: nexus:8553\r\nTransfer-Encoding: chunked\r\n\r\n"
    for i in range(0, len(body), chunk):
        piece = body[i : i + chunk]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    return out + b"0\r\n\r\n"


KINDS: dict[str, bytes] = {
    "secret get (50 B body)": _sized(b"/v1/store/secrets?action=get", b'{"path":"bench/s1","version":0}' + b" " * 18),
    "secret put (1 KiB body)": _sized(
        b"/v1/store/secrets", b'{"path":"bench/s1","values":{"v":"' + b"x" * 990 + b'"}}'
    ),
    "cipher (64 KiB, chunked by 4 KiB)": _chunked(b"/v1/cipher/encrypt", b"y" * 65536, 4096),
}
ANSWER = b'{"data":{"v":"0123456789abcdef0123456789abcdef"},"versions":{}}'


def spike_parse(data: bytes) -> Callable[[], object]:
    parser = RequestParser(max_head=HEAD_LIMIT, max_body=BODY_LIMIT)

    def once() -> object:
        parser.feed(data)
        request = parser.next_request()
        assert request is not None
        return request

    return once


def spike_exchange(data: bytes) -> Callable[[], object]:
    parser = RequestParser(max_head=HEAD_LIMIT, max_body=BODY_LIMIT)

    def once() -> object:
        parser.feed(data)
        request = parser.next_request()
        assert request is not None
        return response(200, "application/json", ANSWER, close=not request.keep_alive)

    return once


def _h11_read(conn: h11.Connection, data: bytes) -> h11.Request:
    conn.receive_data(data)
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return head
        else:
            raise AssertionError(f"h11 stopped at {event!r}")


def h11_parse(data: bytes) -> Callable[[], object]:
    # h11 reads one request per cycle and a server must answer it before the next: the cycle is
    # restarted by hand after a canned answer that is not part of the measured work... except that
    # h11 cannot start a cycle without one, so its parse-only figure includes that small cost.
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_LIMIT)
    answer = h11.Response(status_code=200, headers=[("content-length", "0")])
    done = h11.EndOfMessage()

    def once() -> object:
        request = _h11_read(conn, data)
        conn.send(answer)
        conn.send(done)
        conn.start_next_cycle()
        return request

    return once


def h11_exchange(data: bytes) -> Callable[[], object]:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_LIMIT)

    def once() -> object:
        _h11_read(conn, data)
        out = conn.send(
            h11.Response(
                status_code=200,
                headers=[
                    ("content-type", "application/json"),
                    ("content-length", str(len(ANSWER))),
                    ("cache-control", "no-store"),
                ],
            )
        )
        out = (out or b"") + (conn.send(h11.Data(data=ANSWER)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
        conn.start_next_cycle()
        return out

    return once


def per_call(make: Callable[[bytes], Callable[[], object]], data: bytes, seconds: float) -> float:
    """CPU seconds per call, over at least `seconds` of CPU time (after a short warm-up)."""
    call = make(data)
    for _ in range(50):
        call()
    calls = 0
    start = time.process_time()
    while True:
        for _ in range(100):
            call()
        calls += 100
        spent = time.process_time() - start
        if spent >= seconds:
            return spent / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.5, help="CPU seconds per parser, kind and round")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    measures = {
        "parse": {"spike": spike_parse, "h11": h11_parse},
        "exchange": {"spike": spike_exchange, "h11": h11_exchange},
    }
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    for round_ in range(args.rounds):
        for kind, data in KINDS.items():
            for what, parsers in measures.items():
                for name, make in parsers.items():
                    micros = per_call(make, data, args.seconds) * 1e6
                    results.setdefault(kind, {}).setdefault(what, {}).setdefault(name, []).append(micros)
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    machine = f"{platform.python_implementation()} {platform.python_version()}, {platform.machine()}"
    if args.json:
        print(json.dumps({"machine": machine, "h11": h11.__version__, "rounds": args.rounds, "results": results}))
        return
    print(f"{machine}, h11 {h11.__version__}; median of {args.rounds} rounds (min-max), CPU µs per request\n")
    print("| request | measure | spike | h11 | h11 / spike |")
    print("|---|---|---|---|---|")
    for kind, by_what in results.items():
        for what, by_name in by_what.items():
            ours, theirs = by_name["spike"], by_name["h11"]
            cells = [f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" for v in (ours, theirs)]
            ratio = statistics.median(theirs) / statistics.median(ours)
            print(f"| {kind} | {what} | {cells[0]} | {cells[1]} | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
