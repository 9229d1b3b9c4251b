"""The audit log (SPIKE's ADR-0027): one JSON line per API call, apart from operational logs.

Each line says who (the caller's SPIFFE ID), what (route, action, secret
path), the decision (allowed or denied), the HTTP status and how long it
took.  It never holds a value, a shard or a key: the secret path is the only
thing read from a request body, by a decoder that ignores every other field.
Lines are appended to a 0600 file and flushed one by one; writes from the
event loop and the storage writer thread are serialised by a lock.

A line is written after its call has been answered (it holds the status and
the duration), so it cannot hold the call back: when the file cannot be
written (a full disk, a read-only data dir) calls are still answered, the
failure is logged once, and how many lines were lost is logged when writing
works again.  (Before, every audited read and status call became a 500 with a
traceback while the disk was full, and writes were acknowledged regardless.)
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TextIO

import msgspec

from spike.app.store.errors import StorageError

log = logging.getLogger("spike.nexus.audit")


class _PathOnly(msgspec.Struct):
    path: str = ""


_path_decoder = msgspec.json.Decoder(_PathOnly)


def secret_path_of(body: bytes, content_type: str) -> str:
    """The ``path`` field of a JSON body, or "" (raw bodies and garbage have none)."""
    if content_type == "application/octet-stream" or not body:
        return ""
    try:
        return _path_decoder.decode(body).path[:512]
    except (msgspec.DecodeError, UnicodeDecodeError):  # msgspec's error for a path that is not UTF-8
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

    def __init__(self, stream: TextIO | None = None, *, fd: int | None = None, name: str = "") -> None:
        self._stream = stream
        self._fd = fd
        self._name = name or "the audit log"
        self._lock = threading.Lock()
        self._clock = _Clock()
        self.lost = 0  # lines that could not be written since the last one that could
        self._torn = False  # a short write left part of a line: the next line starts on a new one

    @classmethod
    def to_file(cls, path: Path) -> AuditLog:
        """Open (or create, 0600) `path` for appending; raises `StorageError` if it cannot be."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            # A start-up error like an unusable data dir: one line and exit code 2, not a traceback.
            raise StorageError(f"cannot open the audit log {path}: {exc.strerror or exc}") from None
        return cls(fd=fd, name=str(path))

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
            try:
                self._write(line + b"\n")
            except OSError as exc:
                if not self.lost:
                    log.error(  # noqa: TRY400 - the cause in one line; a traceback says nothing more
                        "cannot write %s (%s): calls are still answered, their audit lines are lost until it can be",
                        self._name,
                        exc.strerror or exc,
                    )
                self.lost += 1
                return
            if self.lost:
                log.warning("%s is written again; %d line(s) could not be written before", self._name, self.lost)
                self.lost = 0

    def _write(self, data: bytes) -> None:
        if self._fd is not None:
            if self._torn:
                data = b"\n" + data
            # O_APPEND: one line, one write, never interleaved
            if os.write(self._fd, data) < len(data):
                self._torn = True
                raise OSError("short write: the disk is probably full")
            self._torn = False
        elif self._stream is not None:
            self._stream.write(data.decode())
            self._stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            elif self._stream is not None:
                self._stream.close()
