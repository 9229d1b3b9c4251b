"""Nexus's HTTP API: a route table where every route names who may call it.

Handlers are plain functions run on the event loop thread, next to the
custody machine they read and drive.  Error bodies carry only a code; the
detail goes to the log.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from spike.app.api.messages import (
    BOOTSTRAP_INIT_PATH,
    BOOTSTRAP_VERIFY_PATH,
    CIPHER_DECRYPT_PATH,
    CIPHER_ENCRYPT_PATH,
    IMPORT_PATH,
    POLICY_PATH,
    RECOVER_PATH,
    RESTORE_PATH,
    ROTATE_PATH,
    SECRETS_METADATA_PATH,
    SECRETS_PATH,
    STATUS_PATH,
    VERIFY_INFO,
    InitRequest,
    InitResponse,
    KeeperStatus,
    KeyringStatusBody,
    StatusBody,
    VerifyRequest,
    VerifyResponse,
)
from spike.app.model.policy import SYSTEM_ACL, SYSTEM_CIPHER, Permission
from spike.app.nexus import refusals
from spike.app.nexus.authorizer import Authorizer
from spike.app.nexus.cipher_api import CipherApi
from spike.app.nexus.import_api import ImportApi
from spike.app.nexus.lifecycle import KeyLifecycle, rotation_status
from spike.app.nexus.operator_api import OperatorApi
from spike.app.nexus.policy_api import PolicyApi
from spike.app.nexus.secrets_api import SecretsApi
from spike.app.nexus.vault.paths import is_spike_path, is_vault_path
from spike.app.store.backend import KeyRecords
from spike.app.store.errors import EpochUsed, StorageError
from spike.protocol.api import ApiRequest, ApiResponse
from spike.protocol.effects import Phase
from spike.protocol.errors import LocalProtocolError, RemoteProtocolError
from spike.protocol.identity import Role, TrustDomains
from spike.protocol.material import derive_key
from spike.protocol.nexus import AlreadyInitialised, NexusCustody, UnrecordedKeyRefused
from spike.protocol.record import KeyRecord, seal_key
from spike.protocol.wire import ErrorCode, decode
from spike.transports.custody_driver import CustodyDriver

log = logging.getLogger("spike.nexus.api")

Reply = ApiResponse | Future[ApiResponse]
RouteHandler = Callable[[ApiRequest], Reply]
PILOTS = frozenset({Role.PILOT_SUPERUSER, Role.PILOT_RECOVER, Role.PILOT_RESTORE})
# What each policy route needs on SPIKE's reserved system path for policies (spike-sdk-go predicate/policy.go).
POLICY_PERMISSIONS = {"": Permission.WRITE, "delete": Permission.WRITE, "get": Permission.READ, "list": Permission.LIST}


class ApiCall(msgspec.Struct, frozen=True):
    """What the audit log and metrics learn of a call: never its body."""

    request: ApiRequest
    known_route: bool
    action: str
    decision: str  # allowed, denied, no_route


Observer = Callable[[ApiCall, int, float], None]  # the call, its HTTP status, seconds until answered
# The Vault face (vault/face.py): (decision, reply) for a path under /v1/ outside SPIKE's prefixes.
VaultFace = Callable[[ApiRequest], tuple[str, Reply]]


class Roles(msgspec.Struct, frozen=True):
    """Guard: only these spike roles (an empty set admits nobody)."""

    roles: frozenset[Role]


class Granted(msgspec.Struct, frozen=True):
    """Guard: a policy (or the superuser role) must grant `permission` on `path`.

    With no fixed `path` the route acts on the secret path in its body: the
    guard admits only callers that some policy gives this permission, and the
    handler checks the exact path once it has decoded the body.
    """

    permission: Permission
    path: str | None = None


Guard = Roles | Granted


class Route(msgspec.Struct, frozen=True):
    handler: RouteHandler
    guard: Guard  # required: no route without an explicit guard
    needs_key: bool = False  # answer 503 state_not_ready until the root key is verified


def memory_status(now: float) -> StatusBody:
    """`spike status` of a Nexus on the memory backend: ready from its start, nothing in custody, nothing kept."""
    return StatusBody(
        phase=Phase.READY.value,
        epoch=None,
        threshold=0,
        shares=0,
        shards_needed=0,
        redundancy=None,
        poll_interval=0.0,
        keepers=[],
        time=now,
        backend="memory",
    )


class NexusApi:
    """Routes by (path, action): SPIKE selects operations with ``?action=``."""

    def __init__(
        self,
        driver: CustodyDriver | None,
        store: KeyRecords,
        trust: TrustDomains,
        *,
        secrets: SecretsApi,
        cipher: CipherApi,
        operator: OperatorApi | None,
        policies: PolicyApi,
        authorizer: Authorizer,
        observer: Observer | None = None,
        lifecycle: KeyLifecycle | None = None,
        vault: VaultFace | None = None,
        importer: ImportApi | None = None,
    ) -> None:
        self._driver = driver
        self._lifecycle = lifecycle
        self._vault = vault
        self._observer = observer
        self._store = store
        self._trust = trust
        self._authorizer = authorizer
        routes: dict[tuple[str, str], Route] = {
            (STATUS_PATH, ""): Route(self.status, Roles(frozenset({Role.BOOTSTRAP, *PILOTS}))),
            (CIPHER_ENCRYPT_PATH, ""): Route(
                cipher.encrypt, Granted(Permission.EXECUTE, SYSTEM_CIPHER), needs_key=True
            ),
            (CIPHER_DECRYPT_PATH, ""): Route(
                cipher.decrypt, Granted(Permission.EXECUTE, SYSTEM_CIPHER), needs_key=True
            ),
        }
        # The routes of a key in custody; with no driver (the memory backend) there is none, and they are closed.
        self._closed: dict[str, ApiResponse] = {}
        if driver is not None and operator is not None:
            routes[(BOOTSTRAP_INIT_PATH, "")] = Route(self.bootstrap_init, Roles(frozenset({Role.BOOTSTRAP})))
            routes[(BOOTSTRAP_VERIFY_PATH, "")] = Route(self.bootstrap_verify, Roles(frozenset({Role.BOOTSTRAP})))
            routes[(RECOVER_PATH, "")] = Route(operator.recover, Roles(frozenset({Role.PILOT_RECOVER})), needs_key=True)
            routes[(RESTORE_PATH, "")] = Route(operator.restore, Roles(frozenset({Role.PILOT_RESTORE})))
        else:
            self._closed = dict(refusals.MEMORY_CLOSED)
        if lifecycle is not None:
            routes[(ROTATE_PATH, "")] = Route(
                lifecycle.rotate, Roles(frozenset({Role.PILOT_SUPERUSER})), needs_key=True
            )
        if importer is not None:  # the superuser role, as SPIKE's Pilot, and only with the key
            routes[(IMPORT_PATH, "")] = Route(importer.handle, Roles(frozenset({Role.PILOT_SUPERUSER})), needs_key=True)
        for action, (handler, permission) in secrets.handlers().items():
            routes[(SECRETS_PATH, action)] = Route(handler, Granted(permission), needs_key=True)
        for action, (handler, permission) in secrets.metadata_handlers().items():
            routes[(SECRETS_METADATA_PATH, action)] = Route(handler, Granted(permission), needs_key=True)
        for action, handler in policies.handlers().items():
            routes[(POLICY_PATH, action)] = Route(
                handler, Granted(POLICY_PERMISSIONS[action], SYSTEM_ACL), needs_key=True
            )
        self.routes = routes
        self._paths = {path for path, _ in routes} | set(self._closed)

    def __call__(self, request: ApiRequest) -> Reply:
        started = time.perf_counter()
        action = request.action()
        route = self.routes.get((request.path, action))
        reply: Reply
        if route is None and self._vault is not None and is_vault_path(request.path):
            decision, reply = self._vault(request)  # the Vault face: its own guards and answers
            if self._observer is not None:
                self._observe(self._observer, request, False, request.method, decision, reply, started)
            return reply
        decision, refusal = self._gate(route, request)
        if refusal is not None:
            reply = refusal
        else:
            assert route is not None
            reply = route.handler(request)
        if self._observer is not None:
            self._observe(self._observer, request, route is not None, action, decision, reply, started)
        return reply

    def screen(self, request: ApiRequest) -> ApiResponse | None:
        """Judge a request by its head, before its body is read: the refusal, or None to read on.

        The route, the action and the caller decide what the guards decide without a body (a role,
        a fixed system path, or whether any policy gives the caller the route's permission at all),
        so a caller with no business here is answered without its body ever being held.  A request
        let through is judged again, whole, when its body has come.
        """
        started = time.perf_counter()
        action = request.action()
        route = self.routes.get((request.path, action))
        if route is None and self._vault is not None and is_vault_path(request.path):
            return None  # judged whole by the Vault face, which needs the body (and the token) to decide
        decision, refusal = self._gate(route, request)
        if refusal is not None and self._observer is not None:
            self._observe(self._observer, request, route is not None, action, decision, refusal, started)
        return refusal

    def _gate(self, route: Route | None, request: ApiRequest) -> tuple[str, ApiResponse | None]:
        """(decision, refusal): what the route table and the guards say before any handler runs."""
        closed = self._closed.get(request.path)
        if closed is not None:  # whoever calls, as SPIKE's memory Nexus answers recover and restore
            return "closed", closed
        if route is None:
            if request.path in self._paths:
                return "no_route", refusals.POST_ONLY if request.method != "POST" else refusals.UNKNOWN_ACTION
            if is_spike_path(request.path):
                return "no_route", refusals.POST_ONLY if request.method != "POST" else refusals.NO_SUCH_SPIKE_ROUTE
            return "no_route", refusals.NO_SUCH_ROUTE
        if request.method != "POST":
            return "allowed", refusals.POST_ONLY
        if self._refused_outright(route.guard, request):
            log.info("refused %s for %s", request.path, request.peer or "a peer without SPIFFE ID")
            return "denied", refusals.REFUSED
        if route.needs_key and self._driver is not None and self._driver.custody.phase is not Phase.READY:
            # Before the key, policies cannot even be read: for a caller that a policy
            # might admit, nothing but "not ready" can be said.
            return "not_ready", refusals.not_ready(self._driver.custody.phase)
        try:
            admitted = self._admits(route.guard, request)
        except StorageError as exc:  # the policies could not be read: nothing is granted
            log.debug("cannot check %s for %s: %s", request.path, request.peer, exc)
            return "denied", refusals.unavailable(exc)
        if not admitted:
            log.info("refused %s for %s", request.path, request.peer or "a peer without SPIFFE ID")
            return "denied", refusals.REFUSED
        return "allowed", None

    def _refused_outright(self, guard: Guard, request: ApiRequest) -> bool:
        """A role guard needs no key: its refusal comes first.

        Policy-guarded (data) routes answer 503 to everyone until the key is
        verified: policies are sealed, so who may do what is not known before.
        """
        return isinstance(guard, Roles) and self._trust.role_of(request.peer) not in guard.roles

    def _admits(self, guard: Guard, request: ApiRequest) -> bool:
        if isinstance(guard, Roles):
            return self._trust.role_of(request.peer) in guard.roles
        if guard.path is not None:
            return self._authorizer.allows(request.peer, guard.permission, guard.path)
        return self._authorizer.may_ever(request.peer, guard.permission)

    @staticmethod
    def _observe(
        observer: Observer,
        request: ApiRequest,
        known: bool,
        action: str,
        decision: str,
        reply: Reply,
        started: float,
    ) -> None:
        call = ApiCall(request, known, action, decision)
        if isinstance(reply, ApiResponse):
            observer(call, reply.status, time.perf_counter() - started)
            return

        def done(future: Future[ApiResponse]) -> None:
            status = 500 if future.exception() is not None else future.result().status
            observer(call, status, time.perf_counter() - started)

        reply.add_done_callback(done)

    # -------------------------------------------------------------------- routes

    def status(self, request: ApiRequest) -> Reply:
        if self._driver is None:
            return ApiResponse.json(memory_status(time.time()))
        custody = self._driver.custody
        now_mono, now_wall = self._driver.now(), time.time()

        def wall(moment: float | None) -> float | None:
            return None if moment is None else now_wall - (now_mono - moment)

        def wall_of(moment: float) -> float:
            return now_wall - (now_mono - moment)

        record = custody.record
        keepers = [
            KeeperStatus(
                id=view.keeper_id,
                url=self._driver.keeper_urls.get(view.keeper_id, "no URL configured"),
                state=view.state.value,
                since=now_wall - (now_mono - view.since),
                detail=view.detail,
                polls=view.polls,
                empty_answers=view.empty_answers,
                failures=view.failures,
                reseeds=view.reseeds,
                last_poll=wall(view.last_poll_at),
                latency_ms=None if view.latency is None else round(view.latency * 1000, 3),
            )
            for view in custody.keepers()
        ]
        body = StatusBody(
            phase=custody.phase.value,
            epoch=record.epoch if record else None,
            threshold=custody.threshold,
            shares=record.shares if record else len(custody.keeper_ids),
            shards_needed=custody.shards_needed,
            redundancy=custody.redundancy if record else None,
            poll_interval=custody.schedule.interval,
            keepers=keepers,
            time=now_wall,
            highest_epoch=custody.highest_epoch if record else None,
            rotation=None if custody.rotation is None else rotation_status(custody.rotation, wall_of),
            schedule=None if self._lifecycle is None else self._lifecycle.schedule_status(),
            recovery=None if self._lifecycle is None else self._lifecycle.recovery_status(),
            shard_derivation=custody.derivation.value,
        )
        if self._lifecycle is None or custody.phase is not Phase.READY:
            return ApiResponse.json(body)
        # The data keys are counted from the rows: read as the store reads (off the loop on PostgreSQL).
        counted = self._lifecycle.keyring_status_soon()
        answer: Future[ApiResponse] = Future()

        def with_keyring(done: Future[KeyringStatusBody | None]) -> None:
            body.keyring = None if done.exception() is not None else done.result()
            answer.set_result(ApiResponse.json(body))

        counted.add_done_callback(with_keyring)
        return answer

    @property
    def _custodian(self) -> CustodyDriver:
        """The custody driver, for the routes that exist only with one (never in memory mode)."""
        if self._driver is None:
            raise LocalProtocolError("the memory backend has no key in custody")
        return self._driver

    def bootstrap_init(self, request: ApiRequest) -> ApiResponse:
        try:
            body = decode(request.body, InitRequest)
            record = self._record_to_install(body)
            changed = self._custodian.custody.check_initialise(record, replace=body.replace)
        except AlreadyInitialised as exc:
            log.warning("bootstrap refused: %s", exc)
            return refusals.conflict(
                "Nexus already has another key record: `spike bootstrap --force` replaces it "
                "(the secrets sealed under the old key become unreadable)"
            )
        except (RemoteProtocolError, LocalProtocolError) as exc:
            log.warning("bootstrap sent an unusable key record: %s", exc)
            return refusals.bad_request(f"the key record is unusable: {exc}")
        if changed:
            previous = self._custodian.custody.record
            try:
                # Persist first: a record Nexus acts on must survive a crash.  Atomic: with several
                # Nexus instances on one database, of two bootstraps at once only one record wins.
                installed = self._store.install_key_record(record, replace=previous if body.replace else None)
            except EpochUsed as exc:
                log.warning("bootstrap refused: %s", exc)
                return ApiResponse.error(409, ErrorCode.CONFLICT, reason=str(exc))
            except StorageError as exc:
                log.error("cannot install the key record: %s", exc)  # noqa: TRY400 - a one-line cause, not a bug
                return refusals.unavailable(exc)
            if installed != record:
                log.warning(
                    "bootstrap refused: the database already holds another key record (epoch %d), "
                    "installed through another Nexus instance; using it",
                    installed.epoch,
                )
                self.adopt(installed)
                return refusals.conflict(
                    f"another Nexus instance installed a key record (epoch {installed.epoch}) first: it is in use"
                )
            self._custodian.initialise(record, replace=body.replace)
            log.info(
                "key record for epoch %d installed by %s (%d-of-%d)",
                record.epoch,
                request.peer,
                record.threshold,
                record.shares,
            )
        elif body.dealt and self._custodian.custody.record == record:
            self._custodian.shards_dealt()
        return ApiResponse.json(InitResponse(changed=changed, epoch=record.epoch))

    def _record_to_install(self, body: InitRequest) -> KeyRecord:
        """The record as Nexus stores it: one replacing another knows every earlier epoch.

        Nexus, not the bootstrap, writes the history, from the record it replaces (the
        install below only succeeds if that one is still in force).  The record already in
        place, sent again, is that one: nothing changes.  Raises `LocalProtocolError` for
        a replacement whose epoch does not grow.
        """
        current = self._custodian.custody.record
        if current is None:
            return body.record
        if current.same_key(body.record):
            return current
        if not body.replace:
            return body.record  # refused as AlreadyInitialised by check_initialise
        return body.record.succeeding(current)

    @property
    def custody(self) -> NexusCustody:
        return self._custodian.custody

    def adopt(self, record: KeyRecord) -> bool:
        """Use the key record another Nexus instance installed: recover its key from the keepers."""
        custody = self._custodian.custody
        if custody.record == record:
            return False
        try:
            return self._custodian.initialise(record, replace=True)
        except (RemoteProtocolError, LocalProtocolError) as exc:
            log.error("the stored key record does not fit this Nexus: %s", exc)  # noqa: TRY400 - a one-line cause
            return False

    def bootstrap_verify(self, request: ApiRequest) -> ApiResponse:
        """spike's bootstrap seals under a key derived from the root key, with associated data; SPIKE's Go
        bootstrap under the raw root key without (and, having sent no key record, may find none here)."""
        custody = self._custodian.custody
        if custody.phase is Phase.UNINITIALISED:
            return self._verify_unrecorded(request)
        if custody.phase is not Phase.READY:
            return refusals.not_ready(custody.phase)
        try:
            body = decode(request.body, VerifyRequest)
            key = derive_key(custody.root_key, VERIFY_INFO)
            try:
                plaintext = AESGCM(key).decrypt(body.nonce, body.ciphertext, VERIFY_INFO)
            except InvalidTag:
                plaintext = AESGCM(custody.root_key.secret_bytes()).decrypt(body.nonce, body.ciphertext, None)
        except (RemoteProtocolError, InvalidTag, ValueError) as exc:
            log.warning("bootstrap verification failed: %s", exc.__class__.__name__)
            return refusals.bad_request("the verification ciphertext does not open under Nexus's root key")
        return ApiResponse.json(VerifyResponse(hash=hashlib.sha256(plaintext).hexdigest()))

    def _verify_unrecorded(self, request: ApiRequest) -> ApiResponse:
        """SPIKE's Go bootstrap: it dealt a key to the keepers itself and never sent a key record.

        The key the keepers' unlabelled shards rebuild (all of them on one polynomial) is adopted only if
        the verification opens under it; then its record is written and this Nexus's own shards of it are
        handed to the custody machine, which re-seeds every keeper with them (docs/spike-compatibility.md).
        """
        custody = self._custodian.custody
        try:
            body = decode(request.body, VerifyRequest)
        except RemoteProtocolError:
            return refusals.bad_request("the verification request is malformed")
        try:
            key = custody.adopt_unrecorded()
        except UnrecordedKeyRefused as exc:
            if exc.waiting:
                log.info("bootstrap verification without a key record: %s", exc)
                return refusals.NOT_INITIALISED  # SPIKE's Go bootstrap asks again
            log.warning("bootstrap verification refused: %s", exc)
            return refusals.bad_request(f"Nexus cannot adopt the keepers' key: {exc}")
        try:
            plaintext = AESGCM(key.secret_bytes()).decrypt(body.nonce, body.ciphertext, None)
        except (InvalidTag, ValueError) as exc:
            log.warning("bootstrap verification failed: %s", exc.__class__.__name__)
            return refusals.bad_request("the verification ciphertext does not open under the key the keepers hold")
        # Split the configured way: with --shard-derivation spike (SPIKE's Go deployments) the record commits to
        # the very shards Go bootstrap dealt, and a SPIKE Go Nexus can read the keepers after this one.
        record, shares = seal_key(
            key, epoch=1, threshold=custody.threshold, keeper_ids=custody.keeper_ids, derivation=custody.derivation
        )
        try:
            installed = self._store.install_key_record(record, replace=None)
        except EpochUsed as exc:
            log.warning("bootstrap refused: %s", exc)
            return refusals.conflict(str(exc))
        except StorageError as exc:
            log.error("cannot install the key record: %s", exc)  # noqa: TRY400 - a one-line cause, not a bug
            return refusals.unavailable(exc)
        if installed != record:
            self.adopt(installed)
            return refusals.conflict(
                f"another Nexus instance installed a key record (epoch {installed.epoch}) first: it is in use"
            )
        self._custodian.initialise(record, replace=False)
        for keeper_id in sorted(shares)[: record.threshold]:
            self._custodian.submit_shard(shares[keeper_id])
        log.warning(
            "adopted the root key SPIKE's Go bootstrap dealt to the keepers (%d-of-%d, now key epoch 1), "
            "verified by %s; the keepers are re-seeded with this Nexus's shards of it",
            record.threshold,
            record.shares,
            request.peer,
        )
        return ApiResponse.json(VerifyResponse(hash=hashlib.sha256(plaintext).hexdigest()))
