"""`spike keeper`: serve one shard from memory, to Nexus only."""

from __future__ import annotations

import logging

from spike.app.config import KeeperConfig
from spike.protocol.api import ApiRequest, ApiResponse
from spike.protocol.keeper import MAX_KEEPER_BODY, Keeper, KeeperChange
from spike.transports.identity import identity_source
from spike.transports.runner import run_event_loop, serve
from spike.transports.server import HttpsServer, ServerLimits

log = logging.getLogger("spike.keeper")

# A keeper talks to one Nexus per instance and, briefly, to bootstrap: a few connections.  The
# cap also bounds what a flood of silent TLS clients can cost it (stock asyncio keeps a
# 256 KiB buffer per connection; keepers run without uvloop to stay small).
KEEPER_LIMITS = ServerLimits(
    max_body_bytes=MAX_KEEPER_BODY, max_header_bytes=8192, max_connections=64, handshake_timeout=5.0
)


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
    keeper = Keeper(config.common.trust)
    identity = identity_source(config.common.svid, config.common.trust).start()
    # Each new connection gets the current SVID: a rotation needs no restart.
    server = HttpsServer(identity.server_context, KeeperHandler(keeper), KEEPER_LIMITS)

    started = False

    def listening(host: str, port: int) -> None:
        nonlocal started
        started = True
        log.info("keeper listening on %s:%d (empty until Nexus or bootstrap seeds it)", host, port)

    try:
        run_event_loop(lambda: serve(config.bind, server, on_listening=listening), fast=False)
    finally:
        keeper.forget()
        identity.stop()
        if started:  # a keeper that could not start says so in one line, from the CLI
            log.info("keeper stopped; its shard is gone from memory")
