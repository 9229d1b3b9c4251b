"""The audit log (SPIKE's ADR-0027): one JSON line per API call, apart from operational logs.

Each line says who (the caller's SPIFFE ID), what (route, action, secret
path), the decision (allowed or denied), the HTTP status and how long it
took.  It never holds a value, a shard or a key: the secret path is the only
thing read from a request body, by a decoder that ignores every other field.
Lines are appended to a 0600 file and flushed one by one; writes from the
event loop and the storage writer thread are serialised by a lock.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
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


class AuditLog:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    @classmethod
    def to_file(cls, path: Path) -> AuditLog:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return cls(os.fdopen(fd, "a", encoding="utf-8", buffering=1))

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
        line = json.dumps(
            {
                "ts": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                "caller": caller,
                "route": route,
                "action": action,
                "path": path,
                "decision": decision,
                "status": status,
                "duration_ms": round(seconds * 1000, 3),
            }
        )
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()

    def close(self) -> None:
        with self._lock:
            self._stream.close()
