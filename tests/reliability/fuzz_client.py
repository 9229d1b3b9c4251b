"""Raw TLS clients and request material for the server fuzzers (imported by test_fuzz_servers.py).

Everything is sent with the standard library's `ssl` and `socket`, so what a
server does with it is the server's doing.  `Verdict` is the rule every
input is judged by: an HTTP answer must be 2xx, 4xx, 501 or 505 (the
parser's refusals of transfer codings and versions it does not speak); a
500 or a malformed answer is a finding; closing the connection without an
answer is allowed.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

ALLOWED_5XX = {501, 505}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def closes(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"


@dataclass
class Outcome:
    answer: Answer | None  # None: no (whole) answer
    closed: bool  # the server closed (or reset) the connection
    detail: str = ""


def acceptable(outcome: Outcome) -> str:
    """'' if the server's reaction is allowed, else why not."""
    if outcome.detail.startswith("malformed"):
        return outcome.detail
    answer = outcome.answer
    if answer is None:
        return ""
    if 200 <= answer.status < 500 or answer.status in ALLOWED_5XX:
        return ""
    return f"HTTP {answer.status} {answer.body[:100]!r}"


def read_answer(sock: socket.socket, deadline: float) -> Outcome:
    """One response (Content-Length framed, as spike's servers send), or what stopped it."""
    buffer = b""
    try:
        while b"\r\n\r\n" not in buffer:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                return Outcome(None, True, "malformed: closed inside an answer" if buffer else "")
            buffer += chunk
        head, _, rest = buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or parts[0] != "HTTP/1.1" or not parts[1].isdigit():
            return Outcome(None, True, f"malformed status line {lines[0]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                return Outcome(None, True, "malformed: closed inside an answer body")
            rest += chunk
        status = int(parts[1])
        if status == 100:  # 100 Continue, then the real answer
            return read_answer_after(sock, rest[length:], deadline)
        return Outcome(Answer(status, headers, rest[:length]), False)
    except TimeoutError:
        return Outcome(None, False, "timeout")
    except (ssl.SSLError, ConnectionError, OSError) as exc:
        return Outcome(None, True, f"closed: {exc.__class__.__name__}")


def read_answer_after(sock: socket.socket, already: bytes, deadline: float) -> Outcome:
    if already:
        return Outcome(None, False, "malformed: bytes after 100 Continue")
    return read_answer(sock, deadline)


class RawClient:
    """One keep-alive TLS connection at a time to 127.0.0.1:port; reconnects when the last one ended."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.port = port
        self.context = context
        self.sock: ssl.SSLSocket | None = None
        self.connections = 0

    def connect(self) -> ssl.SSLSocket:
        if self.sock is None:
            raw = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            try:
                self.sock = self.context.wrap_socket(raw, server_hostname="127.0.0.1")
            except BaseException:
                raw.close()
                raise
            self.connections += 1
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None

    def send(self, data: bytes, *, wait: float = 2.0, pieces: int = 1) -> Outcome:
        """Send `data` (in `pieces` writes) and read one answer; keeps the connection only if it is clean."""
        try:
            sock = self.connect()
        except (ssl.SSLError, OSError) as exc:
            self.close()
            return Outcome(None, True, f"connect failed: {exc}")
        try:
            step = max(1, len(data) // pieces)
            for i in range(0, len(data), step):
                sock.sendall(data[i : i + step])
        except (ssl.SSLError, OSError):
            self.close()  # the server hung up while we were sending: a refusal
            return Outcome(None, True, "closed while sending")
        outcome = read_answer(sock, time.monotonic() + wait)
        if outcome.closed or outcome.answer is None or outcome.answer.closes:
            self.close()
        return outcome

    def valid(self, request: bytes, expect: int | set[int]) -> None:
        """A well-formed request on a fresh connection gets the expected answer."""
        self.close()
        outcome = self.send(request, wait=10)
        assert outcome.answer is not None, f"no answer to a valid request: {outcome}"
        assert outcome.answer.status in ({expect} if isinstance(expect, int) else expect), outcome.answer


def request(
    path: str,
    body: bytes = b"{}",
    *,
    method: str = "POST",
    headers: list[tuple[str, str]] | None = None,
    content_type: str = "application/json",
) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {content_type}"]
    head += [f"{k}: {v}" for k, v in headers or []]
    head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chunked(path: str, pieces: list[bytes]) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    return head + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


# ---------------------------------------------------------------------- mutations


def _flip(rng: random.Random, data: bytearray) -> None:
    if data:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)


def _byte(rng: random.Random, data: bytearray) -> None:
    if data:
        data[rng.randrange(len(data))] = rng.randrange(256)


def _insert(rng: random.Random, data: bytearray) -> None:
    at = rng.randrange(len(data) + 1)
    data[at:at] = rng.choice(
        [
            bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16))),
            b"\r\n",
            b"\r\n\r\n",
            b"\n",
            b"\x00",
            b" ",
            b":",
            b"Content-Length: 5\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"Expect: 100-continue\r\n",
            b"Connection: close\r\n",
            b"%",
            b'"',
            b"{",
            b"]",
        ]
    )


def _delete(rng: random.Random, data: bytearray) -> None:
    if data:
        at = rng.randrange(len(data))
        del data[at : at + rng.randrange(1, 24)]


def _duplicate(rng: random.Random, data: bytearray) -> None:
    if data:
        at = rng.randrange(len(data))
        piece = data[at : at + rng.randrange(1, 64)]
        data[at:at] = piece * rng.randrange(1, 4)


def _truncate(rng: random.Random, data: bytearray) -> None:
    if data:
        del data[rng.randrange(len(data)) :]


def _number(rng: random.Random, data: bytearray) -> None:
    """Change a run of digits (a length, a version, a chunk size) to another number."""
    digits = [i for i, b in enumerate(data) if 0x30 <= b <= 0x39]
    if digits:
        at = rng.choice(digits)
        end = at
        while end < len(data) and 0x30 <= data[end] <= 0x39:
            end += 1
        data[at:end] = str(rng.choice([0, 1, -1, 2**31, 2**63, 10**30, rng.randrange(100000)])).encode()


def _case(rng: random.Random, data: bytearray) -> None:
    if data:
        at = rng.randrange(len(data))
        data[at : at + 8] = bytes(data[at : at + 8]).swapcase()


MUTATORS: list[Callable[[random.Random, bytearray], None]] = [
    _flip,
    _byte,
    _insert,
    _delete,
    _duplicate,
    _truncate,
    _number,
    _case,
]


def mutate(rng: random.Random, data: bytes, rounds: int | None = None) -> bytes:
    out = bytearray(data)
    for _ in range(rounds or rng.randrange(1, 5)):
        rng.choice(MUTATORS)(rng, out)
    return bytes(out)


def json_bytes(value: object) -> bytes:
    return json.dumps(value).encode()
