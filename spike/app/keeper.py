"""`spike keeper`: serve one shard from memory, to Nexus only."""

from __future__ import annotations

import logging

from spike.app import startup
from spike.app.config import KeeperConfig
from spike.app.identity import identity_source
from spike.app.memory import protect
from spike.protocol.api import ApiRequest, ApiResponse
from spike.protocol.identity import NexusIdentity, Role, SpiffeId, TrustDomains
from spike.protocol.keeper import MAX_KEEPER_BODY, Keeper, KeeperChange
from spike.transports.runner import run_event_loop, serve
from spike.transports.server import ContextSource, HttpsServer, ServerLimits

log = logging.getLogger("spike.keeper")

# A keeper talks to one Nexus per instance and, briefly, to bootstrap: a few connections.  The
# caps also bound what a flood of clients that never finish TLS can cost it (stock asyncio keeps
# a 256 KiB buffer per handshake; keepers run without uvloop to stay small); sockets that send
# nothing cost only a file descriptor while they wait.
KEEPER_LIMITS = ServerLimits(
    max_body_bytes=MAX_KEEPER_BODY,
    max_header_bytes=8192,
    max_connections=64,
    max_handshakes=32,
    max_silent=128,
    handshake_timeout=3.0,
)
# At the connection limit, Nexus and bootstrap take the place of any other peer: nobody else has
# anything to ask a keeper, and a restarted Nexus must reach its keepers whoever holds connections.
KEEPER_PREFERS = frozenset({Role.NEXUS, Role.BOOTSTRAP})


def keeper_server(context: ContextSource, keeper: Keeper, trust: TrustDomains) -> HttpsServer:
    """The keeper's HTTPS server: its handler, its limits, and its preference for Nexus and bootstrap."""

    def preferred(peer: SpiffeId | None) -> bool:
        return trust.role_of(peer) in KEEPER_PREFERS

    return HttpsServer(context, KeeperHandler(keeper), KEEPER_LIMITS, prefer=preferred)


class KeeperHandler:
    """Runs the keeper machine and logs what changed (never the shard)."""

    def __init__(self, keeper: Keeper) -> None:
        self.keeper = keeper

    def __call__(self, request: ApiRequest) -> ApiResponse:
        outcome = self.keeper.handle(request)
        if outcome.change is KeeperChange.STORED:
            log.info("shard stored (from %s)", request.peer, extra={"event": "shard_stored"})
        elif outcome.change is KeeperChange.REPLACED:
            log.warning("shard replaced by a different one (from %s)", request.peer, extra={"event": "shard_replaced"})
        elif outcome.change is KeeperChange.FORGOTTEN:
            log.info("shard forgotten on request (from %s)", request.peer, extra={"event": "shard_forgotten"})
        if outcome.refused:
            log.info(
                "refused %s from %s: %s",
                request.path,
                request.peer or "a peer without SPIFFE ID",
                outcome.refused,
            )
        return outcome.response


def run(config: KeeperConfig) -> None:
    # First of all, before the SVID's key or a shard is in memory.
    memory = protect(require_lock=config.require_memory_lock)
    keeper = Keeper(config.common.trust)
    identity = identity_source(config.common.svid, config.common.trust).start()
    # Each new connection gets the current SVID: a rotation needs no restart.
    server = keeper_server(identity.server_context, keeper, config.common.trust)

    started = False

    def listening(host: str, port: int) -> None:
        nonlocal started
        started = True
        memory.say("keeper")
        trust = config.common.trust
        if trust.nexus_identity is NexusIdentity.SPIKE:
            log.warning(
                "--nexus-identity spike: any ID below spiffe://%s/spike/nexus is taken for Nexus and may read "
                "and replace this keeper's shard (SPIKE's Go keeper's rule); register nothing else there",
                trust.nexus,
            )
        log.info("keeper listening on %s:%d (empty until Nexus or bootstrap seeds it)", host, port)
        startup.listening()

    try:
        run_event_loop(lambda: serve(config.bind, server, on_listening=listening), fast=False)
    finally:
        keeper.forget()
        identity.stop()
        if started:  # a keeper that could not start says so in one line, from the CLI
            log.info("keeper stopped; its shard is gone from memory")
