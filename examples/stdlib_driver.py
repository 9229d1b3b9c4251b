#!/usr/bin/env python3
"""Keep `spike keeper` processes seeded with the standard library and `spike.protocol`, nothing else.

    spike dev-identity --dir ./id --trust-domain spike.test
    spike keeper --listen 127.0.0.1:8441 ...        # three of them, with keeper SVIDs 1, 2, 3
    python examples/stdlib_driver.py --identity ./id --trust-domain spike.test \\
        1=https://127.0.0.1:8441 2=https://127.0.0.1:8442 3=https://127.0.0.1:8443

It makes a root key (or reads one as hex from stdin with ``--key-stdin``),
hands it to a `NexusCustody` machine, and then does what Nexus does: polls
every keeper forever and re-seeds any keeper that comes back empty.  It
stops after ``--duration`` seconds, or on SIGINT / SIGTERM.

Shape of the driver (docs/embedding.md explains the contract):

* The main thread owns the machine.  It is the only thread that calls it, so
  no lock is needed: it feeds in answers and timer ticks, and takes effects out.
* One worker thread per keeper owns that keeper's keep-alive mTLS connection
  (`http.client`) and performs its `SendRequest` effects in order.  Workers
  never touch the machine; they put each `Answer` on a queue.
* Time is `time.monotonic()`, and only the main thread reads it for the machine.
"""

from __future__ import annotations

import argparse
import http.client
import os
import queue
import random
import signal
import ssl
import sys
import threading
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
clock = time.monotonic
started = clock()


def say(message: str) -> None:
    print(f"{clock() - started:8.3f} {message}", flush=True)


# ---------------------------------------------------------------- one keeper's connection


class WrongPeer(ConnectionError):
    """The server at a keeper's address is not that keeper: nothing is sent to it."""


class KeeperConnection(http.client.HTTPSConnection):
    """A keep-alive HTTPS connection that talks only to the peer with SPIFFE ID `expected`."""

    def __init__(self, url: str, context: ssl.SSLContext, expected: SpiffeId) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"not an https URL: {url}")
        super().__init__(parts.hostname, parts.port or 443, context=context)
        self.expected = expected

    def connect(self) -> None:
        # http.client (re)connects by itself whenever it needs to; every new
        # connection is checked here, before any request (a push carries a shard).
        super().connect()
        assert isinstance(self.sock, ssl.SSLSocket)
        peer = peer_spiffe_id(self.sock.getpeercert())
        if peer != self.expected:
            self.close()
            raise WrongPeer(f"peer is {peer or 'without SPIFFE ID'}, expected {self.expected}")

    def post(self, path: str, body: bytes, deadline: float) -> tuple[int, bytes]:
        """POST and read the answer, each socket operation bounded by the time left before `deadline`.

        Keeper requests are idempotent, so a kept-alive connection that turns out
        to be dead (the keeper restarted) is retried once on a fresh connection.
        """
        for attempt in (1, 2):
            reused = self.sock is not None
            self.timeout = max(deadline - clock(), 0.001)
            if self.sock is not None:
                self.sock.settimeout(self.timeout)
            try:
                self.request("POST", path, body, {"Content-Type": "application/json"})
                response = self.getresponse()
                data = response.read(MAX_RESPONSE_BYTES + 1)
            except BaseException as exc:
                self.close()  # whatever happened, this exchange is unusable
                retry = isinstance(exc, OSError | http.client.HTTPException) and not isinstance(exc, TimeoutError)
                if reused and attempt == 1 and retry and not isinstance(exc, WrongPeer):
                    continue
                raise
            if len(data) > MAX_RESPONSE_BYTES:
                self.close()
                raise http.client.HTTPException("response too large")
            return response.status, data
        raise AssertionError("unreachable")


def perform(connection: KeeperConnection, request: SendRequest) -> Answer:
    """Do one `SendRequest`; every outcome becomes exactly one answer for the machine.

    This is the one place where exceptions become a `FailureKind`: the machine decides on it.
    """
    if clock() >= request.deadline:
        return RequestFailed(request.request_id, "deadline passed before it could be sent", FailureKind.TIMEOUT)
    try:
        status, body = connection.post(request.path, request.body, request.deadline)
    except TimeoutError:
        return RequestFailed(request.request_id, "timed out", FailureKind.TIMEOUT)
    except ssl.SSLError as exc:
        return RequestFailed(request.request_id, f"TLS: {exc.reason or type(exc).__name__}", FailureKind.TLS)
    except WrongPeer as exc:
        return RequestFailed(request.request_id, str(exc), FailureKind.PEER_IDENTITY)
    except ConnectionRefusedError:
        return RequestFailed(request.request_id, "connection refused", FailureKind.REFUSED)
    except ConnectionError as exc:  # reset, or closed before an answer (http.client's RemoteDisconnected too)
        return RequestFailed(request.request_id, str(exc) or type(exc).__name__, FailureKind.CLOSED)
    except http.client.HTTPException as exc:
        return RequestFailed(request.request_id, str(exc) or type(exc).__name__, FailureKind.BAD_HTTP)
    except OSError as exc:
        return RequestFailed(request.request_id, str(exc) or type(exc).__name__, FailureKind.UNREACHABLE)
    return ResponseReceived(request.request_id, status, body)


def worker(
    connection: KeeperConnection, requests: queue.Queue[SendRequest | None], answers: queue.Queue[Answer]
) -> None:
    try:
        while (request := requests.get()) is not None:
            answers.put(perform(connection, request))
    finally:
        connection.close()


# ---------------------------------------------------------------- the loop that owns the machine


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


def drive(
    custody: NexusCustody,
    requests: dict[int, queue.Queue[SendRequest | None]],
    answers: queue.Queue[Answer],
    until: float,
) -> None:
    """Effects out, answers and time in, until `until` (or KeyboardInterrupt)."""
    while True:
        while effects := custody.effects():
            for effect in effects:
                if isinstance(effect, SendRequest):
                    requests[effect.keeper_id].put(effect)  # the only effect that must be performed
                    continue
                say(describe(effect))
                if isinstance(effect, NewerKeySeen):
                    # This program made the key record and nobody else writes it: a newer epoch is garbage.
                    custody.confirm_record(effect.at, clock())  # its effects are taken on the next round
        now = clock()
        if now >= until:
            return
        wait = min(custody.next_deadline(), until) - now
        try:
            answer: Answer | None = answers.get(timeout=min(max(wait, 0.0), 60.0))
        except queue.Empty:
            answer = None
        now = clock()
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keepers = dict(args.keepers)
    trust = TrustDomains.single(args.trust_domain)
    context = client_context(args.identity, args.trust_domain)
    # Randomness is the caller's: os.urandom for the key, random.Random for the poll jitter.
    key = RootKey(bytes.fromhex(sys.stdin.readline().strip())) if args.key_stdin else RootKey.generate(os.urandom)
    record, shares = seal_key(key, epoch=args.epoch, threshold=args.threshold, keeper_ids=list(keepers))
    schedule = PollSchedule(interval=args.interval, request_timeout=min(2.0, args.interval))
    jitter = random.Random()  # noqa: S311 - spreads polls over time, guards no secret
    custody = NexusCustody(keepers, threshold=args.threshold, schedule=schedule, rng=jitter, now=clock(), record=record)
    custody.handle_timer(clock())  # the first round of polls is due at once
    # We hold the key, so we hand the machine `threshold` of its shares, as an
    # operator's restore would: it is READY at once and seeds whoever lacks a shard.
    for share in list(shares.values())[: args.threshold]:
        custody.submit_shard(share, clock())
    key.wipe()
    del shares

    answers: queue.Queue[Answer] = queue.Queue()
    requests: dict[int, queue.Queue[SendRequest | None]] = {}
    threads: list[threading.Thread] = []
    for keeper_id, url in keepers.items():
        requests[keeper_id] = queue.Queue()
        connection = KeeperConnection(url, context, trust.id_of(Role.KEEPER, keeper_id))
        thread = threading.Thread(target=worker, args=(connection, requests[keeper_id], answers), daemon=True)
        thread.start()
        threads.append(thread)

    # SIGINT stops us even if we were started with it ignored (a shell's `cmd &` does that), and
    # SIGTERM does the same.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    until = clock() + args.duration if args.duration > 0 else float("inf")
    say(f"keeping keepers {sorted(keepers)} seeded ({args.threshold}-of-{len(keepers)}, epoch {args.epoch})")
    try:
        drive(custody, requests, answers, until)
    except KeyboardInterrupt:
        say("interrupted")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second ^C must not cut the clean-up short
        custody.forget(clock())  # overwrite the key in memory
        for pending in requests.values():
            pending.put(None)
        for thread in threads:
            thread.join(timeout=schedule.request_timeout)
    say("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
