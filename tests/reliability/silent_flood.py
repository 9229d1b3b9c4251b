"""A flood of silent TCP connections, in a process of its own (run by the reliability tests).

    python silent_flood.py --stats FILE --rate 400 keeper-1=127.0.0.1:PORT:256 nexus=127.0.0.1:PORT:2048

For every target it keeps up to HOLD connections open that never send a byte:
whenever the server closes one, another is opened in its place, as soon as
possible but no more than RATE new connections a second per target (so that
the flood cannot take the machine's CPU from the servers it floods).  A
refused connection (the server is down, restarting) is tried again later.
Every 0.2 s it writes its counts per target to FILE as JSON: connections
opened, closed by the server, refused, and held right now.  SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass, field


@dataclass
class Target:
    name: str
    host: str
    port: int
    hold: int
    opened: int = 0
    closed_by_server: int = 0
    refused: int = 0
    held: int = 0
    socks: set[socket.socket] = field(default_factory=set, repr=False)
    tokens: float = 0.0
    refused_until: float = 0.0


def parse_target(text: str) -> Target:
    name, _, rest = text.partition("=")
    host, port, hold = rest.rsplit(":", 2)
    return Target(name, host, int(port), int(hold))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stats", required=True)
    parser.add_argument("--rate", type=float, default=400.0, help="new connections a second per target, at most")
    parser.add_argument("targets", nargs="+", type=parse_target, metavar="NAME=HOST:PORT:HOLD")
    args = parser.parse_args()
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    selector = selectors.DefaultSelector()
    targets: list[Target] = args.targets
    burst = max(1.0, args.rate / 20)
    last = time.monotonic()
    next_stats = 0.0
    while not stop:
        now = time.monotonic()
        for target in targets:
            target.tokens = min(burst, target.tokens + (now - last) * args.rate)
        last = now
        for target in targets:
            if now < target.refused_until:
                continue
            while len(target.socks) < target.hold and target.tokens >= 1:
                target.tokens -= 1
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                code = sock.connect_ex((target.host, target.port))
                if code not in (0, errno.EINPROGRESS):
                    sock.close()
                    target.refused += 1
                    target.refused_until = now + 0.05
                    break
                target.opened += 1
                target.socks.add(sock)
                selector.register(sock, selectors.EVENT_READ, target)
        for key, _ in selector.select(timeout=0.002):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            owner: Target = key.data
            try:
                data = sock.recv(1)
            except BlockingIOError:
                continue
            except OSError as exc:
                data = b""
                if exc.errno == errno.ECONNREFUSED:
                    owner.refused += 1
                    owner.opened -= 1
                    owner.closed_by_server -= 1
            if data:
                continue  # a server never says anything first; ignore it
            selector.unregister(sock)
            sock.close()
            owner.socks.discard(sock)
            owner.closed_by_server += 1
        if now >= next_stats:
            next_stats = now + 0.2
            for target in targets:
                target.held = len(target.socks)
            counts = {
                t.name: {
                    "opened": t.opened,
                    "closed_by_server": t.closed_by_server,
                    "refused": t.refused,
                    "held": t.held,
                }
                for t in targets
            }
            tmp = f"{args.stats}.tmp"
            with open(tmp, "w") as out:
                json.dump(counts, out)
            os.replace(tmp, args.stats)
    for target in targets:
        for sock in target.socks:
            with contextlib.suppress(OSError):
                sock.close()


if __name__ == "__main__":
    main()
