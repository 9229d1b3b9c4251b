"""Running servers until a signal: the event loop's entry points for the app.

`serve` binds the listener, announces the real address, runs the server and
any background tasks (the custody driver, housekeeping) in one task group,
and returns cleanly on SIGTERM or SIGINT.  In-flight requests get a short
grace period; the caller wipes key material after it returns.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from .server import HttpsServer

log = logging.getLogger("spike.transports.runner")

Background = Callable[[], Coroutine[Any, Any, None]]


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


async def serve(
    bind: tuple[str, int],
    server: HttpsServer,
    *,
    background: Sequence[Background] = (),
    periodic: Callable[[], None] | None = None,
    on_listening: Callable[[str, int], None] = lambda host, port: None,
) -> None:
    listener = await _open_listener(*bind)
    on_listening(bind[0], _bound_port(listener))
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signal, tg.cancel_scope)
        for task in background:
            tg.start_soon(task)
        if periodic is not None:
            tg.start_soon(_every_second, periodic)
        await server.serve(listener)


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: shutting down", signal.Signals(signum).name)
            scope.cancel()
            return


async def _every_second(callback: Callable[[], None]) -> None:
    while True:
        await anyio.sleep(1)
        callback()
