"""Hostile input against both servers, keeper and Nexus: generated, mutated, huge, slow, many, and not TLS at all.

Three kinds of target, all on real TLS over loopback:

* in-process servers (this test's event loop in a helper thread): a keeper with
  small limits (short timeouts, so slow clients are judged in about a second)
  and the authorisation tier's whole deployment (three keepers and a READY
  Nexus), for the hypothesis-generated inputs and the slow clients;
* real `spike keeper` and `spike nexus` processes with their production limits,
  for the mutated requests, the abuse cases, the connection floods and TLS
  garbage, and to measure their memory (VmRSS from /proc) across the run.

Every input is judged by `fuzz_client.acceptable`: an answer must be 2xx, 4xx,
501 or 505; a 500, a malformed answer or a crash is a finding; closing the
connection without an answer is allowed.  After every batch the server must
still answer a well-formed request, and at the end no server log may hold a
traceback or a "handler failed".  The number of inputs tried is printed in the
run's summary.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import gc
import os
import random
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from anyio.from_thread import start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spike.app.api.messages import (
    BOOTSTRAP_INIT_PATH,
    BOOTSTRAP_VERIFY_PATH,
    CIPHER_DECRYPT_PATH,
    CIPHER_ENCRYPT_PATH,
    POLICY_PATH,
    RECOVER_PATH,
    RESTORE_PATH,
    SECRETS_METADATA_PATH,
    SECRETS_PATH,
    STATUS_PATH,
)
from spike.app.commands.devca import DevIdentity
from spike.app.keeper import KEEPER_LIMITS, KeeperHandler
from spike.app.nexus.server import NEXUS_LIMITS
from spike.protocol.identity import TrustDomains
from spike.protocol.keeper import Keeper
from spike.protocol.wire import KEEPER_CONTRIBUTE_PATH, KEEPER_SHARD_PATH
from spike.transports.event_loop import backend_options
from spike.transports.server import HttpsServer, ServerLimits
from spike.transports.tls import server_context
from tests.authz.deployment import Deployment, running
from tests.reliability.fuzz_client import RawClient, acceptable, chunked, json_bytes, mutate, request
from tests.reliability.reliability_rig import REPORT, LeakWatch, ProxiedCluster, ready_cluster, rss_kib
from tests.transport.transport_rig import client_hello, raw_client_context

pytestmark = pytest.mark.e2e

SMALL = ServerLimits(
    max_header_bytes=KEEPER_LIMITS.max_header_bytes,
    max_body_bytes=KEEPER_LIMITS.max_body_bytes,
    handshake_timeout=1.0,
    request_timeout=1.0,
    idle_timeout=1.0,
    max_connections=64,
)
SLACK = 1.5  # seconds a hang-up may come after its limit on a loaded 2-core machine
MUTATIONS = 400  # per real server
TLS_GARBAGE = 100  # per real server
EXAMPLES = 100  # hypothesis examples per property (x2 for the two big ones)
RSS_GROWTH_LIMIT_MIB = 25  # over every batch of inputs, against the RSS measured after the first request
# Floods: RSS growth allowed per connection slot.  Measured per pending TLS handshake: about 55 KiB on
# uvloop; on the stock asyncio loop about 300 KiB (its SSL protocol allocates a 256 KiB read buffer per
# connection), and glibc keeps most of it after the connections are gone (its mmap threshold has grown).
FLOOD_KIB_PER_SLOT = {"uvloop": 160, "asyncio": 1024}


@dataclass
class Tally:
    """Inputs tried and what the servers made of them."""

    inputs: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    findings: list[str] = field(default_factory=list)

    def judge(self, target: str, data: bytes, outcome: Any) -> None:
        self.inputs[target] += 1
        if outcome.answer is not None:
            self.outcomes[str(outcome.answer.status)] += 1
        else:
            self.outcomes["closed" if outcome.closed else "no answer yet"] += 1
        problem = acceptable(outcome)
        if problem:
            self.findings.append(f"{target}: {problem} for {data[:300]!r}")


TALLY = Tally()


@pytest.fixture(scope="module", autouse=True)
def report_inputs() -> Iterator[None]:
    yield
    total = sum(TALLY.inputs.values())
    REPORT.append(
        f"fuzzing: {total} inputs tried ({dict(TALLY.inputs)}); answers {dict(TALLY.outcomes)}; "
        f"findings {len(TALLY.findings)}"
    )


# ---------------------------------------------------------------------- targets


@dataclass
class InProcessKeeper:
    port: int
    server: HttpsServer


@contextlib.contextmanager
def keeper_in_thread(
    dev_identity: DevIdentity, limits: ServerLimits, options: dict[str, Any]
) -> Iterator[InProcessKeeper]:
    """A real keeper (machine + handler + our server) on loopback, its event loop in a helper thread."""
    trust = TrustDomains.single(dev_identity.trust_domain)
    with start_blocking_portal(backend_options=options) as portal:
        server = HttpsServer(server_context(dev_identity.keeper(1)), KeeperHandler(Keeper(trust)), limits)
        ready = threading.Event()
        ports: list[int] = []

        async def serve() -> None:
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
            ports.append(listener.extra(anyio.abc.SocketAttribute.local_port))
            ready.set()
            await server.serve(listener)

        future = portal.start_task_soon(serve)
        assert ready.wait(10)
        try:
            yield InProcessKeeper(ports[0], server)
        finally:
            future.cancel()


@pytest.fixture(scope="module")
def small_keeper(dev_identity: DevIdentity) -> Iterator[InProcessKeeper]:
    """The keeper with short timeouts, on uvloop."""
    with keeper_in_thread(dev_identity, SMALL, backend_options()) as keeper:
        yield keeper


@pytest.fixture(scope="module")
def inproc_nexus(dev_identity: DevIdentity, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with running(dev_identity, tmp_path_factory.mktemp("fuzz-deployment")) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def procs(
    dev_identity: DevIdentity, tmp_path_factory: pytest.TempPathFactory, leak_watch: LeakWatch
) -> Iterator[ProxiedCluster]:
    """Real keeper and Nexus processes (2-of-3), READY."""
    with ready_cluster(dev_identity, tmp_path_factory.mktemp("fuzz-procs"), leak_watch, "fuzz") as cluster:
        yield cluster
        # No input may have made a server log a traceback or a failed handler.
        for proc in cluster.history:
            text = proc.text()
            assert "Traceback" not in text and "handler failed" not in text, proc.log


def ctx(identity: DevIdentity, name: str) -> ssl.SSLContext:
    return raw_client_context(identity.files(name), identity.files(name).bundle)


# ---------------------------------------------------------------------- request material

KEEPER_ROUTES = [KEEPER_SHARD_PATH, KEEPER_CONTRIBUTE_PATH]


def nexus_templates(record: Any) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """route name -> (target, who calls it, a valid body)."""
    b64 = base64.b64encode(b"x" * 28).decode()
    return {
        "status": (STATUS_PATH, "pilot-superuser", {}),
        "bootstrap/init": (BOOTSTRAP_INIT_PATH, "bootstrap", {"record": record, "replace": False}),
        "bootstrap/verify": (BOOTSTRAP_VERIFY_PATH, "bootstrap", {"nonce": b64[:16], "ciphertext": b64}),
        "recover": (RECOVER_PATH, "pilot-recover", {}),
        "restore": (RESTORE_PATH, "pilot-restore", {"id": 1, "shard": [7] * 32}),
        "encrypt": (CIPHER_ENCRYPT_PATH, "pilot-superuser", {"plaintext": "aGVsbG8="}),
        "decrypt": (CIPHER_DECRYPT_PATH, "pilot-superuser", {"version": 1, "nonce": b64[:16], "ciphertext": b64}),
        "put": (SECRETS_PATH, "pilot-superuser", {"path": "fuzz/a", "values": {"k": "v"}, "cas": None}),
        "get": (SECRETS_PATH + "?action=get", "pilot-superuser", {"path": "fuzz/a", "version": 0}),
        "delete": (SECRETS_PATH + "?action=delete", "pilot-superuser", {"path": "fuzz/a", "versions": [1]}),
        "undelete": (SECRETS_PATH + "?action=undelete", "pilot-superuser", {"path": "fuzz/a", "versions": [1]}),
        "destroy": (SECRETS_PATH + "?action=destroy", "pilot-superuser", {"path": "fuzz/b", "versions": [1]}),
        "list": (SECRETS_PATH + "?action=list", "pilot-superuser", {"prefix": "fuzz/", "limit": 10, "after": ""}),
        "meta-get": (SECRETS_METADATA_PATH + "?action=get", "pilot-superuser", {"path": "fuzz/a"}),
        "meta-put": (
            SECRETS_METADATA_PATH + "?action=put",
            "pilot-superuser",
            {"path": "fuzz/a", "max_versions": 5, "cas_required": False, "custom_metadata": {"o": "p"}},
        ),
        "meta-delete": (SECRETS_METADATA_PATH + "?action=delete", "pilot-superuser", {"path": "fuzz/c"}),
        "policy-put": (
            POLICY_PATH,
            "pilot-superuser",
            {"name": "fz", "spiffeidPattern": "nobody", "pathPattern": "fuzz/x", "permissions": ["read"]},
        ),
        "policy-get": (POLICY_PATH + "?action=get", "pilot-superuser", {"id": "fz"}),
        "policy-list": (POLICY_PATH + "?action=list", "pilot-superuser", {}),
        "policy-delete": (POLICY_PATH + "?action=delete", "pilot-superuser", {"id": "nothing-here"}),
    }


KEEPER_TEMPLATES = {
    "shard": (KEEPER_SHARD_PATH, "nexus", {}),
    "contribute": (KEEPER_CONTRIBUTE_PATH, "bootstrap", {"shard": list(range(1, 33)), "id": 1, "epoch": 1}),
}

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(["", "fuzz/a", "spike/acl/policies", "../x", "a" * 600, "\u0000", "%00", ".*", "(a+)+$"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=12,
)


def bodies_for(template: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """Bodies near a valid one (a field dropped, retyped or added) and far from it (any JSON, any bytes)."""
    near = st.fixed_dictionaries(
        {key: st.one_of(st.just(value), json_values) for key, value in template.items()},
        optional={"extra": json_values},
    ).map(json_bytes)
    dropped = (
        st.sets(st.sampled_from(sorted(template)), max_size=len(template)).map(
            lambda gone: json_bytes({k: v for k, v in template.items() if k not in gone})
        )
        if template
        else st.just(b"{}")
    )
    not_utf8 = st.tuples(near, st.integers(0, 10**6), st.integers(0x80, 0xFF)).map(lambda t: inject(*t))
    return st.one_of(near, dropped, not_utf8, json_values.map(json_bytes), st.binary(max_size=200))


def inject(body: bytes, at: int, byte: int) -> bytes:
    """`body` with one byte that cannot start a UTF-8 sequence put inside one of its strings."""
    quotes = [i for i, b in enumerate(body) if b == ord('"')]
    if not quotes:
        return body + bytes([byte])
    where = quotes[at % len(quotes)] + 1
    return body[:where] + bytes([byte]) + body[where:]


# ---------------------------------------------------------------------- hypothesis: JSON for every route


@st.composite
def route_calls(draw: Any, templates: dict[str, tuple[str, str, dict[str, Any]]]) -> tuple[str, str, bytes, str]:
    name = draw(st.sampled_from(sorted(templates)))
    target, who, template = templates[name]
    body = draw(bodies_for(template))
    content_type = draw(st.sampled_from(["application/json", "application/json", "application/octet-stream", ""]))
    return target, who, body, content_type


def test_json_bodies_of_every_route_get_4xx_never_500(inproc_nexus: Deployment, dev_identity: DevIdentity) -> None:
    """Valid HTTP, bodies invalid in every way for each Nexus route: a 2xx or 4xx, and the connection stays usable."""
    record = msgspec.to_builtins(inproc_nexus.custody.record)
    templates = nexus_templates(record)
    port = int(inproc_nexus.url.rsplit(":", 1)[1])
    clients = {who: RawClient(port, ctx(dev_identity, who)) for _, who, _ in templates.values()}

    @settings(max_examples=EXAMPLES * 2, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
    @given(route_calls(templates))
    def one(call: tuple[str, str, bytes, str]) -> None:
        target, who, body, content_type = call
        data = request(target, body, content_type=content_type)
        outcome = clients[who].send(data, wait=5)
        TALLY.judge("nexus (in-process) JSON", data, outcome)
        assert acceptable(outcome) == "", (outcome, data)
        # Well-formed HTTP is answered, and the connection kept (whatever the body was).
        assert outcome.answer is not None and not outcome.closed, (outcome, data)

    try:
        one()
        clients["pilot-superuser"].valid(request(STATUS_PATH), 200)
        assert inproc_nexus.phase.value == "ready"
    finally:
        for client in clients.values():
            client.close()


def test_strings_that_are_not_utf8_are_a_400_on_every_route(
    inproc_nexus: Deployment, dev_identity: DevIdentity
) -> None:
    """A byte like 0x95 in any string of any route's body (msgspec's UnicodeDecodeError) is a 400, not a 500."""
    record = msgspec.to_builtins(inproc_nexus.custody.record)
    port = int(inproc_nexus.url.rsplit(":", 1)[1])
    clients: dict[str, RawClient] = {}
    try:
        for name, (target, who, template) in nexus_templates(record).items():
            client = clients.setdefault(who, RawClient(port, ctx(dev_identity, who)))
            body = json_bytes(template)
            for at in range(body.count(b'"')):
                data = request(target, inject(body, at, 0x95))
                outcome = client.send(data, wait=5)
                TALLY.judge("nexus (in-process) not UTF-8", data, outcome)
                # Mostly 400; a 2xx where the byte landed in a field name a lenient struct ignores.
                assert outcome.answer is not None and acceptable(outcome) == "", (name, outcome, data)
    finally:
        for client in clients.values():
            client.close()


@pytest.mark.parametrize(
    "body",
    [b'{"path":"a\x95"}', b'{"k\xff":"v"}', b'{"record":{"e\x95":1}}', b'{"shard":["\x95"]}', b'"\xc3"'],
)
def test_decode_turns_bytes_that_are_not_utf8_into_a_protocol_error(body: bytes) -> None:
    """The finding behind the test above, at its root: `spike.protocol.decode` never lets UnicodeDecodeError out."""
    from spike.app.api.messages import InitRequest, SecretPutRequest
    from spike.protocol import RemoteProtocolError, ShardAnswer, decode

    for kind in (SecretPutRequest, InitRequest, ShardAnswer, dict):
        with contextlib.suppress(RemoteProtocolError):
            decode(body, kind)


def test_json_bodies_of_keeper_routes_get_4xx_never_500(
    small_keeper: InProcessKeeper, dev_identity: DevIdentity
) -> None:
    clients = {who: RawClient(small_keeper.port, ctx(dev_identity, who)) for _, who, _ in KEEPER_TEMPLATES.values()}

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(route_calls(KEEPER_TEMPLATES))
    def one(call: tuple[str, str, bytes, str]) -> None:
        target, who, body, content_type = call
        data = request(target, body, content_type=content_type)
        outcome = clients[who].send(data, wait=5)
        TALLY.judge("keeper (in-process) JSON", data, outcome)
        assert acceptable(outcome) == "", (outcome, data)
        assert outcome.answer is not None and not outcome.closed, (outcome, data)

    try:
        one()
    finally:
        for client in clients.values():
            client.close()


# ---------------------------------------------------------------------- hypothesis: HTTP itself

LINE_ENDS = [b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"]
tokens = st.text(alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1)
header_values = st.binary(max_size=60) | st.text(max_size=60).map(str.encode)


@st.composite
def http_requests(draw: Any, paths: tuple[bytes, ...]) -> tuple[bytes, int]:
    method = draw(st.sampled_from([b"POST", b"GET", b"PUT", b"post", b"P OST", b""]) | st.binary(max_size=8))
    target = draw(
        st.sampled_from([*paths, b"*", b"http://k/x", b"/", b"/v1/store/secrets?action="]) | st.binary(max_size=40)
    )
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 ", b""]))
    end = draw(st.sampled_from(LINE_ENDS))
    lines = [method + b" " + target + b" " + version]
    if draw(st.booleans()):
        lines.append(b"Host: k")
    body = draw(st.binary(max_size=120) | st.just(b"{}"))
    framing = draw(st.sampled_from(["length", "wrong-length", "none", "chunked", "bad-chunked", "both", "huge-length"]))
    if framing == "length":
        lines.append(b"Content-Length: %d" % len(body))
    elif framing == "wrong-length":
        lines.append(b"Content-Length: %d" % draw(st.integers(0, 400)))
    elif framing == "huge-length":
        lines.append(
            b"Content-Length: " + draw(st.sampled_from([b"99999999999999999999", b"-1", b"1e3", b"0x10", b" 5"]))
        )
    elif framing in ("chunked", "bad-chunked", "both"):
        lines.append(draw(st.sampled_from([b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip, chunked"])))
        if framing == "both":
            lines.append(b"Content-Length: %d" % len(body))
        sizes = draw(st.lists(st.integers(0, 40), max_size=4))
        pieces, at = [], 0
        for size in sizes:
            pieces.append(body[at : at + size])
            at += size
        if framing == "bad-chunked":
            body = b"".join(
                draw(st.sampled_from([b"zz\r\n", b"FFFFFFFFF\r\n", b"5\r\nabc", b"-1\r\n", b"3;" + b"e" * 2000]))
                for _ in range(2)
            )
        else:
            body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    extra = draw(
        st.lists(
            st.one_of(
                st.tuples(tokens, header_values).map(lambda kv: kv[0].encode() + b": " + kv[1]),
                st.binary(max_size=40),
                st.sampled_from([b" folded", b"Host: second", b"Expect: 100-continue", b"Connection: close", b": x"]),
            ),
            max_size=6,
        )
    )
    lines += extra
    data = end.join(lines) + end + end + body
    pieces_count = draw(st.integers(1, 4))
    return data, pieces_count


def test_generated_http_against_a_keeper(small_keeper: InProcessKeeper, dev_identity: DevIdentity) -> None:
    """Request lines, headers and framing, right and wrong, in one or more writes: 4xx or a close, never a 500."""
    nexus = ctx(dev_identity, "nexus")
    client = RawClient(small_keeper.port, nexus)

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(http_requests((KEEPER_SHARD_PATH.encode(), KEEPER_CONTRIBUTE_PATH.encode())))
    def one(generated: tuple[bytes, int]) -> None:
        data, pieces = generated
        outcome = client.send(data, wait=0.1, pieces=pieces)
        if outcome.answer is None and not outcome.closed:
            client.close()  # waiting for more than we sent: give up on this connection
        TALLY.judge("keeper (in-process) HTTP", data, outcome)
        assert acceptable(outcome) == "", (outcome, data)

    try:
        one()
        client.valid(request(KEEPER_SHARD_PATH), {200, 404})  # the fuzz may have given it a shard
        deadline = time.monotonic() + SMALL.request_timeout + SLACK
        while small_keeper.server.open_connections > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert small_keeper.server.open_connections == 0
    finally:
        client.close()


def test_generated_http_against_nexus(inproc_nexus: Deployment, dev_identity: DevIdentity) -> None:
    """The same against Nexus (as the superuser, so that requests reach the routes' handlers)."""
    port = int(inproc_nexus.url.rsplit(":", 1)[1])
    client = RawClient(port, ctx(dev_identity, "pilot-superuser"))
    record = msgspec.to_builtins(inproc_nexus.custody.record)
    paths = tuple(sorted({t.encode() for t, _, _ in nexus_templates(record).values()}))

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(http_requests(paths))
    def one(generated: tuple[bytes, int]) -> None:
        data, pieces = generated
        outcome = client.send(data, wait=0.1, pieces=pieces)
        if outcome.answer is None and not outcome.closed:
            client.close()
        TALLY.judge("nexus (in-process) HTTP", data, outcome)
        assert acceptable(outcome) == "", (outcome, data)

    try:
        one()
        client.valid(request(STATUS_PATH), 200)
        assert inproc_nexus.phase.value == "ready"
    finally:
        client.close()


# ---------------------------------------------------------------------- slow clients


def trickle(port: int, context: ssl.SSLContext, data: bytes, every: float, limit: float) -> tuple[float, bytes]:
    """Send `data` a byte at a time every `every` seconds; (when the server hung up, what it said)."""
    start = time.monotonic()
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, context.wrap_socket(raw) as sock:
        sock.settimeout(every)
        for i in range(10**6):
            if time.monotonic() - start > limit:
                raise AssertionError(f"still open after {limit:.1f}s of trickling")
            try:
                sock.sendall(data[i % len(data) : i % len(data) + 1])
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
            except TimeoutError:
                continue
            except (ssl.SSLError, OSError):
                break
    return time.monotonic() - start, received


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("head", request(KEEPER_SHARD_PATH) * 50),
        ("body", request(KEEPER_SHARD_PATH, b"{" + b" " * 3000 + b"}")),
        ("blank lines", b"\r\n"),
        ("chunks", chunked(KEEPER_SHARD_PATH, [b" "] * 5000)),
    ],
)
def test_slow_clients_are_cut_off_and_others_served(
    name: str, data: bytes, small_keeper: InProcessKeeper, dev_identity: DevIdentity
) -> None:
    """Twenty clients trickling a byte every 50 ms: each is cut off near its limit; a normal client is served."""
    nexus = ctx(dev_identity, "nexus")
    limit = SMALL.request_timeout + SMALL.idle_timeout + SLACK
    results: list[tuple[float, bytes] | BaseException] = []

    def slow() -> None:
        try:
            results.append(trickle(small_keeper.port, nexus, data, 0.05, limit))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=slow, daemon=True) for _ in range(20)]
    for thread in threads:
        thread.start()
    served = RawClient(small_keeper.port, nexus)
    started = time.monotonic()
    served.valid(request(KEEPER_SHARD_PATH), {200, 404})
    assert time.monotonic() - started < 2.0, "a normal client waited behind the slow ones"
    for thread in threads:
        thread.join(limit + 5)
    served.close()
    TALLY.inputs["slow clients (in-process)"] += len(threads)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[0]
    for _took, said in results:  # type: ignore[misc]
        assert said == b"" or said.startswith((b"HTTP/1.1 408 ", b"HTTP/1.1 404 ", b"HTTP/1.1 200 ")), said[:100]


# ---------------------------------------------------------------------- real processes


@dataclass
class ProcTarget:
    name: str
    port: int
    pid: int
    valid: bytes
    expect: int
    contexts: dict[str, ssl.SSLContext]
    requests: list[tuple[str, bytes]]  # (who, request) to mutate


def proc_targets(cluster: ProxiedCluster, identity: DevIdentity) -> list[ProcTarget]:
    record = msgspec.to_builtins(cluster_record(cluster))
    nexus_reqs = [(who, request(t, json_bytes(b))) for t, who, b in nexus_templates(record).values()]
    keeper_reqs = [(who, request(t, json_bytes(b))) for t, who, b in KEEPER_TEMPLATES.values()]
    keeper_reqs.append(
        ("bootstrap", chunked(KEEPER_CONTRIBUTE_PATH, [b'{"shard":', json_bytes(list(range(1, 33))), b"}"]))
    )
    names = {"pilot-superuser", "bootstrap", "pilot-recover", "pilot-restore", "nexus"}
    contexts = {name: ctx(identity, name) for name in names}
    return [
        ProcTarget(
            "keeper",
            cluster.keeper_ports[1],
            cluster.keeper(1).popen.pid,
            request(KEEPER_SHARD_PATH),
            200,
            contexts,
            keeper_reqs,
        ),
        ProcTarget(
            "nexus", cluster.nexus_port, cluster.nexus().popen.pid, request(STATUS_PATH), 200, contexts, nexus_reqs
        ),
    ]


def cluster_record(cluster: ProxiedCluster) -> Any:
    from spike.app.store.sqlite_schema import NexusStore

    store = NexusStore(cluster.data_dir)
    try:
        return store.load_key_record()
    finally:
        store.close()


def check_valid(target: ProcTarget) -> None:
    who = "nexus" if target.name == "keeper" else "pilot-superuser"
    client = RawClient(target.port, target.contexts[who])
    try:
        client.valid(target.valid, target.expect)
    finally:
        client.close()


def tls_garbage(rng: random.Random) -> bytes:
    hello = client_hello()
    kind = rng.randrange(7)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2000)))
    if kind == 1:
        return hello[: rng.randrange(1, len(hello))]  # truncated ClientHello
    if kind == 2:
        return mutate(rng, hello, rounds=rng.randrange(1, 6))
    if kind == 3:
        return b"\x16\x03\x01\xff\xff" + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 500)))  # huge record
    if kind == 4:
        return hello + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))  # hello, then noise
    if kind == 5:
        return request(STATUS_PATH)  # plain HTTP on the TLS port
    return b"\x80\x2e\x01\x00\x02" + bytes(rng.randrange(256) for _ in range(44))  # SSLv2-style hello


@dataclass
class ProcRun:
    targets: list[ProcTarget]
    rng: random.Random
    seed: int
    rss: dict[str, list[int]]

    def measure(self) -> None:
        for target in self.targets:
            self.rss[target.name].append(rss_kib(target.pid))


@pytest.fixture(scope="module")
def proc_run(procs: ProxiedCluster, dev_identity: DevIdentity) -> ProcRun:
    seed = random.randrange(2**32)
    targets = proc_targets(procs, dev_identity)
    return ProcRun(targets, random.Random(seed), seed, {t.name: [] for t in targets})


def mutation_batch(target: ProcTarget, seed: int, count: int) -> None:
    """`count` mutated requests on one thread's connections (reused while the server keeps them)."""
    rng = random.Random(seed)
    clients = {who: RawClient(target.port, context) for who, context in target.contexts.items()}
    try:
        for _ in range(count):
            who, base = rng.choice(target.requests)
            data = mutate(rng, base)
            client = clients[who]
            # The answer to a complete request comes in milliseconds; a request the mutation left
            # unfinished gets none (the server waits for the rest): give up on it quickly.
            outcome = client.send(data, wait=0.1)
            if outcome.answer is None and not outcome.closed:
                client.close()
            TALLY.judge(f"{target.name} (process) mutations", data, outcome)
    finally:
        for client in clients.values():
            client.close()


def test_real_servers_answer_mutated_requests(proc_run: ProcRun) -> None:
    """Valid requests for every route, mutated (bits, bytes, CRLFs, lengths, headers, truncation), 8 clients at once."""
    for target in proc_run.targets:
        check_valid(target)
        proc_run.measure()  # the baseline: after one request of each kind has been served
        for batch in range(MUTATIONS // 100):
            threads = [
                threading.Thread(
                    target=mutation_batch, args=(target, proc_run.rng.randrange(2**32), 100 // 8), daemon=True
                )
                for _ in range(8)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            check_valid(target)
            assert not TALLY.findings, f"seed {proc_run.seed}, batch {batch}:\n" + "\n".join(TALLY.findings[:20])
    proc_run.measure()


def test_real_servers_refuse_tls_garbage(proc_run: ProcRun) -> None:
    """Random bytes, truncated and mangled ClientHellos, huge records, plain HTTP, SSLv2 hellos: no HTTP, no harm."""
    rng = proc_run.rng
    for target in proc_run.targets:
        inputs = [tls_garbage(rng) for _ in range(TLS_GARBAGE)]
        answers: list[tuple[bytes, bytes]] = []

        def send(data: bytes, port: int = target.port, answers: list[tuple[bytes, bytes]] = answers) -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                with contextlib.suppress(OSError):
                    sock.sendall(data)
                    # Then end the stream: a server waiting for the rest of a handshake sees it at once.
                    sock.shutdown(socket.SHUT_WR)
                said = b""
                with contextlib.suppress(OSError):
                    while chunk := sock.recv(65536):
                        said += chunk
            answers.append((data, said))

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(send, inputs))
        TALLY.inputs[f"{target.name} (process) TLS garbage"] += len(answers)
        for data, said in answers:
            assert b"HTTP/" not in said, (data[:100], said[:100])  # at most a TLS alert
        check_valid(target)
    proc_run.measure()


def test_real_servers_refuse_huge_endless_and_unread(proc_run: ProcRun) -> None:
    for target in proc_run.targets:
        abuse(target)
        check_valid(target)
    proc_run.measure()


def test_real_servers_memory_stays_bounded(proc_run: ProcRun) -> None:
    """VmRSS after each batch of inputs, against the first measure (taken once each server had served one request)."""
    for target in proc_run.targets:
        samples = proc_run.rss[target.name]
        growth = (max(samples[1:]) - samples[0]) / 1024
        REPORT.append(
            f"fuzzing: {target.name} process VmRSS {samples[0] / 1024:.1f} MiB at first, at most "
            f"{max(samples) / 1024:.1f} MiB after the batches (growth {growth:.1f} MiB; limit {RSS_GROWTH_LIMIT_MIB})"
        )
        assert len(samples) >= 4, samples
        assert growth < RSS_GROWTH_LIMIT_MIB, (target.name, samples)


def test_real_servers_outlast_connection_floods(proc_run: ProcRun, procs: ProxiedCluster) -> None:
    """Two floods beyond the silent-connection budgets, each said once in the log; memory bounded by the limit.

    A pending TLS handshake costs a server about 55 KiB (uvloop and OpenSSL buffers); a silent
    connection costs a file descriptor.  After the connections go, glibc keeps much of what they
    used mapped (fragmentation, not a leak: see the in-process test below).  So the bound here is
    per connection slot, not per connection made.
    """
    before = {t.name: rss_kib(t.pid) for t in proc_run.targets}
    logs = {"keeper": procs.keeper(1), "nexus": procs.nexus()}
    said_before = {name: proc.text().count("silent connections at their limit") for name, proc in logs.items()}
    for _ in range(2):
        floods(proc_run.targets, procs)
    for target in proc_run.targets:
        limits = KEEPER_LIMITS if target.name == "keeper" else NEXUS_LIMITS
        limit = limits.max_connections
        after = rss_kib(target.pid)
        try:
            loop = "uvloop" if "uvloop" in Path(f"/proc/{target.pid}/maps").read_text() else "asyncio"
        except PermissionError:  # the servers make themselves undumpable: only root reads their maps
            loop = "asyncio" if target.name == "keeper" else "uvloop"
        per_slot = FLOOD_KIB_PER_SLOT[loop]
        REPORT.append(
            f"fuzzing: {target.name} process ({loop}) VmRSS {before[target.name] / 1024:.1f} MiB before two floods "
            f"of {limits.max_silent} + 40 silent connections, {after / 1024:.1f} MiB after "
            f"(growth < {limit * per_slot / 1024:.0f} MiB)"
        )
        assert after - before[target.name] < limit * per_slot, (target.name, loop, before, after)
        # One warning per flood, and one line when there is room again: never a line per connection.
        said = logs[target.name].text().count("silent connections at their limit") - said_before[target.name]
        assert 1 <= said <= 2, (target.name, said)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_connection_floods_leak_nothing(loop: str, dev_identity: DevIdentity) -> None:
    """Floods of a server in this process, with freed memory handed back (malloc_trim) between them: flat.

    Both event loops spike runs on: Nexus uses uvloop, keepers the stock asyncio loop.  Each flood
    connection sends the start of a ClientHello, so that it holds a TLS handshake (the stage that
    costs memory) until the server closes it.
    """
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        pytest.skip("needs glibc's malloc_trim")
    limits = ServerLimits(max_connections=512, max_handshakes=512, max_silent=512)
    options = {"use_uvloop": True} if loop == "uvloop" else {}
    hello = client_hello()[:40]
    with keeper_in_thread(dev_identity, limits, options) as keeper:
        server = keeper.server
        live: list[int] = []
        for _ in range(5):
            held = [
                socket.create_connection(("127.0.0.1", keeper.port), timeout=5)
                for _ in range(limits.max_handshakes + 20)
            ]
            for sock in held:
                sock.sendall(hello)
            deadline = time.monotonic() + 10
            while server.handshaking < limits.max_handshakes and time.monotonic() < deadline:
                time.sleep(0.02)
            for sock in held:
                sock.close()
            while (server._pending or server.open_connections) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert server._pending == server.open_connections == 0
            gc.collect()
            trim(0)
            live.append(rss_kib(os.getpid()))
            TALLY.inputs[f"keeper (in-process, {loop}) flood connections"] += len(held)
    REPORT.append(
        f"fuzzing: in-process server ({loop}) RSS after each of 5 floods, freed memory trimmed: "
        f"{[v // 1024 for v in live]} MiB"
    )
    # A leak grows with every flood (512 pending handshakes are ~25 MiB each time); what glibc keeps
    # mapped after a trim does not, but it swings between floods and can settle a step higher once
    # (seen: 175, 155, 171, 155, 171 MiB; and 158, 160, 169, 169, 169 MiB).  So: the last two floods
    # end no higher than the third, and the last three no higher than the first two, give or take
    # 8 and 16 MiB; leaking the floods' connections would add 50 MiB to either.
    assert max(live[3:]) - live[2] < 8 * 1024, live
    assert max(live[2:]) - max(live[:2]) < 16 * 1024, live


def abuse(target: ProcTarget) -> None:
    """Huge and endless heads and bodies, chunked abuse, a client that never reads its answers."""
    who = "nexus" if target.name == "keeper" else "pilot-superuser"
    context = target.contexts[who]
    path = KEEPER_SHARD_PATH if target.name == "keeper" else STATUS_PATH
    cases: dict[str, tuple[bytes, set[int]]] = {
        "endless head": (
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: k\r\n" + b"X-A: " + b"a" * 100 + b"\r\n",
            {431},
        ),
        "huge length": (
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: k\r\nContent-Length: 99999999999\r\n\r\n",
            {413, 400},
        ),
        "endless chunks": (
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: k\r\nTransfer-Encoding: chunked\r\n\r\n",
            {413},
        ),
        "chunk size overflow": (
            b"POST "
            + path.encode()
            + b" HTTP/1.1\r\nHost: k\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFF\r\n",
            {400},
        ),
        "long chunk extension": (
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: k\r\nTransfer-Encoding: chunked\r\n\r\n1;" + b"e" * 5000,
            {400},
        ),
        "endless trailers": (
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: k\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",
            {431},
        ),
    }
    for name, (start, statuses) in cases.items():
        filler = {
            "endless head": b"X-B: " + b"b" * 1000 + b"\r\n",
            "endless chunks": b"400\r\n" + b" " * 0x400 + b"\r\n",
            "endless trailers": b"T: " + b"t" * 1000 + b"\r\n",
        }.get(name, b"")
        with socket.create_connection(("127.0.0.1", target.port), timeout=5) as raw, context.wrap_socket(raw) as sock:
            sent = 0
            try:
                sock.sendall(start)
                said = None
                while filler and sent < 8 * 1024 * 1024:  # at most 8 MiB: the server must have refused long before
                    sock.sendall(filler)
                    sent += len(filler)
                    said = answer_so_far(sock)
                    if said is not None:
                        break
            except (ssl.SSLError, OSError):
                said = None
            if not said:
                sock.settimeout(5)
                try:
                    said = sock.recv(65536)
                except (ssl.SSLError, OSError):
                    said = b""
        TALLY.inputs[f"{target.name} (process) abuse"] += 1
        status = int(said.split(b" ")[1]) if said.startswith(b"HTTP/1.1 ") else 0
        assert status in statuses, (target.name, name, said[:200], sent)
        # What the client got out before the refusal reached it: the body limit (1.4 MB) plus what the
        # two kernels' socket buffers hold (loopback autotuning: up to a few MiB) and what went out while
        # the answer was on its way. 2 MiB failed 3 runs in 18 on a loaded machine; the server's side of
        # it (refused at the limit, nothing held) is what the flood and budget tests measure.
        assert sent < 4 * 1024 * 1024, (target.name, name, sent)

    # A client that sends a thousand requests and never reads an answer: paused, not buffered without end.
    with socket.create_connection(("127.0.0.1", target.port), timeout=5) as raw, context.wrap_socket(raw) as sock:
        sock.settimeout(0.5)
        many = request(path) * 1000
        with contextlib.suppress(TimeoutError, OSError):
            sock.sendall(many)
        check_valid(target)  # others are served meanwhile
    TALLY.inputs[f"{target.name} (process) abuse"] += 1


def answer_so_far(sock: ssl.SSLSocket) -> bytes | None:
    """What the server has sent (b"" if it closed), or None if nothing yet; never waits."""
    sock.settimeout(0.0)
    try:
        return sock.recv(65536)
    except (ssl.SSLWantReadError, BlockingIOError):
        return None
    except (ssl.SSLError, OSError):
        return b""
    finally:
        sock.settimeout(5)


def floods(targets: list[ProcTarget], cluster: ProxiedCluster) -> None:
    """More silent connections than the servers' budgets for them: the oldest are closed to make room
    for the newest, and the established connection keeps being served."""
    keeper = next(t for t in targets if t.name == "keeper")
    nexus = next(t for t in targets if t.name == "nexus")
    for target, limit in ((keeper, KEEPER_LIMITS.max_silent), (nexus, NEXUS_LIMITS.max_silent)):
        who = "nexus" if target.name == "keeper" else "pilot-superuser"
        inside = RawClient(target.port, target.contexts[who])
        inside.valid(target.valid, target.expect)  # one established connection, kept
        held: list[socket.socket] = []
        try:
            # Bare TCP connections that never start TLS: each waits for its first bytes until the
            # handshake timeout, or until newer ones push it out.
            for _ in range(limit + 40):
                held.append(socket.create_connection(("127.0.0.1", target.port), timeout=5))
            # The server closes the oldest beyond its budget at once.
            closed = 0
            deadline = time.monotonic() + 10
            for sock in held[:40]:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    if sock.recv(1) == b"":
                        closed += 1
                except ConnectionResetError:
                    closed += 1
                except TimeoutError:
                    pass
            assert closed >= 30, (target.name, closed)
            # The connection inside the limit is still served.
            outcome = inside.send(target.valid, wait=5)
            assert outcome.answer is not None and outcome.answer.status == target.expect, (target.name, outcome)
            TALLY.inputs[f"{target.name} (process) flood connections"] += len(held)
        finally:
            for sock in held:
                sock.close()
            inside.close()
        # Once they are gone, new clients are served again.
        deadline = time.monotonic() + 10
        while True:
            try:
                check_valid(target)
                break
            except (AssertionError, OSError, ssl.SSLError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def test_real_nexus_serves_while_slow_clients_trickle(procs: ProxiedCluster, dev_identity: DevIdentity) -> None:
    """Against the production limits (10 s per request): twenty trickling clients do not hold up a normal one."""
    context = ctx(dev_identity, "pilot-superuser")
    stop = threading.Event()
    socks: list[ssl.SSLSocket] = []

    def slow() -> None:
        try:
            raw = socket.create_connection(("127.0.0.1", procs.nexus_port), timeout=5)
            sock = context.wrap_socket(raw)
            socks.append(sock)
            data = request(STATUS_PATH, b"{" + b" " * 1000 + b"}")
            for byte in data:
                if stop.is_set():
                    return
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
        except (OSError, ssl.SSLError):
            return

    threads = [threading.Thread(target=slow, daemon=True) for _ in range(20)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)  # let them get going
        client = RawClient(procs.nexus_port, context)
        for _ in range(5):
            started = time.monotonic()
            client.valid(request(STATUS_PATH), 200)
            assert time.monotonic() - started < 2.0
        client.close()
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
        for sock in socks:
            sock.close()
    TALLY.inputs["nexus (process) slow clients"] += len(threads)
