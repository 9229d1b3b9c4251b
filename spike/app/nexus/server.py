"""`spike nexus`: hold the root key, recover it from keepers, keep them seeded."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import anyio

from spike.app.config import KEEPER_SUMMARY_EVERY, WAITING_SUMMARY_EVERY, ConfigError, NexusConfig
from spike.app.identity import identity_source
from spike.app.logs import ReportLogger, wall_time
from spike.app.memory import AfterFloods, Protection, protect
from spike.app.nexus.audit import AuditLog, secret_path_of
from spike.app.nexus.authorizer import Authorizer
from spike.app.nexus.cipher_api import MAX_PLAINTEXT, CipherApi
from spike.app.nexus.lifecycle import ExportFile, KeyLifecycle, LoopOffload
from spike.app.nexus.operator_api import OperatorApi
from spike.app.nexus.policy_api import PolicyApi
from spike.app.nexus.routes import ApiCall, NexusApi
from spike.app.nexus.secrets_api import SecretsApi
from spike.app.nexus.vault.face import VaultApi
from spike.app.store.backend import Backend, ClusterState, SecretBackend
from spike.app.store.errors import StorageError
from spike.app.store.policies import PolicyStore
from spike.app.store.sqlite import SqliteBackend
from spike.protocol.effects import (
    KeeperState,
    KeyRecovered,
    NewerKeySeen,
    Phase,
    PhaseChanged,
    Report,
    RotationProgress,
    RotationStage,
)
from spike.protocol.errors import LocalProtocolError, RemoteProtocolError
from spike.protocol.identity import Role, SpiffeId, TrustDomains
from spike.protocol.material import RootKey
from spike.protocol.nexus import NexusCustody
from spike.protocol.pending import PendingRotation
from spike.protocol.record import KeyRecord
from spike.transports.custody_driver import CustodyDriver
from spike.transports.identity import IdentitySource
from spike.transports.runner import Listener, run_event_loop, serve
from spike.transports.server import ContextSource, HttpsServer, ServerLimits

if TYPE_CHECKING:
    from spike.app.nexus.metrics import NexusMetrics

log = logging.getLogger("spike.nexus")

# Bodies up to a cipher plaintext (1 MiB) plus its JSON and base64 overhead.
NEXUS_LIMITS = ServerLimits(
    max_body_bytes=MAX_PLAINTEXT * 4 // 3 + 4096,
    max_connections=1024,
    max_handshakes=128,
    max_silent=512,
    handshake_timeout=3.0,
)
METRICS_LIMITS = ServerLimits(max_body_bytes=0, max_header_bytes=8192, max_connections=64, max_handshakes=16)
# At the connection limit, operators and bootstrap take the place of workloads: whatever a workload
# does with its connections, `spike status` and `spike operator` still get in.
NEXUS_PREFERS = frozenset({Role.BOOTSTRAP, Role.PILOT_SUPERUSER, Role.PILOT_RECOVER, Role.PILOT_RESTORE})
# Several instances on one database: how often each reads what the others may have changed.
CLUSTER_WATCH_INTERVAL = 1.0


def nexus_server(context: ContextSource, api: NexusApi, trust: TrustDomains) -> HttpsServer:
    """Nexus's HTTPS server: the API, its limits, its judging of request heads, and who it prefers."""

    def preferred(peer: SpiffeId | None) -> bool:
        return trust.role_of(peer) in NEXUS_PREFERS

    return HttpsServer(context, api, NEXUS_LIMITS, prefer=preferred, screen=api.screen)


class Summaries:
    """What stays wrong is said again now and then, never once per poll.

    While Nexus cannot rebuild its key it says so every `waiting_every`
    seconds (30 s by default; the first time after the couple of polls a
    normal recovery takes); while a keeper stays without its shard, every
    `keepers_every` seconds (5 minutes).
    """

    def __init__(
        self,
        driver: CustodyDriver,
        urls: Mapping[int, str],
        *,
        waiting_every: float = WAITING_SUMMARY_EVERY,
        keepers_every: float = KEEPER_SUMMARY_EVERY,
    ) -> None:
        self._driver = driver
        self._urls = urls
        self._waiting_every = waiting_every
        self._keepers_every = keepers_every
        self._last_waiting = -float("inf")
        self._last_keepers = -float("inf")
        self._waiting_since: float | None = None

    def __call__(self) -> None:
        custody = self._driver.custody
        now = self._driver.now()
        if custody.phase is Phase.READY:
            self._waiting_since = None
            self._keepers(custody, now)
            return
        if self._waiting_since is None:
            self._waiting_since = now
        if now - self._waiting_since < 2 * custody.schedule.interval:
            return
        if now - self._last_waiting < self._waiting_every:
            return
        self._last_waiting = now
        states = ", ".join(f"{v.keeper_id}={v.state.value}" for v in custody.keepers())
        if custody.phase is Phase.UNINITIALISED:
            log.info("not initialised: waiting for `spike bootstrap` (keepers: %s)", states)
        else:
            log.warning(
                "waiting for shards: %d more verified shard(s) needed of %d (keepers: %s); polling continues every %gs",
                custody.shards_needed,
                custody.threshold,
                states,
                custody.schedule.interval,
            )

    def _keepers(self, custody: NexusCustody, now: float) -> None:
        lasting = [
            v for v in custody.keepers() if v.state is not KeeperState.HOLDING and now - v.since >= self._keepers_every
        ]
        if not lasting or now - self._last_keepers < self._keepers_every:
            return
        self._last_keepers = now
        for view in lasting:
            log.warning(
                "keeper %d (%s) still %s since %s (%d polls, %d empty, %d failed); shard redundancy %d",
                view.keeper_id,
                self._urls.get(view.keeper_id, "no URL configured"),
                view.state.value.replace("_", " "),
                wall_time(view.since, self._driver.now),
                view.polls,
                view.empty_answers,
                view.failures,
                custody.redundancy,
                extra={"keeper_id": view.keeper_id, "event": "keeper_summary"},
            )


class KeyUsers:
    """Passes reports on, and hands the verified key to what needs it (and takes it back)."""

    def __init__(
        self,
        custody: NexusCustody,
        secrets: SecretBackend,
        cipher: CipherApi,
        authorizer: Authorizer,
        then: list[Callable[[Report], None]],
    ) -> None:
        self._custody = custody
        self._secrets = secrets
        self._cipher = cipher
        self._authorizer = authorizer
        self._then = then

    def __call__(self, report: Report) -> None:
        if isinstance(report, KeyRecovered):
            record = self._custody.record
            assert record is not None  # a key is recovered for a record
            # The record's key and epoch, whichever epoch in play was rebuilt (a rotation's opens the other).
            secrets = self._secrets
            secrets.unlock(self._custody.root_key, record.epoch)
            self._cipher.unlock(lambda: secrets.keyring().cipher_key)
            self._authorizer.invalidate()  # policies are sealed: readable only now
        elif (
            isinstance(report, RotationProgress)
            and report.stage is RotationStage.COMMITTED
            and self._custody.phase is Phase.READY
        ):
            # The new key is in force (this instance's commit, or one it followed): the keyring is now
            # the one wrapped under it.  The data keys are the same: nothing is re-encrypted.
            self._secrets.unlock(self._custody.root_key, report.to_epoch)
        elif isinstance(report, PhaseChanged) and report.previous is Phase.READY:
            self._secrets.lock()
            self._cipher.lock()
            self._authorizer.clear()
        for sink in self._then:
            sink(report)


class OwnRecord:
    """One Nexus on its own store (SQLite): its key record is the deployment's newest.

    Nobody else writes the record, so a keeper showing a shard of a newer
    epoch holds garbage (the bootstrap identity may contribute any label):
    the custody machine is told at once, and reports and re-seeds it.
    """

    def __init__(self, driver: CustodyDriver) -> None:
        self._driver = driver

    def __call__(self, report: Report) -> None:
        if isinstance(report, NewerKeySeen):
            self._driver.confirm_record(report.at)


class ClusterWatch:
    """Several Nexus instances on one database: notice what the others changed.

    Every `interval` seconds, and at once when a keeper shows a shard of a key
    epoch newer than this instance's record or a write finds the key replaced,
    it reads the stored key record and the policy change counter (off the
    event loop) and then, on the loop:

    * a record installed through another instance (`spike bootstrap` talked to
      it): this one adopts it and recovers the root key from the keepers;
    * a record replaced through another instance (`bootstrap --force`): this one
      drops its key at once and recovers the new one from the keepers;
    * the stored record is this instance's own, and a keeper showed a newer
      epoch before the read began: that epoch was never the deployment's (a
      record is stored before its shards are dealt), so the custody machine
      reports and re-seeds the keeper (`confirm_record`);
    * policies changed through another instance: the authorizer reloads them
      before its next check.  A policy change made through one instance is in
      force on every other within `interval` (plus one read).
    """

    def __init__(
        self, backend: Backend, api: NexusApi, driver: CustodyDriver, authorizer: Authorizer, interval: float
    ) -> None:
        self._backend = backend
        self._api = api
        self._driver = driver
        self._authorizer = authorizer
        self._interval = interval
        self._policy_version: int | None = None
        self._refused: object = None
        self._refused_pending: PendingRotation | None = None
        self._newer_seen_at: float | None = None  # the latest sighting no read has answered yet
        self._wake = anyio.Event()

    def poke(self) -> None:
        """Look now (event loop thread only)."""
        self._wake.set()

    def report(self, report: Report) -> None:
        if isinstance(report, NewerKeySeen):
            # Another instance's bootstrap --force, or garbage: the stored record tells which.
            self._newer_seen_at = report.at
            self.poke()

    async def run(self) -> None:
        from anyio import to_thread  # only a shared (PostgreSQL) store is watched: SQLite starts without it

        while True:
            with anyio.move_on_after(self._interval):
                await self._wake.wait()
            self._wake = anyio.Event()
            checked_at = self._driver.now()  # the read below sees every record stored before this
            try:
                state = await to_thread.run_sync(self._backend.cluster_state, abandon_on_cancel=True)
            except StorageError:
                continue  # an outage: logged once by the backend; data routes answer 503 meanwhile
            self.apply(state, checked_at)

    def apply(self, state: ClusterState, checked_at: float | None = None) -> None:
        """Act on what the store holds; `checked_at` is when the read of `state` began (driver clock)."""
        custody = self._api.custody
        record = state.record
        if record is not None and record not in (custody.record, self._refused):
            previous = custody.record
            followed = custody.rotation
            if self._api.adopt(record):
                if followed is not None and followed.to_epoch == record.epoch and custody.phase is Phase.READY:
                    log.info(
                        "key rotation %d -> %d committed through another Nexus instance: its key, already held, "
                        "is in force",
                        followed.from_epoch,
                        record.epoch,
                    )
                elif previous is None:
                    log.info(
                        "key record for epoch %d installed through another Nexus instance: "
                        "recovering the root key from keepers",
                        record.epoch,
                    )
                else:
                    log.warning(
                        "key record replaced through another Nexus instance (epoch %d -> %d): "
                        "the old key is dropped; recovering the new one from keepers",
                        previous.epoch,
                        record.epoch,
                    )
            else:
                self._refused = record  # said once, in adopt's log line
        if record is not None and record == custody.record:
            self._follow(state.pending)
        seen = self._newer_seen_at
        if seen is not None and checked_at is not None and seen <= checked_at:
            self._newer_seen_at = None
            # While a rotation is stored, a newer epoch on a keeper is that rotation's (followed above),
            # never garbage: only the record alone proves that no newer epoch existed.
            if record is not None and record == custody.record and state.pending is None:
                self._driver.confirm_record(checked_at)  # otherwise the keepers were read for another record
        if self._policy_version is not None and state.policy_version != self._policy_version:
            self._authorizer.invalidate()
        self._policy_version = state.policy_version

    def _follow(self, pending: PendingRotation | None) -> None:
        """Follow another instance's rotation as the store shows it (docs/key-lifecycle.md section 8)."""
        custody = self._api.custody
        under_way = custody.rotation
        if under_way is not None and under_way.stage is not RotationStage.FOLLOWING:
            return  # this instance's own rotation: the store's compare-and-set settles any other
        if pending is None:
            if under_way is not None:
                self._driver.follow_rotation(None)
            return
        if (under_way is not None and under_way.to_epoch == pending.record.epoch) or pending == self._refused_pending:
            return
        try:
            self._driver.follow_rotation(pending)
        except (RemoteProtocolError, LocalProtocolError) as exc:
            self._refused_pending = pending  # said once
            log.error("cannot follow the key rotation stored by another Nexus instance: %s", exc)  # noqa: TRY400


@runtime_checkable
class _StaleKeyHook(Protocol):
    on_stale_key: Callable[[], None]


def open_backend(config: NexusConfig) -> Backend:
    """PostgreSQL when a database URL is configured, else SQLite in the data dir."""
    if config.database_url:
        from spike.app.store.postgres import PostgresBackend

        return PostgresBackend(config.database_url)
    return SqliteBackend(config.data_dir)


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
        _run(config, identity, memory, reload)
    finally:
        identity.stop()


def _fits(record: KeyRecord, config: NexusConfig) -> bool:
    return set(record.keeper_ids) == set(config.keepers) and record.threshold == config.threshold


def _custody_lines(record: KeyRecord | None, config: NexusConfig, where: str) -> list[tuple[int, str]]:
    """What to say at start about a stored record that is not for the configured keepers and threshold."""
    if record is None or _fits(record, config):
        return []
    lines = [
        (
            logging.INFO,
            f"{where} holds a key record for keepers {list(record.keeper_ids)} with threshold {record.threshold}; "
            f"the configuration says keepers {sorted(config.keepers)} with threshold {config.threshold}: "
            "custody moves there once the root key is rebuilt (a rekey)",
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


def _run(
    config: NexusConfig, identity: IdentitySource, memory: Protection, reload: Callable[[], NexusConfig] | None
) -> None:
    trust = config.common.trust
    secrets = open_backend(config)
    try:
        record = secrets.load_key_record()
        pending, _, highest = secrets.load_rotation_state()
        audit = AuditLog.to_file(config.audit_log or config.data_dir / "audit.log")
    except BaseException:
        secrets.close()
        raise
    started = False
    offload = LoopOffload()

    async def main() -> None:
        # The machine's clock must be the event loop's, so it is created inside the loop.
        try:
            custody = NexusCustody(
                config.keepers,
                threshold=config.threshold,
                schedule=config.schedule,
                rng=random.SystemRandom(),
                now=anyio.current_time(),
                record=record,
                pending=pending,
                highest_epoch=highest,
                # A stored record for other keepers or another threshold: the configuration changed, and
                # custody moves to it once the key is rebuilt from the record's keepers.
                rekey=record is not None and not _fits(record, config),
                random_bytes=os.urandom,
            )
        except (LocalProtocolError, RemoteProtocolError) as exc:
            raise ConfigError(str(exc)) from None
        driver_ref: list[CustodyDriver] = []
        lifecycle_ref: list[KeyLifecycle] = []
        urls = LiveUrls(lambda: driver_ref[0])
        metrics = None
        if config.metrics_bind is not None:
            # prometheus_client is imported only when metrics are asked for: it costs start-up time.
            from spike.app.nexus.metrics import NexusMetrics

            metrics = NexusMetrics(
                lambda: custody,
                urls,
                anyio.current_time,
                keyring=lambda: lifecycle_ref[0].refresh_keyring(),  # noqa: PLW0108 - made below
            )
        cipher = CipherApi()
        policies = PolicyStore(secrets)
        authorizer = Authorizer(trust, policies)
        sinks: list[Callable[[Report], None]] = [ReportLogger(log, urls, anyio.current_time)]
        if metrics is not None:
            sinks.append(metrics.report)
        driver = CustodyDriver(
            custody,
            config.keeper_urls,
            ssl_context=identity.client_context,
            trust=trust,
            on_report=KeyUsers(custody, secrets, cipher, authorizer, sinks),
            on_answer=None if metrics is None else metrics.keeper_request,
            on_store=lambda effect: lifecycle_ref[0].on_store(effect),  # noqa: PLW0108 - made just below
        )
        driver_ref.append(driver)

        def to_wall(moment: float) -> float:
            return time.time() - (anyio.current_time() - moment)

        lifecycle = KeyLifecycle(
            driver,
            secrets,
            wrap_keyring=wrap_keyring(secrets),
            offload=offload,
            to_wall=to_wall,
            rotate_every=config.rotate_every,
            crash_at=config.crash_at,
            # Every other instance reads the stored rotation before the commit (ClusterWatch, each second).
            follow_window=2 * CLUSTER_WATCH_INTERVAL + 0.5 if secrets.shared else 0.0,
            exports=ExportFile(config.data_dir),
            reads=secrets.read,
        )
        lifecycle_ref.append(lifecycle)
        sinks.append(lifecycle.report)
        api = NexusApi(
            driver,
            secrets,
            trust,
            secrets=SecretsApi(secrets, authorizer),
            cipher=cipher,
            operator=OperatorApi(driver, on_export=lifecycle.note_export),
            policies=PolicyApi(policies, authorizer),
            authorizer=authorizer,
            observer=CallRecorder(audit, metrics),
            lifecycle=lifecycle,
            vault=VaultApi(
                store=secrets,
                authorizer=authorizer,
                cipher=cipher,
                custody=lambda: custody,
                storage_type="postgresql" if config.database_url else "sqlite",
                mount=config.vault_kv_mount,
                token_ttl=config.vault_token_ttl,
            ),
        )
        background = [driver.run]
        if not secrets.shared:
            sinks.append(OwnRecord(driver))
        if secrets.shared:
            watch = ClusterWatch(secrets, api, driver, authorizer, CLUSTER_WATCH_INTERVAL)
            sinks.append(watch.report)
            if isinstance(secrets, _StaleKeyHook):
                from anyio import from_thread, lowlevel

                # A write found the key replaced: look now (called on the writer thread).
                token = lowlevel.current_token()
                secrets.on_stale_key = lambda: from_thread.run_sync(watch.poke, token=token)
            background.append(watch.run)
        if reload is not None:
            background.append(partial(_reload_on_sighup, config, reload, driver, lifecycle))
        extra = []
        if config.metrics_bind is not None and metrics is not None:
            extra.append(
                Listener(
                    config.metrics_bind,
                    HttpsServer(None, metrics.handler, METRICS_LIMITS),
                    lambda host, port: log.info("metrics, /healthz and /readyz on http://%s:%d", host, port),
                )
            )

        def listening(host: str, port: int) -> None:
            nonlocal started
            started = True
            memory.say("Nexus")
            if record is None:
                log.info("no key record in %s: waiting for `spike bootstrap`", secrets.description)
            else:
                log.info("key record for epoch %d found: recovering the root key from keepers", record.epoch)
                if pending is not None:
                    log.info(
                        "key rotation %d -> %d is stored: it resumes once a root key is rebuilt",
                        pending.from_epoch,
                        pending.record.epoch,
                    )
            for level, line in _custody_lines(record, config, secrets.description):
                log.log(level, "%s", line)
            log.info(
                "Nexus listening on %s:%d; polling %d keepers every %gs (pid %d)",
                host,
                port,
                len(custody.keeper_ids),
                config.schedule.interval,
                os.getpid(),
            )
            lifecycle.arm_schedule()

        server = nexus_server(identity.server_context, api, trust)
        summaries = Summaries(
            driver,
            urls,
            waiting_every=config.waiting_summary_every,
            keepers_every=config.keeper_summary_every,
        )
        after_floods = AfterFloods(server)

        def every_second() -> None:
            summaries()
            after_floods()

        try:
            await serve(
                config.bind,
                server,
                background=background,
                periodic=every_second,
                on_listening=listening,
                extra=extra,
                grace=config.shutdown_grace,
            )
        finally:
            custody.forget(anyio.current_time())
            secrets.lock()
            cipher.lock()

    try:
        run_event_loop(main)
    finally:
        offload.close()  # a store write under way finishes
        secrets.close()  # lets queued writes finish their commit
        audit.close()
        if started:  # a Nexus that could not start says so in one line, from the CLI
            log.info("Nexus stopped; the root key is gone from memory")


def wrap_keyring(secrets: Backend) -> Callable[[RootKey, int], bytes]:
    """The keyring in force, wrapped under a rotation's new root key (stored with the pending rotation)."""

    def wrap(key: RootKey, epoch: int) -> bytes:
        return secrets.keyring().wrap(key, epoch)

    return wrap


# What a SIGHUP reload applies; the rest needs a restart (said when it changed).
_RELOADED = ("keepers", "retiring_keepers", "threshold", "rotate_every")


async def _reload_on_sighup(
    started_with: NexusConfig, reload: Callable[[], NexusConfig], driver: CustodyDriver, lifecycle: KeyLifecycle
) -> None:
    """SIGHUP: read the configuration again; move custody, change keeper URLs and the rotation schedule."""
    current: list[NexusConfig | None] = [started_with]
    with anyio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            try:
                fresh = reload()
            except ConfigError as exc:
                log.error("SIGHUP: configuration not reloaded, the one in force stays: %s", exc)  # noqa: TRY400
                continue
            previous = current[0]
            current[0] = fresh
            if previous is not None:
                ignored = [
                    f.name
                    for f in dataclasses.fields(fresh)
                    if f.name not in _RELOADED
                    and f.name != "common"
                    and getattr(fresh, f.name) != getattr(previous, f.name)
                ]
                if ignored:
                    log.warning("SIGHUP: %s changed: that takes a restart", ", ".join(ignored))
            log.info(
                "SIGHUP: configuration reloaded: keepers %s, threshold %d, rotation %s",
                sorted(fresh.keepers),
                fresh.threshold,
                "off" if fresh.rotate_every is None else f"every {fresh.rotate_every:g}s",
            )
            driver.set_keeper_urls(fresh.keeper_urls)
            lifecycle.set_rotate_every(fresh.rotate_every)
            lifecycle.move_custody(fresh.keepers, fresh.threshold)
