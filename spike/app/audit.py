"""The audit log (SPIKE's ADR-0027): one JSON line per API call, apart from operational logs.

Each line says who (the caller's SPIFFE ID), what (route, action, secret
path), the decision (allowed or denied), the HTTP status and how long it
took.  It never holds a value, a shard or a key: the secret path is the only
thing read from a request body, by a decoder that ignores every other field.
Lines are appended to a 0600 file and flushed one by one; writes from the
event loop and the storage writer thread are serialised by a lock.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TextIO

import msgspec


class _PathOnly(msgspec.Struct):
    path: str = ""


_path_decoder = msgspec.json.Decoder(_PathOnly)


def secret_path_of(body: bytes, content_type: str) -> str:
    """The ``path`` field of a JSON body, or "" (raw bodies and garbage have none)."""
    if content_type == "application/octet-stream" or not body:
        return ""
    try:
        return _path_decoder.decode(body).path[:512]
    except msgspec.DecodeError:
        return ""


class AuditLine(msgspec.Struct):
    ts: str
    caller: str
    route: str
    action: str
    path: str
    decision: str
    status: int
    duration_ms: float


_encoder = msgspec.json.Encoder()


class _Clock:
    """ISO-8601 UTC timestamps with milliseconds; the costly part is formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        moment = time.time()
        second = int(moment)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((moment - second) * 1000):03d}+00:00"


class AuditLog:
    """Appends audit lines; one write per line, so a crash loses at most the line being written."""

    def __init__(self, stream: TextIO | None = None, *, fd: int | None = None) -> None:
        self._stream = stream
        self._fd = fd
        self._lock = threading.Lock()
        self._clock = _Clock()

    @classmethod
    def to_file(cls, path: Path) -> AuditLog:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return cls(fd=os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))

    def record(
        self,
        *,
        caller: str,
        route: str,
        action: str,
        path: str,
        decision: str,
        status: int,
        seconds: float,
    ) -> None:
        line = _encoder.encode(
            AuditLine(self._clock.now(), caller, route, action, path, decision, status, round(seconds * 1000, 3))
        )
        with self._lock:
            if self._fd is not None:
                os.write(self._fd, line + b"\n")  # O_APPEND: one line, one write, never interleaved
            elif self._stream is not None:
                self._stream.write(line.decode() + "\n")
                self._stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            elif self._stream is not None:
                self._stream.close()
