"""Operational logging: text or JSON lines on stderr.

What the custody machine's reports say is spike.app.nexus.report_log: every
command sets up logging here, and only Nexus needs the custody core's effects.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        import json  # here: text logs, the default, never need it (~2 ms of every start, issue 20)

        line: dict[str, object] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup(level: str, fmt: str, stream: object = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


_OWN_CODE = Path(__file__).resolve().parents[1]  # the `spike` package


def _is_own_code(filename: str) -> bool:
    """Whether a warning was attributed to spike's own code rather than a dependency's.

    A frozen executable names its modules by relative paths (``spike/app/cli.py``).
    """
    path = Path(filename)
    if not path.is_absolute():
        return path.parts[:1] == ("spike",)
    try:
        return path.resolve().is_relative_to(_OWN_CODE)
    except OSError:
        return False


def route_dependency_warnings() -> None:
    """Send warnings that third-party packages raise to the log at debug level.

    A dependency's deprecation notice (cryptography about DSA when `spiffe` is
    imported, say) is addressed to the people who maintain spike, not to an
    operator, and printed on stderr it would break spike's promise of one line
    for a start error. spike's own warnings are still shown as Python shows them.
    The log is set up later; a debug record sent before then is dropped.
    """
    shown = warnings.showwarning

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if _is_own_code(filename):
            shown(message, category, filename, lineno, file, line)
            return
        logging.getLogger("spike.dependencies").debug(
            "%s from %s:%d: %s", category.__name__, filename, lineno, message, extra={"event": "dependency_warning"}
        )

    warnings.showwarning = show


def wall_time(monotonic_at: float, now: Callable[[], float]) -> str:
    """ISO time of a moment given on the driver's monotonic clock."""
    moment = time.time() - (now() - monotonic_at)
    return dt.datetime.fromtimestamp(moment, dt.UTC).isoformat(timespec="seconds")
