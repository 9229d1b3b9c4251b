"""A server's start-up: the cyclic garbage collector waits until it listens.

Starting Nexus imports ~300 modules whose classes, functions and tables live as
long as the process.  With the collector on, those allocations set off ~80
collections during a Nexus start (~11 ms of its ~190 ms to listening), and they
found nothing to free.  So `spike nexus` and `spike keeper` start with the
collector off; once the server listens, everything allocated so far moves out
of the collector's sight for good (`gc.freeze`, which also keeps later full
collections from walking it) and collection resumes.  A server run some other
way (a test, an embedding) never paused it, and `listening()` leaves it alone.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


class _Pause:
    on = False  # collector_paused turned the collector off, and listening() has not turned it on yet


@contextlib.contextmanager
def collector_paused(pause: bool) -> Iterator[None]:
    """No cyclic garbage collection until `listening()` (reference counting frees as ever).

    A command that ends before it listens (a configuration error, --check-config) gets
    the collector back as it found it.
    """
    _Pause.on = pause and gc.isenabled()
    if _Pause.on:
        gc.disable()
    try:
        yield
    finally:
        if _Pause.on:
            _Pause.on = False
            gc.enable()


def listening() -> None:
    """The server listens: what start-up allocated is permanent; the collector runs again."""
    if _Pause.on:
        _Pause.on = False
        gc.freeze()
        gc.enable()
