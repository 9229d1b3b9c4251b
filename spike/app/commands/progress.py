"""A progress line for commands that wait: on a terminal only, on stderr, gone when done.

What `gh` and `docker` do: a person at a terminal sees what a command waits
for (Nexus to answer, the keepers to take their shards, the key to be
rebuilt) on one line that is rewritten in place and erased at the end, so
the command's own output is left as it would be without it.  Standard output
is never touched, and when stderr is not a terminal (a script, a log, CI)
nothing is written at all: what a script reads does not depend on how long
something took.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

_ERASE = "\r\x1b[K"  # carriage return, then erase to the end of the line


class Progress:
    """One live line on `stream` (stderr) while it is a terminal; nothing otherwise."""

    def __init__(self, prefix: str, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._prefix = prefix
        self._stream = sys.stderr if stream is None else stream
        self._clock = clock
        self._started = clock()
        self._shown = False
        try:
            self._live = self._stream.isatty()
        except (AttributeError, ValueError):  # a closed or unusual stream: say nothing
            self._live = False

    def __call__(self, text: str) -> None:
        """Show `text` as what is being waited for now, with the time waited so far."""
        if not self._live:
            return
        waited = self._clock() - self._started
        self._write(f"{_ERASE}{self._prefix}: {text} ({waited:.0f}s)")
        self._shown = True

    def done(self) -> None:
        """Erase the line (call it before printing a result or an error)."""
        if self._shown:
            self._write(_ERASE)
            self._shown = False

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            self._live = False


def silent(text: str) -> None:
    """A progress callback that shows nothing (library callers, `spike dev`'s own children)."""
