"""`spike nexus`: hold the root key, recover it from keepers, keep them seeded."""

from __future__ import annotations

import logging
import os
import random

import anyio

from spike.protocol.effects import KeyRecovered, Phase, PhaseChanged, Report
from spike.protocol.errors import LocalProtocolError
from spike.protocol.nexus import NexusCustody
from spike.transports.custody_driver import CustodyDriver, ReportSink
from spike.transports.identity import IdentitySource, identity_source
from spike.transports.runner import serve
from spike.transports.server import HttpsServer, ServerLimits

from .cipher_api import MAX_PLAINTEXT, CipherApi
from .config import ConfigError, NexusConfig
from .logs import ReportLogger
from .nexus_api import NexusApi
from .sealing import Sealer
from .secret_store import SecretStore
from .secrets_api import SecretsApi
from .storage import NexusStore

log = logging.getLogger("spike.nexus")

WAITING_SUMMARY_EVERY = 30.0


class WaitingSummary:
    """While Nexus cannot rebuild its key, say so periodically, with what is missing."""

    def __init__(self, driver: CustodyDriver, every: float = WAITING_SUMMARY_EVERY) -> None:
        self._driver = driver
        self._every = every
        self._last = -float("inf")
        self._waiting_since: float | None = None

    def __call__(self) -> None:
        custody = self._driver.custody
        now = self._driver.now()
        if custody.phase is Phase.READY:
            self._waiting_since = None
            return
        if self._waiting_since is None:
            self._waiting_since = now
        # A normal recovery or bootstrap takes a poll or two: only a wait longer
        # than that is news.
        if now - self._waiting_since < 2 * custody.schedule.interval or now - self._last < self._every:
            return
        self._last = now
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


# Bodies up to a cipher plaintext (1 MiB) plus its JSON and base64 overhead.
NEXUS_LIMITS = ServerLimits(max_body_bytes=MAX_PLAINTEXT * 4 // 3 + 4096)


class KeyUsers:
    """Passes reports on, and hands the verified key to what needs it (and takes it back)."""

    def __init__(self, custody: NexusCustody, secrets: SecretStore, cipher: CipherApi, then: ReportSink) -> None:
        self._custody = custody
        self._secrets = secrets
        self._cipher = cipher
        self._then = then

    def __call__(self, report: Report) -> None:
        if isinstance(report, KeyRecovered):
            key = self._custody.root_key
            self._secrets.unlock(Sealer(key), report.epoch)
            self._cipher.unlock(key)
        elif isinstance(report, PhaseChanged) and report.previous is Phase.READY:
            self._secrets.lock()
            self._cipher.lock()
        self._then(report)


def run(config: NexusConfig) -> None:
    # The identity first: a Nexus that cannot use its SVID must not touch its data dir.
    with identity_source(config.common.svid, config.common.trust) as identity:
        _run(config, identity)


def _run(config: NexusConfig, identity: IdentitySource) -> None:
    trust = config.common.trust
    # Every new connection, to keepers or from clients, asks for the current SVID.
    ssl_client = identity.client_context
    ssl_server = identity.server_context
    store = NexusStore(config.data_dir)
    record = store.load_key_record()
    if record is not None and (set(record.keeper_ids) != set(config.keepers) or record.threshold != config.threshold):
        raise ConfigError(
            f"the data dir {config.data_dir} was initialised for keepers {list(record.keeper_ids)} "
            f"with threshold {record.threshold}, but the configuration says keepers "
            f"{sorted(config.keepers)} with threshold {config.threshold}"
        )

    secrets = SecretStore(config.data_dir)
    started = False

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
            )
        except LocalProtocolError as exc:
            raise ConfigError(str(exc)) from None
        cipher = CipherApi()
        keys = KeyUsers(custody, secrets, cipher, ReportLogger(log, config.keepers, anyio.current_time))
        driver = CustodyDriver(custody, config.keepers, ssl_context=ssl_client, trust=trust, on_report=keys)
        api = NexusApi(driver, store, trust, secrets=SecretsApi(secrets), cipher=cipher)
        server = HttpsServer(ssl_server, api, NEXUS_LIMITS)

        def listening(host: str, port: int) -> None:
            nonlocal started
            started = True
            if record is None:
                log.info("no key record in %s: waiting for `spike bootstrap`", config.data_dir)
            else:
                log.info("key record for epoch %d found: recovering the root key from keepers", record.epoch)
            log.info(
                "Nexus listening on %s:%d; polling %d keepers every %gs (pid %d)",
                host,
                port,
                len(config.keepers),
                config.schedule.interval,
                os.getpid(),
            )

        try:
            await serve(
                config.bind,
                server,
                background=[driver.run],
                periodic=WaitingSummary(driver),
                on_listening=listening,
            )
        finally:
            custody.forget(anyio.current_time())

    try:
        anyio.run(main)
    finally:
        secrets.close()  # lets queued writes finish their commit
        store.close()
        if started:  # a Nexus that could not start says so in one line, from the CLI
            log.info("Nexus stopped; the root key is gone from memory")
