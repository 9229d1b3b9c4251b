#!/usr/bin/env python3
"""Keep `spike keeper` processes seeded with plain asyncio and `spike.protocol`.

    python examples/asyncio_driver.py --identity ./id --trust-domain spike.test \\
        1=https://127.0.0.1:8441 2=https://127.0.0.1:8442 3=https://127.0.0.1:8443

The same job as ``stdlib_driver.py`` (make or read a root key, keep every
keeper seeded, stop after ``--duration`` seconds or on SIGINT / SIGTERM), on
one event loop instead of threads:

* The `drive` coroutine owns the machine: answers and timer ticks in, effects out.
* One task per keeper owns its keep-alive mTLS connection
  (`asyncio.open_connection`, with HTTP/1.1 written by hand) and performs its
  `SendRequest` effects in order, each inside ``asyncio.timeout_at(deadline)``.
* The machine's clock is ``loop.time()``, which is also what ``timeout_at`` uses.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import signal
import ssl
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from spike.protocol import (
    Answer,
    FailureKind,
    KeeperMisbehaved,
    KeeperReseeded,
    KeeperStateChanged,
    KeyRecovered,
    NewerKeySeen,
    NexusCustody,
    PhaseChanged,
    PollSchedule,
    RequestFailed,
    ResponseReceived,
    Role,
    RootKey,
    SendRequest,
    SpiffeId,
    TrustBundles,
    TrustDomains,
    peer_spiffe_id,
    seal_key,
)

MAX_RESPONSE_BYTES = 64 * 1024
MAX_HEADERS = 64
started = time.monotonic()


def say(message: str) -> None:
    print(f"{time.monotonic() - started:8.3f} {message}", flush=True)


# ---------------------------------------------------------------- one keeper's connection


class BadResponse(Exception):
    """The keeper's bytes are not an HTTP/1.1 response this client understands."""


class WrongPeer(ConnectionError):
    """The TLS peer is not the keeper this connection is for."""


class KeeperConnection:
    """A keep-alive HTTPS connection that talks only to the peer with SPIFFE ID `expected`."""

    def __init__(self, url: str, context: ssl.SSLContext, expected: SpiffeId) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"not an https URL: {url}")
        self.host, self.port = parts.hostname, parts.port or 443
        self.context = context
        self.expected = expected
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """POST and read the answer; cancel it (a timeout) and the connection is closed.

        Keeper requests are idempotent, so a kept-alive connection that turns out
        to be dead (the keeper restarted) is retried once on a fresh connection.
        """
        try:
            if self.streams is not None:
                try:
                    return await self._exchange(path, body)
                except (OSError, asyncio.IncompleteReadError):
                    self.close()
            await self._connect()
            return await self._exchange(path, body)
        except BaseException:
            self.close()  # half an exchange (or a timeout) leaves the connection unusable
            raise

    async def _connect(self) -> None:
        reader, writer = await asyncio.open_connection(
            self.host, self.port, ssl=self.context, server_hostname=self.host
        )
        peer = peer_spiffe_id(writer.get_extra_info("peercert"))
        if peer != self.expected:  # checked before anything is sent: a push carries a shard
            writer.close()
            raise WrongPeer(f"peer is {peer or 'without SPIFFE ID'}, expected {self.expected}")
        self.streams = reader, writer

    async def _exchange(self, path: str, body: bytes) -> tuple[int, bytes]:
        assert self.streams is not None
        reader, writer = self.streams
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode("ascii") + body)
        await writer.drain()
        version, _, rest = (await reader.readuntil(b"\r\n")).decode("latin-1").partition(" ")
        status = rest[:3]
        if not version.startswith("HTTP/1.") or not status.isdigit():
            raise BadResponse("malformed status line")
        headers: dict[str, str] = {}
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon or len(headers) >= MAX_HEADERS:
                raise BadResponse("malformed headers")
            headers[name.strip().lower()] = value.strip()
        # A keeper always sends a Content-Length; anything else is not worth parsing here.
        length = headers.get("content-length", "")
        if "transfer-encoding" in headers or not length.isdigit() or int(length) > MAX_RESPONSE_BYTES:
            raise BadResponse("missing, chunked or too large body")
        data = await reader.readexactly(int(length))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return int(status), data

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


async def perform(connection: KeeperConnection, request: SendRequest) -> Answer:
    """Do one `SendRequest`; every outcome becomes exactly one answer for the machine.

    This is the one place where exceptions become a `FailureKind`: the machine decides on it.
    """
    try:
        async with asyncio.timeout_at(request.deadline):
            status, body = await connection.post(request.path, request.body)
    except TimeoutError:
        return RequestFailed(request.request_id, "timed out", FailureKind.TIMEOUT)
    except ssl.SSLError as exc:
        return RequestFailed(request.request_id, f"TLS: {exc.reason or type(exc).__name__}", FailureKind.TLS)
    except WrongPeer as exc:
        return RequestFailed(request.request_id, str(exc), FailureKind.PEER_IDENTITY)
    except ConnectionRefusedError:
        return RequestFailed(request.request_id, "connection refused", FailureKind.REFUSED)
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        return RequestFailed(request.request_id, str(exc) or type(exc).__name__, FailureKind.CLOSED)
    except (asyncio.LimitOverrunError, BadResponse) as exc:
        return RequestFailed(request.request_id, str(exc) or type(exc).__name__, FailureKind.BAD_HTTP)
    except OSError as exc:
        return RequestFailed(request.request_id, str(exc) or type(exc).__name__, FailureKind.UNREACHABLE)
    return ResponseReceived(request.request_id, status, body)


async def worker(
    connection: KeeperConnection, requests: asyncio.Queue[SendRequest], answers: asyncio.Queue[Answer | None]
) -> None:
    try:
        while True:
            request = await requests.get()
            answers.put_nowait(await perform(connection, request))
    finally:
        connection.close()


# ---------------------------------------------------------------- the coroutine that owns the machine


def describe(report: object) -> str:
    """One log line per report.  Reports never carry key or shard bytes; unknown ones are just shown."""
    if isinstance(report, KeeperStateChanged):
        why = f" ({report.detail})" if report.detail else ""
        return f"keeper {report.keeper_id}: {report.previous.value} -> {report.state.value}{why}"
    if isinstance(report, KeeperReseeded):
        return f"keeper {report.keeper_id} re-seeded (was {report.was.value})"
    if isinstance(report, KeeperMisbehaved):
        return f"keeper {report.keeper_id} misbehaved: {report.problem}"
    if isinstance(report, PhaseChanged):
        return f"phase {report.previous.value} -> {report.phase.value}"
    if isinstance(report, KeyRecovered):
        return f"root key of epoch {report.epoch} in use (shards of keepers {list(report.keeper_ids)})"
    return repr(report)


async def drive(
    custody: NexusCustody,
    requests: dict[int, asyncio.Queue[SendRequest]],
    answers: asyncio.Queue[Answer | None],
    until: float,
) -> None:
    """Effects out, answers and time in, until `until` or a None on `answers` (a signal)."""
    loop = asyncio.get_running_loop()
    while True:
        while effects := custody.effects():
            for effect in effects:
                if isinstance(effect, SendRequest):
                    requests[effect.keeper_id].put_nowait(effect)  # the only effect that must be performed
                    continue
                say(describe(effect))
                if isinstance(effect, NewerKeySeen):
                    # This program made the key record and nobody else writes it: a newer epoch is garbage.
                    custody.confirm_record(effect.at, loop.time())  # its effects are taken on the next round
        wake_at = min(custody.next_deadline(), until)
        if loop.time() >= until:
            return
        answer: Answer | None = None
        try:
            async with asyncio.timeout_at(None if math.isinf(wake_at) else wake_at):
                answer = await answers.get()
            if answer is None:
                say("interrupted")
                return
        except TimeoutError:
            pass
        now = loop.time()
        if answer is not None:
            custody.receive(answer, now)
        custody.handle_timer(now)  # cheap when nothing is due


# ---------------------------------------------------------------- set-up


def trusted_cas(bundle: Path, trust_domain: str) -> bytes:
    """The CA certificates (DER) of `bundle` that serve `trust_domain`, and only those.

    A bundle file may hold other trust domains' CAs too, each naming its own domain in
    a spiffe:// URI SAN; trusting them as well would let them mint this domain's
    SPIFFE IDs.  One trust domain, one set of CAs: TLS itself then holds every peer to
    its bundle (docs/embedding.md, "Trust per domain").
    """
    scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    scratch.load_verify_locations(bundle)
    cas = list(zip(scratch.get_ca_certs(), scratch.get_ca_certs(binary_form=True), strict=True))
    return b"".join(sorted(TrustBundles.labelled(trust_domain, cas).authorities(trust_domain)))


def client_context(identity: Path, trust_domain: str) -> ssl.SSLContext:
    """mTLS as Nexus: our SVID, our trust domain's CAs, no host names (the SPIFFE ID is checked instead)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server's chain by default
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.load_cert_chain(identity / "nexus.pem", identity / "nexus-key.pem")
    context.load_verify_locations(cadata=trusted_cas(identity / "bundle.pem", trust_domain))
    return context


def keeper_arg(text: str) -> tuple[int, str]:
    keeper_id, _, url = text.partition("=")
    if not keeper_id.isdigit() or not url:
        raise argparse.ArgumentTypeError(f"expected ID=https://host:port, not {text!r}")
    return int(keeper_id), url


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("keepers", nargs="+", type=keeper_arg, metavar="ID=URL")
    parser.add_argument("--identity", type=Path, required=True, help="directory written by `spike dev-identity`")
    parser.add_argument("--trust-domain", default="spike.ist")
    parser.add_argument("--threshold", type=int, default=2)
    parser.add_argument("--epoch", type=int, default=1)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between polls of one keeper")
    parser.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: never)")
    parser.add_argument("--key-stdin", action="store_true", help="read the root key as 64 hex digits from stdin")
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    keepers: dict[int, str] = dict(args.keepers)
    trust = TrustDomains.single(args.trust_domain)
    context = client_context(args.identity, args.trust_domain)
    # Randomness is the caller's: os.urandom for the key, random.Random for the poll jitter.
    key = RootKey(bytes.fromhex(sys.stdin.readline().strip())) if args.key_stdin else RootKey.generate(os.urandom)
    record, shares = seal_key(key, epoch=args.epoch, threshold=args.threshold, keeper_ids=list(keepers))
    schedule = PollSchedule(interval=args.interval, request_timeout=min(2.0, args.interval))
    jitter = random.Random()  # noqa: S311 - spreads polls over time, guards no secret
    custody = NexusCustody(
        keepers, threshold=args.threshold, schedule=schedule, rng=jitter, now=loop.time(), record=record
    )
    custody.handle_timer(loop.time())  # the first round of polls is due at once
    # We hold the key, so we hand the machine `threshold` of its shares, as an
    # operator's restore would: it is READY at once and seeds whoever lacks a shard.
    for share in list(shares.values())[: args.threshold]:
        custody.submit_shard(share, loop.time())
    key.wipe()
    del shares

    answers: asyncio.Queue[Answer | None] = asyncio.Queue()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, answers.put_nowait, None)
    requests = {keeper_id: asyncio.Queue[SendRequest]() for keeper_id in keepers}
    workers = [
        asyncio.create_task(
            worker(KeeperConnection(url, context, trust.id_of(Role.KEEPER, kid)), requests[kid], answers)
        )
        for kid, url in keepers.items()
    ]
    until = loop.time() + args.duration if args.duration > 0 else math.inf
    say(f"keeping keepers {sorted(keepers)} seeded ({args.threshold}-of-{len(keepers)}, epoch {args.epoch})")
    try:
        await drive(custody, requests, answers, until)
    finally:
        custody.forget(loop.time())  # overwrite the key in memory
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    say("stopped")


def main(argv: list[str] | None = None) -> int:
    asyncio.run(amain(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
