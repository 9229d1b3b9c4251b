"""Running servers until a signal: the event loop's entry points for the app.

`serve` binds the listener, announces the real address, runs the server and
any background tasks (the custody driver, housekeeping) in one task group,
and returns cleanly on SIGTERM or SIGINT.  In-flight requests get a short
grace period; the caller wipes key material after it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
from collections.abc import Callable, Coroutine, Sequence
from functools import partial
from typing import Any

import anyio
import anyio.abc
import msgspec
from anyio.abc import SocketAttribute

from .event_loop import backend_options
from .server import HttpsServer

log = logging.getLogger("spike.transports.runner")

Background = Callable[[], Coroutine[Any, Any, None]]


def run_event_loop(main: Callable[[], Coroutine[Any, Any, None]], *, fast: bool = True) -> None:
    """Run a server's main coroutine on the asyncio backend.

    `fast` (Nexus, the CLI) takes uvloop if it is installed; a keeper answers a
    few requests a second and is better off without its 1.5 MiB.
    """
    anyio.run(main, backend="asyncio", backend_options=backend_options() if fast else {})


class BindError(Exception):
    """The listen address cannot be bound (in use, not permitted, not local)."""


async def _open_listener(host: str, port: int) -> anyio.abc.Listener[anyio.abc.SocketStream]:
    try:
        return await anyio.create_tcp_listener(local_host=host, local_port=port, reuse_port=False)
    except OSError as exc:
        raise BindError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _bound_port(listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> int:
    inner = getattr(listener, "listeners", [listener])[0]
    return int(inner.extra(SocketAttribute.local_port))


class Listener(msgspec.Struct, frozen=True):
    """One more server to run beside the main one (e.g. the metrics listener)."""

    bind: tuple[str, int]
    server: HttpsServer
    on_listening: Callable[[str, int], None] = lambda host, port: None


async def serve(
    bind: tuple[str, int],
    server: HttpsServer,
    *,
    background: Sequence[Background] = (),
    periodic: Callable[[], None] | None = None,
    on_listening: Callable[[str, int], None] = lambda host, port: None,
    extra: Sequence[Listener] = (),
    grace: float = 5.0,
) -> None:
    """Serve until SIGTERM/SIGINT; then drain: stop accepting, let requests under way
    finish for up to `grace` seconds, and stop.  A second signal stops at once; once
    stopped by a signal, further ones are ignored while the caller cleans up."""
    listener = await _open_listener(*bind)
    others = [(await _open_listener(*more.bind), more) for more in extra]
    on_listening(bind[0], _bound_port(listener))
    for opened, more in others:
        more.on_listening(more.bind[0], _bound_port(opened))
    async with anyio.create_task_group() as tg:
        servers = [server, *(more.server for _, more in others)]
        tg.start_soon(_stop_on_signal, servers, tg.cancel_scope)
        for task in background:
            tg.start_soon(task)
        if periodic is not None:
            tg.start_soon(_every_second, periodic)
        for opened, more in others:
            tg.start_soon(partial(more.server.serve, opened, grace=grace))
        await server.serve(listener, grace=grace)
        tg.cancel_scope.cancel()


class _StopSignals:
    """SIGTERM and SIGINT, caught with handlers of our own rather than the event loop's.

    An event loop gives its signal handlers back by restoring the *default* actions (kill;
    KeyboardInterrupt) until the caller can ignore the signals, and one more SIGTERM in that
    instant would kill the process in the middle of its cleanup.  Ours are replaced in one
    step: by "ignore" once a signal has arrived (the process is stopping: the caller wipes key
    material and finishes its last commit undisturbed), by the handlers found at the start if
    none did.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._send, self.received = anyio.create_memory_object_stream[int](math.inf)
        self._previous: dict[int, Any] = {}
        self._arrived = False

    def __enter__(self) -> _StopSignals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_IGN if self._arrived else previous)
        self._send.close()
        self.received.close()

    def _handle(self, signum: int, frame: object) -> None:
        # Python runs this on the main thread between two bytecodes, possibly in the middle of the
        # event loop's own code: the signal is handed over to the loop rather than acted on here.
        self._arrived = True
        self._loop.call_soon_threadsafe(self._deliver, signum)

    def _deliver(self, signum: int) -> None:
        with contextlib.suppress(anyio.ClosedResourceError):  # arrived as the server stopped
            self._send.send_nowait(signum)


async def _stop_on_signal(servers: Sequence[HttpsServer], scope: anyio.CancelScope) -> None:
    with _StopSignals() as signals:
        async for signum in signals.received:
            if servers[0].draining:
                log.info("received %s again: stopping now", signal.Signals(signum).name)
                scope.cancel()
                return
            log.info("received %s: finishing requests under way, then stopping", signal.Signals(signum).name)
            for server in servers:
                server.drain()


async def _every_second(callback: Callable[[], None]) -> None:
    while True:
        await anyio.sleep(1)
        callback()
