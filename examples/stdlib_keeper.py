#!/usr/bin/env python3
"""A keeper served with `http.server` + `ssl` around the sans-IO `Keeper` machine.

    python examples/stdlib_keeper.py --identity ./id --trust-domain spike.test --keeper-id 3 --listen 127.0.0.1:8443

It answers the same two requests as `spike keeper` (docs/design.md section 3),
with the same rules, because the rules are the machine's: the server only
moves bytes, puts the peer's SPIFFE ID on the request, and enforces the body
limit.  Each connection gets a thread (`ThreadingHTTPServer`); the machine is
not thread-safe, so every call goes through one lock.  The shard lives in the
machine's memory only and is overwritten on exit (SIGINT / SIGTERM).
"""

from __future__ import annotations

import argparse
import signal
import socket
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from spike.protocol import (
    MAX_KEEPER_BODY,
    ApiRequest,
    ApiResponse,
    ErrorCode,
    Keeper,
    KeeperChange,
    TrustBundles,
    TrustDomains,
    peer_spiffe_id,
)

HANDSHAKE_TIMEOUT = 5.0
IDLE_TIMEOUT = 30.0


class KeeperServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext, keeper: Keeper) -> None:
        super().__init__(address, KeeperRequestHandler)
        self.context = context
        self.keeper = keeper
        self.lock = threading.Lock()  # one caller at a time in the machine

    def get_request(self) -> tuple[socket.socket, Any]:
        # The handshake runs in the connection's own thread (finish_request), so a
        # slow client cannot hold up accept().
        sock, address = self.socket.accept()
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def finish_request(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        assert isinstance(request, ssl.SSLSocket)
        request.settimeout(HANDSHAKE_TIMEOUT)
        request.do_handshake()  # a client without a valid SVID fails here
        request.settimeout(IDLE_TIMEOUT)
        super().finish_request(request, client_address)

    def handle_error(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        print(f"connection from {client_address[0]} failed: {sys.exc_info()[1]!r}", flush=True)

    def answer(self, request: ApiRequest) -> ApiResponse:
        with self.lock:
            outcome = self.keeper.handle(request)
        if outcome.change is not KeeperChange.NONE:
            print(f"shard {outcome.change.value} (from {request.peer})", flush=True)
        if outcome.refused:
            print(f"refused {request.path} from {request.peer or 'a peer without SPIFFE ID'}", flush=True)
        return outcome.response


class KeeperRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: Nexus polls over one connection
    server: KeeperServer

    def do_POST(self) -> None:
        length = self.headers.get("Content-Length", "0")  # no Content-Length: no body
        if "Transfer-Encoding" in self.headers or not length.isdigit() or int(length) > MAX_KEEPER_BODY:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            status = 413 if length.isdigit() and int(length) > MAX_KEEPER_BODY else 400
            self.reply(ApiResponse.error(status, ErrorCode.BAD_REQUEST))
            return
        assert isinstance(self.connection, ssl.SSLSocket)
        path, _, query = self.path.partition("?")
        request = ApiRequest(
            method=self.command,
            path=path,
            peer=peer_spiffe_id(self.connection.getpeercert()),  # verified by the handshake
            body=self.rfile.read(int(length)),
            query=query,
            content_type=self.headers.get("Content-Type", ""),
        )
        self.reply(self.server.answer(request))

    do_GET = do_PUT = do_DELETE = do_POST  # the machine answers 405 (or 404) itself

    def reply(self, response: ApiResponse) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the server logs what the machine decided, not every request line


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


def server_context(identity: Path, keeper_id: int, trust_domain: str) -> ssl.SSLContext:
    """mTLS as keeper `keeper_id`: our SVID, our trust domain's CAs, and a client certificate required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(identity / f"keeper-{keeper_id}.pem", identity / f"keeper-{keeper_id}-key.pem")
    context.load_verify_locations(cadata=trusted_cas(identity / "bundle.pem", trust_domain))
    return context


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--identity", type=Path, required=True, help="directory written by `spike dev-identity`")
    parser.add_argument("--trust-domain", default="spike.ist")
    parser.add_argument("--keeper-id", type=int, required=True)
    parser.add_argument("--listen", default="127.0.0.1:8443", metavar="HOST:PORT")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")

    keeper = Keeper(TrustDomains.single(args.trust_domain))
    server = KeeperServer((host, int(port)), server_context(args.identity, args.keeper_id, args.trust_domain), keeper)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (`cmd &`)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"keeper {args.keeper_id} listening on {host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        with server.lock:
            keeper.forget()  # overwrite the shard
    print("keeper stopped; its shard is gone from memory", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
