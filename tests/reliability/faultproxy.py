"""A TCP fault proxy for the reliability tests: put it between Nexus and a keeper and break the path.

Nexus is pointed at the proxy's port (``SPIKE_NEXUS_KEEPER_PEERS``); the
proxy forwards bytes to the keeper's real port.  It never looks inside: mTLS
runs end to end between Nexus and the keeper, so the keeper's SVID (with its
keeper ID) is what Nexus checks, as without the proxy.

Modes (`FaultProxy.set_mode`), for new connections and for those already open:

``pass``       bytes flow both ways.
``drop``       new connections are reset at once (RST); open ones keep flowing.
``delay``      every chunk is held `delay` seconds before it is forwarded, in order.
``blackhole``  new connections are accepted and never forwarded (what arrives is
               read and thrown away, nothing ever comes back); open connections
               stop forwarding and hold their bytes, like a network partition.
               Back to ``pass``, held bytes flow again and the never-forwarded
               connections are reset.

`cut()` resets every open connection, whatever the mode.

All proxies of a `ProxyLoop` run on one asyncio event loop in a daemon
thread; the methods here are called from any thread.  `FaultSchedule` draws
faults from a seeded `random.Random`, so a run can be replayed by its seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

MODES = ("pass", "drop", "delay", "blackhole")
_CHUNK = 65536


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST rather than a FIN: what a cut cable or a crashed middlebox looks like."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class ProxyLoop:
    """An asyncio event loop in a daemon thread, hosting any number of proxies."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def soon(self, func: Callable[[], Any]) -> None:
        self.loop.call_soon_threadsafe(func)

    def close(self) -> None:
        if self.loop.is_closed():
            return

        async def stop_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.call(stop_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


@dataclass
class ProxyCounts:
    accepted: int = 0
    forwarded: int = 0  # connections that reached the target
    dropped: int = 0  # reset at accept (drop mode)
    blackholed: int = 0  # accepted and never forwarded
    cut: int = 0  # open connections reset by cut()
    upstream_failed: int = 0  # the target refused (a keeper that is down)
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass(eq=False)
class _Pipe:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def reset(self) -> None:
        for task in self.tasks:
            task.cancel()
        _reset(self.client)
        if self.upstream is not None:
            _reset(self.upstream)


class FaultProxy:
    """One listening port on 127.0.0.1 forwarding to ``127.0.0.1:target_port``, with faults on demand."""

    def __init__(self, host: ProxyLoop, target_port: int, *, port: int = 0, name: str = "") -> None:
        self._host = host
        self.target_port = target_port
        self.name = name or f"proxy->{target_port}"
        self.mode = "pass"
        self.delay = 0.0
        self.counts = ProxyCounts()
        self._pipes: set[_Pipe] = set()
        self._holes: set[_Pipe] = set()  # blackholed connections, never forwarded
        self._flowing = asyncio.Event()  # set unless blackholed
        self._server: asyncio.Server | None = None
        self.port = host.call(self._start(port))

    async def _start(self, port: int) -> int:
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port, reuse_address=True)
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ control (any thread)

    def set_mode(self, mode: str, delay: float = 0.0) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown proxy mode {mode!r}")
        self._host.call(self._set_mode(mode, delay))

    async def _set_mode(self, mode: str, delay: float) -> None:
        self.mode, self.delay = mode, (delay if mode == "delay" else 0.0)
        if mode == "blackhole":
            self._flowing.clear()
        else:
            self._flowing.set()
            holes, self._holes = self._holes, set()
            for hole in holes:
                hole.reset()

    def heal(self) -> None:
        self.set_mode("pass")

    def cut(self) -> int:
        """Reset every open connection; returns how many there were."""
        return self._host.call(self._cut())

    async def _cut(self) -> int:
        pipes = list(self._pipes | self._holes)
        self._pipes.clear()
        self._holes.clear()
        for pipe in pipes:
            pipe.reset()
        self.counts.cut += len(pipes)
        return len(pipes)

    @property
    def open_connections(self) -> int:
        return len(self._pipes) + len(self._holes)

    def close(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            await self._cut()

        with contextlib.suppress(Exception):
            self._host.call(close())

    # ------------------------------------------------------------------ the proxy itself (loop thread)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counts.accepted += 1
        if self.mode == "drop":
            self.counts.dropped += 1
            _reset(writer)
            return
        pipe = _Pipe(writer)
        if self.mode == "blackhole":
            self.counts.blackholed += 1
            self._holes.add(pipe)
            try:
                while await reader.read(_CHUNK):
                    pass  # swallowed
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                self._holes.discard(pipe)
                with contextlib.suppress(Exception):
                    writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            self.counts.upstream_failed += 1
            _reset(writer)  # as the target itself would: nothing listens
            return
        self.counts.forwarded += 1
        pipe.upstream = up_writer
        self._pipes.add(pipe)
        pipe.tasks = [
            asyncio.current_task(),  # type: ignore[list-item]
        ]
        down = asyncio.ensure_future(self._flow(up_reader, writer, up=False))
        pipe.tasks.append(down)
        try:
            await self._flow(reader, up_writer, up=True)
            await down
        except asyncio.CancelledError:
            pass
        finally:
            self._pipes.discard(pipe)
            for one in (writer, up_writer):
                with contextlib.suppress(Exception):
                    one.close()

    async def _flow(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, up: bool) -> None:
        try:
            while True:
                data = await source.read(_CHUNK)
                await self._flowing.wait()  # a partition holds the bytes until it heals
                if self.delay > 0:
                    await asyncio.sleep(self.delay)
                if not data:
                    if sink.can_write_eof():
                        sink.write_eof()
                    return
                if up:
                    self.counts.bytes_up += len(data)
                else:
                    self.counts.bytes_down += len(data)
                sink.write(data)
                await sink.drain()
        except (OSError, ConnectionError):
            # One side is gone: the other goes too, abruptly, as through a real middlebox.
            _reset(sink)


# ---------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class Fault:
    """One fault on one proxy: `mode` (or "cut") for `duration` seconds (0 for a cut)."""

    target: int
    mode: str
    duration: float
    delay: float = 0.0


class FaultSchedule:
    """Draws proxy faults from a seeded random source: which path, which fault, how long."""

    def __init__(self, rng: random.Random, targets: list[int], *, longest: float = 3.0, max_delay: float = 0.6) -> None:
        self._rng = rng
        self._targets = targets
        self._longest = longest
        self._max_delay = max_delay

    def next(self) -> Fault:
        rng = self._rng
        target = rng.choice(self._targets)
        mode = rng.choice(["drop", "delay", "blackhole", "cut"])
        if mode == "cut":
            return Fault(target, "cut", 0.0)
        duration = rng.uniform(0.3, self._longest)
        delay = rng.uniform(0.02, self._max_delay) if mode == "delay" else 0.0
        return Fault(target, mode, duration, delay)
