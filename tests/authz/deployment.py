"""An in-process deployment for the authorisation tests: three keepers and a Nexus on real mTLS.

Everything `spike nexus` wires (custody driver, secret and policy stores, the
authorizer, the route table and its guards) runs on one event loop in a
helper thread (an anyio blocking portal), next to three real keeper servers
(`KeeperHandler`).  The keepers are handed their shards as `spike bootstrap`
would, and Nexus rebuilds the root key from them by polling, as after a
restart: `start()` returns once the custody machine is READY, so no answer
is a 503 that could hide an authorisation decision.

Callers are real TLS clients on the same loop (`Deployment.caller`), each with
its own client context: an SVID of the session's dev CA, a workload SVID
minted here (`mint`), one from a CA nobody trusts, an expired one, or no
certificate at all.  Every call the route table sees is recorded (`calls`),
so a test can tell a refusal at the handshake (Nexus saw nothing) from a 401.

This builds its own NexusApi rather than using tests/api's helper: the wiring
below is kept to what `spike.app.nexus.server.Nexus` does.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import ssl
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec
from anyio.abc import SocketAttribute
from anyio.from_thread import BlockingPortal, start_blocking_portal
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

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
from spike.app.commands.devca import CA_KEY, DevIdentity, mint_svid
from spike.app.identity import identity_source
from spike.app.keeper import keeper_server
from spike.app.nexus.authorizer import Authorizer
from spike.app.nexus.cipher_api import CipherApi
from spike.app.nexus.key_users import KeyUsers
from spike.app.nexus.operator_api import OperatorApi
from spike.app.nexus.policy_api import PolicyApi
from spike.app.nexus.routes import ApiCall, NexusApi
from spike.app.nexus.secrets_api import SecretsApi
from spike.app.nexus.server import nexus_server
from spike.app.store.policies import PolicyStore
from spike.app.store.sqlite import SecretStore
from spike.app.store.sqlite_schema import DB_NAME, NexusStore
from spike.protocol import PollSchedule, seal_key
from spike.protocol.api import ApiRequest
from spike.protocol.effects import KeyRecovered, Phase, Report
from spike.protocol.identity import Role, SpiffeId, TrustDomains
from spike.protocol.keeper import Keeper
from spike.protocol.material import RootKey
from spike.protocol.nexus import NexusCustody
from spike.protocol.wire import KEEPER_CONTRIBUTE_PATH, ShardContribution, encode
from spike.transports.client import HttpsConnection, TransportError
from spike.transports.custody_driver import CustodyDriver
from spike.transports.identity import IdentitySource
from spike.transports.server import HttpsServer
from spike.transports.tls import SvidFiles, client_context, new_context, role_check

ROOT_KEY = bytes(range(1, 33))
KEEPERS = (1, 2, 3)
THRESHOLD = 2
WAIT = 10.0


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Seen:
    """What Nexus's route table recorded of one call (the audit log's view)."""

    peer: str
    path: str
    action: str
    decision: str
    status: int


def mint(
    identity: DevIdentity, directory: Path, spiffe_id: str, *, expired: bool = False, not_yet_valid: bool = False
) -> SvidFiles:
    """An X.509 SVID for `spiffe_id` from the dev CA (or one that expired an hour ago, or is valid from tomorrow)."""
    bundle = identity.directory / "bundle.pem"
    ca_cert = x509.load_pem_x509_certificate(bundle.read_bytes())
    ca_key = serialization.load_pem_private_key((identity.directory / CA_KEY).read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.UTC)
    if expired:
        not_before, not_after = now - dt.timedelta(days=2), now - dt.timedelta(hours=1)
    elif not_yet_valid:
        not_before, not_after = now + dt.timedelta(days=1), now + dt.timedelta(days=2)
    else:
        not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(days=1)
    cert, key = mint_svid(ca_cert, ca_key, spiffe_id, not_before=not_before, not_after=not_after)
    directory.mkdir(parents=True, exist_ok=True)
    stem = spiffe_id.rsplit("/", 1)[-1] + ("-expired" if expired else "") + ("-not-yet-valid" if not_yet_valid else "")
    files = SvidFiles(directory / f"{stem}.pem", directory / f"{stem}-key.pem", bundle)
    files.cert.write_bytes(cert)
    files.key.write_bytes(key)
    files.key.chmod(0o600)
    return files


def no_certificate_context(identity: DevIdentity) -> ssl.SSLContext:
    """A client that trusts Nexus but presents no certificate at all."""
    ctx = new_context(server_side=False)
    ctx.load_verify_locations(cafile=str(identity.directory / "bundle.pem"))
    return ctx


def foreign_ca_context(identity: DevIdentity, foreign: DevIdentity, name: str) -> ssl.SSLContext:
    """A client with `foreign`'s SVID for `name` (a CA Nexus does not trust) that trusts Nexus itself."""
    files = foreign.files(name)
    ctx = new_context(server_side=False)
    ctx.load_cert_chain(str(files.cert), str(files.key))
    ctx.load_verify_locations(cafile=str(identity.directory / "bundle.pem"))
    return ctx


class Caller:
    """A TLS client of Nexus on the deployment's loop, with one keep-alive connection."""

    def __init__(self, deployment: Deployment, context: ssl.SSLContext) -> None:
        self._deployment = deployment
        self._connection = HttpsConnection(
            deployment.url,
            context,
            role_check(deployment.trust, Role.NEXUS),
            expected_peer=str(deployment.trust.id_of(Role.NEXUS)),
        )

    def post(self, path: str, body: Any = None, *, action: str = "", content_type: str = "application/json") -> Answer:
        """The answer; raises `TransportError` when there is no HTTP answer (a refused handshake)."""
        target = f"{path}?action={action}" if action else path
        raw = body if isinstance(body, bytes) else msgspec.json.encode({} if body is None else body)

        async def send() -> tuple[int, bytes]:
            with anyio.fail_after(WAIT):
                return await self._connection.request("POST", target, raw, content_type)

        status, answer = self._deployment.portal.call(send)
        return Answer(status, answer)

    def ok(self, path: str, body: Any = None, *, action: str = "") -> Any:
        answer = self.post(path, body, action=action)
        assert answer.status == 200, (path, action, body, answer)
        return answer.json()

    def put_policy(self, name: str, ids: str, paths: str, permissions: list[str], *, create_only: bool = False) -> Any:
        body = {
            "name": name,
            "spiffeidPattern": ids,
            "pathPattern": paths,
            "permissions": permissions,
            "createOnly": create_only,
        }
        return self.ok(POLICY_PATH, body)

    def close(self) -> None:
        self._deployment.portal.call(self._connection.aclose)


class Deployment:
    def __init__(
        self, identity: DevIdentity, root: Path, *, keeper_ids: tuple[int, ...] = KEEPERS, poll_interval: float = 0.5
    ) -> None:
        self.identity = identity
        self.root = root
        self.data_dir = root / "nexus-data"
        self.trust = TrustDomains.single(identity.trust_domain)
        self.keeper_ids = keeper_ids
        self.poll_interval = poll_interval
        self.calls: list[Seen] = []
        self.reports: list[Report] = []
        self.url = ""
        self._stack = ExitStack()
        self._callers: list[Caller] = []
        self._stop: anyio.CancelScope | None = None
        self._ready: anyio.Event | None = None
        self._closed = False

    # ------------------------------------------------------------------ life cycle

    def start(self) -> Deployment:
        self.portal: BlockingPortal = self._stack.enter_context(start_blocking_portal())
        try:
            future, _ = self.portal.start_task(self._run)
            self._finished = future
            self.portal.call(self._wait_ready)
        except BaseException:
            self.close()
            raise
        return self

    async def _wait_ready(self) -> None:
        assert self._ready is not None
        with anyio.fail_after(WAIT):
            await self._ready.wait()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for caller in self._callers:
            with suppress(Exception):  # best effort: the loop is going away
                caller.close()
        if self._stop is not None:
            self.portal.call(self._stop.cancel)
            self._finished.result(WAIT)
        self._stack.close()

    def __enter__(self) -> Deployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._ready = anyio.Event()
        record, shares = seal_key(RootKey(ROOT_KEY), epoch=1, threshold=THRESHOLD, keeper_ids=self.keeper_ids)
        sources: list[IdentitySource] = []

        def source(files: SvidFiles) -> IdentitySource:
            started = identity_source(files, self.trust).start()
            sources.append(started)
            return started

        # Keepers, seeded with their shards as `spike bootstrap` does (bootstrap's own peer ID).
        bootstrap = self.trust.id_of(Role.BOOTSTRAP)
        keeper_servers: list[tuple[HttpsServer, anyio.abc.Listener[anyio.abc.SocketStream]]] = []
        urls: dict[int, str] = {}
        self.keepers: dict[int, Keeper] = {}
        for keeper_id in self.keeper_ids:
            keeper = Keeper(self.trust)
            contribution = encode(ShardContribution.of(shares[keeper_id]))
            seeded = keeper.handle(ApiRequest("POST", KEEPER_CONTRIBUTE_PATH, bootstrap, contribution))
            assert seeded.response.status == 200
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
            urls[keeper_id] = f"https://127.0.0.1:{_port(listener)}"
            server = keeper_server(source(self.identity.keeper(keeper_id)).server_context, keeper, self.trust)
            keeper_servers.append((server, listener))
            self.keepers[keeper_id] = keeper

        # Nexus, wired as `spike nexus` wires it.
        nexus_identity = source(self.identity.files("nexus"))
        self.nexus_store = NexusStore(self.data_dir)
        self.nexus_store.save_key_record(record)
        self.secrets = SecretStore(self.data_dir)
        self.custody = NexusCustody(
            self.keeper_ids,
            threshold=THRESHOLD,
            schedule=PollSchedule(interval=self.poll_interval, request_timeout=min(2.0, self.poll_interval)),
            rng=random.Random(7),
            now=anyio.current_time(),
            record=record,
        )
        self.cipher = CipherApi()
        self.policies = PolicyStore(self.secrets)
        self.authorizer = Authorizer(self.trust, self.policies)
        self.driver = CustodyDriver(
            self.custody,
            urls,
            ssl_context=nexus_identity.client_context,
            trust=self.trust,
            on_report=KeyUsers(self.custody, self.secrets, self.cipher, self.authorizer, [self._report]),
        )
        self.api = NexusApi(
            self.driver,
            self.nexus_store,
            self.trust,
            secrets=SecretsApi(self.secrets, self.authorizer),
            cipher=self.cipher,
            operator=OperatorApi(self.driver),
            policies=PolicyApi(self.policies, self.authorizer),
            authorizer=self.authorizer,
            observer=self._observe,
        )
        nexus_listener: anyio.abc.Listener[anyio.abc.SocketStream]
        nexus_listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.url = f"https://127.0.0.1:{_port(nexus_listener)}"
        nexus = nexus_server(nexus_identity.server_context, self.api, self.trust)
        try:
            async with anyio.create_task_group() as tg:
                self._stop = tg.cancel_scope
                for server, bound in [*keeper_servers, (nexus, nexus_listener)]:
                    tg.start_soon(server.serve, bound)
                tg.start_soon(self.driver.run)
                task_status.started()
        finally:
            self.custody.forget(anyio.current_time())
            self.secrets.lock()
            self.cipher.lock()
            self.secrets.close()
            self.nexus_store.close()
            for started in sources:
                started.stop()
            for keeper in self.keepers.values():
                keeper.forget()

    def _report(self, report: Report) -> None:
        self.reports.append(report)
        if isinstance(report, KeyRecovered) and self._ready is not None:
            self._ready.set()

    def _observe(self, call: ApiCall, status: int, seconds: float) -> None:
        request = call.request
        self.calls.append(Seen(str(request.peer or ""), request.path, call.action, call.decision, status))

    # ------------------------------------------------------------------ callers

    def caller(self, who: str | SvidFiles | ssl.SSLContext) -> Caller:
        """A client: a role's dev SVID by name ("pilot-superuser", "keeper-1"), SVID files, or a context."""
        if isinstance(who, str):
            who = self.identity.files(who)
        context = who if isinstance(who, ssl.SSLContext) else client_context(who)
        caller = Caller(self, context)
        self._callers.append(caller)
        return caller

    def workload(self, name: str, *, expired: bool = False) -> Caller:
        """A client with a fresh SVID for spiffe://<td>/workload/<name>."""
        return self.caller(self.mint(f"/workload/{name}", expired=expired))

    def mint(self, path: str, *, expired: bool = False, not_yet_valid: bool = False) -> SvidFiles:
        spiffe_id = f"spiffe://{self.identity.trust_domain}{path}"
        return mint(self.identity, self.root / "svids", spiffe_id, expired=expired, not_yet_valid=not_yet_valid)

    def spiffe_id(self, path: str) -> SpiffeId:
        return SpiffeId(self.identity.trust_domain, path)

    # ------------------------------------------------------------------ looking inside

    def on_loop(self, function: Callable[[], Any]) -> Any:
        """Run `function` on the event loop's thread (where handlers and the authorizer run)."""

        async def run() -> Any:
            return function()

        return self.portal.call(run)

    @property
    def phase(self) -> Phase:
        return self.custody.phase

    @property
    def db_path(self) -> Path:
        return self.data_dir / DB_NAME


def _port(listener: anyio.abc.Listener[Any]) -> int:
    inner = getattr(listener, "listeners", [listener])[0]
    return int(inner.extra(SocketAttribute.local_port))


@contextmanager
def running(identity: DevIdentity, root: Path, **options: Any) -> Iterator[Deployment]:
    deployment = Deployment(identity, root, **options).start()
    try:
        yield deployment
    finally:
        deployment.close()


__all__ = ["Answer", "Caller", "Deployment", "Seen", "TransportError", "mint", "running"]


# Every route of the Nexus API, by a short name: (path, action).
ROUTES: dict[str, tuple[str, str]] = {
    "status": (STATUS_PATH, ""),
    "bootstrap/init": (BOOTSTRAP_INIT_PATH, ""),
    "bootstrap/verify": (BOOTSTRAP_VERIFY_PATH, ""),
    "operator/recover": (RECOVER_PATH, ""),
    "operator/restore": (RESTORE_PATH, ""),
    "cipher/encrypt": (CIPHER_ENCRYPT_PATH, ""),
    "cipher/decrypt": (CIPHER_DECRYPT_PATH, ""),
    **{f"secrets?{a}" if a else "secrets": (SECRETS_PATH, a) for a in ("", "get", "delete", "undelete", "destroy")},
    "secrets?list": (SECRETS_PATH, "list"),
    **{f"metadata?{a}": (SECRETS_METADATA_PATH, a) for a in ("get", "put", "delete")},
    **{f"policy?{a}" if a else "policy": (POLICY_PATH, a) for a in ("", "get", "list", "delete")},
}
