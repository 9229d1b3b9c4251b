"""`spike nexus`: hold the root key, recover it from keepers, keep them seeded."""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import anyio
import msgspec

from spike.app import startup
from spike.app.api.messages import (
    IMPORT_PATH,
    MAX_BODY_BYTES,
    MAX_IMPORT_BYTES,
    POLICY_PATH,
    SECRETS_METADATA_PATH,
    SECRETS_PATH,
    KeyringStatusBody,
)
from spike.app.config import ConfigError, NexusConfig
from spike.app.identity import identity_source
from spike.app.memory import AfterFloods, Protection, protect
from spike.app.nexus.audit import AuditLog, secret_path_of
from spike.app.nexus.authorizer import Authorizer
from spike.app.nexus.cipher_api import CipherApi
from spike.app.nexus.cluster_watch import ClusterWatch
from spike.app.nexus.import_api import ImportApi
from spike.app.nexus.key_users import KeyUsers, OwnRecord, wrap_keyring
from spike.app.nexus.lifecycle import ExportFile, KeyLifecycle, LoopOffload
from spike.app.nexus.operator_api import OperatorApi
from spike.app.nexus.policy_api import PolicyApi
from spike.app.nexus.reload import reload_on_sighup
from spike.app.nexus.report_log import ReportLogger
from spike.app.nexus.routes import ApiCall, NexusApi, Reply, VaultFace
from spike.app.nexus.secrets_api import SecretsApi
from spike.app.nexus.summaries import Summaries
from spike.app.store.backend import Backend
from spike.app.store.policies import PolicyStore
from spike.app.store.sqlite import SqliteBackend
from spike.protocol.api import ApiRequest
from spike.protocol.effects import Report, StoreEffect
from spike.protocol.errors import LocalProtocolError, RemoteProtocolError
from spike.protocol.identity import Role, SpiffeId, TrustDomains
from spike.protocol.nexus import NexusCustody
from spike.protocol.pending import PendingRotation
from spike.protocol.record import KeyRecord
from spike.protocol.shamir import ShardDerivation
from spike.transports.custody_driver import CustodyDriver
from spike.transports.identity import IdentitySource
from spike.transports.runner import Listener, run_event_loop, serve
from spike.transports.server import ContextSource, HttpsServer, ServerLimits

if TYPE_CHECKING:
    from spike.app.nexus.metrics import NexusMetrics

log = logging.getLogger("spike.nexus")

# Bodies up to a cipher plaintext (1 MiB) plus its JSON and base64 overhead.
NEXUS_LIMITS = ServerLimits(
    max_body_bytes=MAX_BODY_BYTES,
    larger_bodies=((IMPORT_PATH, MAX_IMPORT_BYTES),),  # `spike migrate`: a whole deployment at once
    max_connections=1024,
    max_handshakes=128,
    max_silent=512,
    handshake_timeout=3.0,
)
METRICS_LIMITS = ServerLimits(max_body_bytes=0, max_header_bytes=8192, max_connections=64, max_handshakes=16)
# At the connection limit, operators and bootstrap take the place of workloads: whatever a workload
# does with its connections, `spike status` and `spike operator` still get in.
NEXUS_PREFERS = frozenset({Role.BOOTSTRAP, Role.PILOT_SUPERUSER, Role.PILOT_RECOVER, Role.PILOT_RESTORE})
# What runs beside the server for as long as it serves (the custody driver, the cluster watch, SIGHUP).
Background = Callable[[], Coroutine[Any, Any, None]]
# Several instances on one database: how often each reads what the others may have changed.
CLUSTER_WATCH_INTERVAL = 1.0


def nexus_server(context: ContextSource, api: NexusApi, trust: TrustDomains) -> HttpsServer:
    """Nexus's HTTPS server: the API, its limits, its judging of request heads, and who it prefers."""

    def preferred(peer: SpiffeId | None) -> bool:
        return trust.role_of(peer) in NEXUS_PREFERS

    return HttpsServer(context, api, NEXUS_LIMITS, prefer=preferred, screen=api.screen)


@runtime_checkable
class _StaleKeyHook(Protocol):
    on_stale_key: Callable[[], None]


def open_backend(config: NexusConfig) -> Backend:
    """PostgreSQL when a database URL is configured, else SQLite in the data dir."""
    if config.database_url:
        from spike.app.store.postgres import PostgresBackend

        return PostgresBackend(
            config.database_url,
            default_max_versions=config.max_secret_versions,
            read_cache_staleness=config.read_cache_staleness,
        )
    from spike.app.store.spike_layout import check_data_dir

    check_data_dir(config.data_dir)  # SPIKE Go's database there: one line, and it is not touched
    return SqliteBackend(config.data_dir, default_max_versions=config.max_secret_versions)


#: What SPIKE's lite backend does not serve: secrets and policies (its routeWithNoBackingStore).
LITE_CLOSED_PATHS = frozenset({SECRETS_PATH, SECRETS_METADATA_PATH, POLICY_PATH, IMPORT_PATH})


def close_for_lite(api: NexusApi) -> None:
    """SPIKE_NEXUS_BACKEND_STORE=lite: encryption as a service only, as SPIKE's lite backend.

    The secret and policy routes go; their paths stay known to the router, so a
    call to one answers 400 api_bad_request, what SPIKE's lite Nexus answers
    (its fallback route).  The cipher, bootstrap, status and operator routes stay.
    """
    for key in [key for key in api.routes if key[0] in LITE_CLOSED_PATHS]:
        del api.routes[key]
    log.warning(
        "lite backend (SPIKE_NEXUS_BACKEND_STORE=lite): encryption as a service only; "
        "the secret and policy APIs answer 400, the Vault face is off"
    )


class VaultOnFirstUse:
    """The Vault face, made at its first request (on the event loop, as every request is handled).

    Its modules are ~6 ms of Nexus's start (issue 20), and most Nexus never serve Vault's API.
    """

    def __init__(self, make: Callable[[], VaultFace]) -> None:
        self._make = make
        self._face: VaultFace | None = None

    def __call__(self, request: ApiRequest) -> tuple[str, Reply]:
        if self._face is None:
            self._face = self._make()
        return self._face(request)


class CallRecorder:
    """Every API call goes to the audit log and the request metrics."""

    def __init__(self, audit: AuditLog, metrics: NexusMetrics | None) -> None:
        self._audit = audit
        self._metrics = metrics

    def __call__(self, call: ApiCall, status: int, seconds: float) -> None:
        request = call.request
        route = f"{request.path}?action={call.action}" if call.action else request.path
        self._audit.record(
            caller=str(request.peer) if request.peer else "",
            route=request.path,
            action=call.action,
            path=secret_path_of(request.body, request.content_type),
            decision="denied" if status == 401 else call.decision,
            status=status,
            seconds=seconds,
        )
        if self._metrics is not None:
            self._metrics.api_request(route if call.known_route else "other", status, seconds)


def run(config: NexusConfig, reload: Callable[[], NexusConfig] | None = None) -> None:
    """Run Nexus until SIGTERM; `reload` reads the configuration again on SIGHUP (None: SIGHUP is ignored)."""
    # First of all, before the SVID's key, the root key or a secret is in memory.
    memory = protect(require_lock=config.require_memory_lock)
    trust = config.common.trust
    svid = config.common.svid
    # The identity first: a Nexus that cannot use its SVID must not touch its data dir.
    # New connections (to keepers, from clients) always take the current SVID.
    identity = identity_source(svid, trust).start()
    try:
        if config.backend == "memory":
            from spike.app.nexus.memory_mode import run_memory

            run_memory(config, identity, memory)
        else:
            _run(config, identity, memory, reload)
    finally:
        identity.stop()


def _fits(record: KeyRecord, config: NexusConfig) -> bool:
    return (
        set(record.keeper_ids) == set(config.keepers)
        and record.threshold == config.threshold
        and record.derivation is config.shard_derivation
    )


def _custody_lines(record: KeyRecord | None, config: NexusConfig, where: str) -> list[tuple[int, str]]:
    """What to say at start about a stored record that is not for the configured keepers and threshold."""
    if record is None or _fits(record, config):
        return []
    lines = [
        (
            logging.INFO,
            f"{where} holds a key record for keepers {list(record.keeper_ids)} with threshold {record.threshold} "
            f"and shard derivation {record.derivation.value}; the configuration says keepers "
            f"{sorted(config.keepers)} with threshold {config.threshold} and shard derivation "
            f"{config.shard_derivation.value}: custody moves there once the root key is rebuilt (a rekey)",
        )
    ]
    reachable = [k for k in record.keeper_ids if k in config.keeper_urls]
    if len(reachable) < record.threshold:
        missing = [k for k in record.keeper_ids if k not in config.keeper_urls]
        lines.append(
            (
                logging.ERROR,
                f"the key record needs {record.threshold} of keepers {list(record.keeper_ids)} to rebuild the root "
                f"key, and only {len(reachable)} of them have a URL: Nexus waits; give keepers "
                f"{', '.join(map(str, missing))} with --retiring-keepers (id=url) so custody can move away from them",
            )
        )
    return lines


def _ids_go_cannot_deal(config: NexusConfig) -> str | None:
    """With SPIKE's shard derivation, keeper ids SPIKE's Go Nexus would not deal to (it deals ids 1..n only)."""
    if config.shard_derivation is not ShardDerivation.SPIKE:
        return None
    outside = sorted(set(config.keepers) - set(range(1, len(config.keepers) + 1)))
    if not outside:
        return None
    return (
        f"--shard-derivation spike with keeper ids {', '.join(map(str, outside))} outside 1..{len(config.keepers)}: "
        "spike deals them SPIKE's bytes, but SPIKE's Go Nexus deals shares to ids 1..n only, so it could not take "
        "turns over these keepers (number them 1..n, or use the plain list form of the keeper peers)"
    )


class LiveUrls(Mapping[int, str]):
    """The keeper URLs in force, read where they are kept (the driver): a reload changes them for every reader."""

    def __init__(self, driver: Callable[[], CustodyDriver]) -> None:
        self._driver = driver

    def __getitem__(self, keeper_id: int) -> str:
        return self._driver().keeper_urls[keeper_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self._driver().keeper_urls)

    def __len__(self) -> int:
        return len(self._driver().keeper_urls)


class Stored(msgspec.Struct, frozen=True):
    """What the store held when Nexus started."""

    record: KeyRecord | None
    pending: PendingRotation | None
    highest_epoch: int


def _run(
    config: NexusConfig, identity: IdentitySource, memory: Protection, reload: Callable[[], NexusConfig] | None
) -> None:
    secrets = open_backend(config)
    try:
        record = secrets.load_key_record()
        pending, _, highest = secrets.load_rotation_state()
        audit = AuditLog.to_file(config.audit_log or config.data_dir / "audit.log")
    except BaseException:
        secrets.close()
        raise
    stored = Stored(record, pending, highest)
    offload = LoopOffload()

    def close() -> None:
        offload.close()  # a store write under way finishes
        secrets.close()  # lets queued writes finish their commit
        audit.close()

    async def serve_nexus(on_start: Callable[[], None]) -> None:
        # Made inside the event loop: the custody machine's clock is the loop's.
        await Nexus(config, identity, secrets, audit, stored, offload, reload).serve(on_start)

    serve_until_stopped(serve_nexus, memory, close, "Nexus stopped; the root key is gone from memory")


def serve_until_stopped(
    serve_nexus: Callable[[Callable[[], None]], Coroutine[Any, Any, None]],
    memory: Protection,
    close: Callable[[], None],
    stopped: str,
) -> None:
    """Run `serve_nexus(on_start)` on the event loop until it returns; `close` what it used in any case, and
    log `stopped` if it had started (a Nexus that could not start says why in one line, from the CLI)."""
    started = False

    def on_start() -> None:
        nonlocal started
        started = True
        memory.say("Nexus")

    try:
        run_event_loop(lambda: serve_nexus(on_start))
    finally:
        close()
        if started:
            log.info(stopped)


def _custody_machine(config: NexusConfig, stored: Stored, now: float) -> NexusCustody:
    try:
        return NexusCustody(
            config.keepers,
            threshold=config.threshold,
            schedule=config.schedule,
            rng=random.SystemRandom(),
            now=now,
            record=stored.record,
            pending=stored.pending,
            highest_epoch=stored.highest_epoch,
            # A stored record for other keepers or another threshold: the configuration changed, and
            # custody moves to it once the key is rebuilt from the record's keepers.
            rekey=stored.record is not None and not _fits(stored.record, config),
            random_bytes=os.urandom,
            derivation=config.shard_derivation,
        )
    except (LocalProtocolError, RemoteProtocolError) as exc:
        raise ConfigError(str(exc)) from None


class Nexus:
    """The parts of one running Nexus and how they are wired, made inside its event loop.

    Who tells whom: the custody driver's reports go to the key's users (store, cipher, policies),
    then to the log, the metrics, the key lifecycle and, with several instances, the cluster watch;
    the driver's store effects go to the key lifecycle, which performs them off the loop.
    """

    def __init__(
        self,
        config: NexusConfig,
        identity: IdentitySource,
        secrets: Backend,
        audit: AuditLog,
        stored: Stored,
        offload: LoopOffload,
        reload: Callable[[], NexusConfig] | None,
    ) -> None:
        self._config = config
        self._secrets = secrets
        self._stored = stored
        self._identity_context = identity.server_context
        trust = config.common.trust
        self.custody = _custody_machine(config, stored, anyio.current_time())
        self.urls = LiveUrls(lambda: self.driver)
        self.metrics = self._metrics() if config.metrics_bind is not None else None
        self.cipher = CipherApi(max_ciphertext=config.cipher_max_ciphertext)
        policies = PolicyStore(secrets)
        authorizer = Authorizer(trust, policies, lite_workloads=config.lite_workload_domains)
        sinks: list[Callable[[Report], None]] = [ReportLogger(log, self.urls, anyio.current_time)]
        if self.metrics is not None:
            sinks.append(self.metrics.report)
        self.driver = CustodyDriver(
            self.custody,
            config.keeper_urls,
            ssl_context=identity.client_context,
            trust=trust,
            on_report=KeyUsers(self.custody, secrets, self.cipher, authorizer, sinks),
            on_answer=None if self.metrics is None else self.metrics.keeper_request,
            on_store=self._on_store,
        )
        self.lifecycle = KeyLifecycle(
            self.driver,
            secrets,
            wrap_keyring=wrap_keyring(secrets),
            offload=offload,
            to_wall=_to_wall,
            rotate_every=config.rotate_every,
            crash_at=config.crash_at,
            # Every other instance reads the stored rotation before the commit (ClusterWatch, each second).
            follow_window=2 * CLUSTER_WATCH_INTERVAL + 0.5 if secrets.shared else 0.0,
            exports=ExportFile(config.data_dir),
            reads=secrets.read,
        )
        sinks.append(self.lifecycle.report)
        self.api = self._api(secrets, policies, authorizer, audit)
        if config.backend == "lite":
            close_for_lite(self.api)
        self.background: list[Background] = [self.driver.run]
        if secrets.shared:
            self.background.append(self._watch_cluster(authorizer, sinks))
        else:
            sinks.append(OwnRecord(self.driver))
        if reload is not None:
            self.background.append(partial(reload_on_sighup, config, reload, self.driver, self.lifecycle))

    def _api(self, secrets: Backend, policies: PolicyStore, authorizer: Authorizer, audit: AuditLog) -> NexusApi:
        config = self._config
        return NexusApi(
            self.driver,
            secrets,
            config.common.trust,
            secrets=SecretsApi(secrets, authorizer),
            cipher=self.cipher,
            operator=OperatorApi(self.driver, on_export=self.lifecycle.note_export),
            policies=PolicyApi(policies, authorizer),
            importer=ImportApi(policies, authorizer.invalidate),
            authorizer=authorizer,
            observer=CallRecorder(audit, self.metrics),
            lifecycle=self.lifecycle,
            vault=None if config.backend == "lite" else VaultOnFirstUse(partial(self._vault, secrets, authorizer)),
        )

    def _vault(self, secrets: Backend, authorizer: Authorizer) -> VaultFace:
        from spike.app.nexus.vault.face import VaultApi

        config = self._config
        return VaultApi(
            store=secrets,
            authorizer=authorizer,
            cipher=self.cipher,
            custody=lambda: self.custody,
            storage_type="postgresql" if config.database_url else "sqlite",
            mount=config.vault_kv_mount,
            token_ttl=config.vault_token_ttl,
        )

    def _metrics(self) -> NexusMetrics:
        # prometheus_client is imported only when metrics are asked for: it costs start-up time.
        from spike.app.nexus.metrics import NexusMetrics

        return NexusMetrics(
            lambda: self.custody,
            self.urls,
            anyio.current_time,
            keyring=self._keyring_counts,
            read_cache=self._secrets.read_cache,
        )

    def _keyring_counts(self) -> KeyringStatusBody | None:
        return self.lifecycle.refresh_keyring()

    def _on_store(self, effect: StoreEffect) -> None:
        self.lifecycle.on_store(effect)

    def _watch_cluster(
        self, authorizer: Authorizer, sinks: list[Callable[[Report], None]]
    ) -> Callable[[], Coroutine[Any, Any, None]]:
        watch = ClusterWatch(self._secrets, self.api, self.driver, authorizer, CLUSTER_WATCH_INTERVAL)
        sinks.append(watch.report)
        if isinstance(self._secrets, _StaleKeyHook):
            from anyio import from_thread, lowlevel

            # A write found the key replaced: look now (called on the writer thread).
            token = lowlevel.current_token()
            self._secrets.on_stale_key = lambda: from_thread.run_sync(watch.poke, token=token)
        return watch.run

    def _listening(self, host: str, port: int) -> None:
        record, pending, config = self._stored.record, self._stored.pending, self._config
        if record is None:
            log.info("no key record in %s: waiting for `spike bootstrap`", self._secrets.description)
        else:
            log.info("key record for epoch %d found: recovering the root key from keepers", record.epoch)
            if pending is not None:
                log.info(
                    "key rotation %d -> %d is stored: it resumes once a root key is rebuilt",
                    pending.from_epoch,
                    pending.record.epoch,
                )
        for level, line in _custody_lines(record, config, self._secrets.description):
            log.log(level, "%s", line)
        if (odd := _ids_go_cannot_deal(config)) is not None:
            log.warning("%s", odd)
        log.info(
            "Nexus listening on %s:%d; polling %d keepers every %gs (pid %d)",
            host,
            port,
            len(self.custody.keeper_ids),
            config.schedule.interval,
            os.getpid(),
        )
        self.lifecycle.arm_schedule()

    async def serve(self, on_start: Callable[[], None]) -> None:
        """Serve until SIGTERM; `on_start` runs once the API listens.  The key is forgotten however it ends."""
        config = self._config
        extra = []
        if config.metrics_bind is not None and self.metrics is not None:
            extra.append(
                Listener(
                    config.metrics_bind,
                    HttpsServer(None, self.metrics.handler, METRICS_LIMITS),
                    lambda host, port: log.info("metrics, /healthz and /readyz on http://%s:%d", host, port),
                )
            )
        server = nexus_server(self._identity_context, self.api, config.common.trust)
        summaries = Summaries(
            self.driver,
            self.urls,
            waiting_every=config.waiting_summary_every,
            keepers_every=config.keeper_summary_every,
        )
        after_floods = AfterFloods(server)

        def every_second() -> None:
            summaries()
            after_floods()

        def listening(host: str, port: int) -> None:
            on_start()
            self._listening(host, port)
            startup.listening()

        try:
            await serve(
                config.bind,
                server,
                background=self.background,
                periodic=every_second,
                on_listening=listening,
                extra=extra,
                grace=config.shutdown_grace,
            )
        finally:
            self.custody.forget(anyio.current_time())
            self._secrets.lock()
            self.cipher.lock()


def _to_wall(moment: float) -> float:
    """A moment of the event loop's clock on the wall clock."""
    return time.time() - (anyio.current_time() - moment)
