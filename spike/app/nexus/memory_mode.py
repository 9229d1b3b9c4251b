"""`spike nexus` on the memory backend (SPIKE_NEXUS_BACKEND_STORE=memory): SPIKE's development Nexus.

No keepers and no custody: the root key is drawn at start from the operating
system's random source, handed to the store (which makes its keyring from it)
and to nobody else: never dealt, written or logged, gone when the process
ends.  Secrets and policies live in an in-memory database (store/memory.py)
with the same KV and policy rules as the other backends.  The routes of a key
in custody (bootstrap, recover, restore, rotate) answer 400 with the reason;
status says the backend is memory and nothing is kept.

The custody state machine is not used at all: a Nexus that pretends to hold
shards of a key nobody can rebuild would have status, summaries and metrics
describe keepers that do not exist.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable

import anyio

from spike.app import startup
from spike.app.config import NexusConfig
from spike.app.memory import AfterFloods, Protection
from spike.app.nexus.audit import AuditLog
from spike.app.nexus.authorizer import Authorizer
from spike.app.nexus.cipher_api import CipherApi
from spike.app.nexus.policy_api import PolicyApi
from spike.app.nexus.routes import NexusApi, Observer
from spike.app.nexus.secrets_api import SecretsApi
from spike.app.store.memory import MemoryBackend
from spike.app.store.policies import PolicyStore
from spike.protocol.identity import TrustDomains
from spike.protocol.material import RootKey
from spike.transports.identity import IdentitySource
from spike.transports.runner import serve

log = logging.getLogger("spike.nexus")

#: Said at start, at warning level, whatever the log level lets through below it.
NOTHING_KEPT = (
    "memory backend (SPIKE_NEXUS_BACKEND_STORE=memory): NOTHING IS KEPT. Secrets and policies live in this "
    "process's memory only and are lost when it stops; no keepers, no key record, no recovery. "
    "For development and tests, never for data you need"
)


def run_memory(config: NexusConfig, identity: IdentitySource, memory: Protection) -> None:
    """Serve until SIGTERM with nothing kept; the in-memory database is freed as the process ends."""
    from spike.app.nexus.server import CallRecorder, serve_until_stopped

    secrets = MemoryBackend(default_max_versions=config.max_secret_versions)
    try:
        # An audit log only where one is asked for: with no data dir, nothing is written anywhere by default.
        audit = AuditLog.to_file(config.audit_log) if config.audit_log is not None else AuditLog()
    except BaseException:
        secrets.close()
        raise

    def close() -> None:
        secrets.close()  # the last connection: SQLite frees the database
        audit.close()

    async def serve_nexus(on_start: Callable[[], None]) -> None:
        await MemoryNexus(config, identity, secrets, CallRecorder(audit, None)).serve(on_start)

    serve_until_stopped(serve_nexus, memory, close, "Nexus stopped; its memory backend's secrets and policies are gone")


def memory_api(
    secrets: MemoryBackend,
    trust: TrustDomains,
    cipher: CipherApi,
    *,
    lite_workloads: tuple[str, ...] = (),
    observer: Observer | None = None,
) -> NexusApi:
    """Nexus's API over `secrets`, unlocked at once with a key drawn now and held by the store alone."""
    policies = PolicyStore(secrets)
    authorizer = Authorizer(trust, policies, lite_workloads=lite_workloads)
    key = RootKey(os.urandom(32))  # the process's key: the store keeps its own copy, this one is wiped
    try:
        secrets.unlock(key, 0)
    finally:
        key.wipe()
    cipher.unlock(lambda: secrets.keyring().cipher_key)
    authorizer.invalidate()
    return NexusApi(
        None,
        secrets,
        trust,
        secrets=SecretsApi(secrets, authorizer),
        cipher=cipher,
        operator=None,
        policies=PolicyApi(policies, authorizer),
        authorizer=authorizer,
        observer=observer,
    )


class MemoryNexus:
    """The parts of a memory-backend Nexus: the API over the in-memory store, unlocked from the start."""

    def __init__(
        self,
        config: NexusConfig,
        identity: IdentitySource,
        secrets: MemoryBackend,
        observer: Observer,
    ) -> None:
        self._config = config
        self._identity = identity
        self._secrets = secrets
        self.cipher = CipherApi(max_ciphertext=config.cipher_max_ciphertext)
        self.api = memory_api(
            secrets, config.common.trust, self.cipher, lite_workloads=config.lite_workload_domains, observer=observer
        )

    async def serve(self, on_start: Callable[[], None]) -> None:
        from spike.app.nexus.server import nexus_server

        config = self._config
        server = nexus_server(self._identity.server_context, self.api, config.common.trust)
        after_floods = AfterFloods(server)

        def listening(host: str, port: int) -> None:
            on_start()
            log.warning("%s", NOTHING_KEPT, extra={"event": "memory_backend"})
            log.info("Nexus listening on %s:%d; memory backend, no keepers (pid %d)", host, port, os.getpid())
            startup.listening()

        try:
            await serve(
                config.bind,
                server,
                background=[_sighup_changes_nothing],
                periodic=after_floods,
                on_listening=listening,
                grace=config.shutdown_grace,
            )
        finally:
            self._secrets.lock()
            self.cipher.lock()


async def _sighup_changes_nothing() -> None:
    """SIGHUP reloads a Nexus's configuration; here it must not end the process (and lose every secret)."""
    with anyio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            log.warning("SIGHUP: the memory backend reloads nothing (a restart applies settings, and loses the data)")
