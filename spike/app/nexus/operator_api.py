"""Nexus's break-glass routes: export every shard (recover role), take shards back one by one (restore role).

Nothing about a shard is ever logged: lines name the caller, the shard id and the progress.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from spike.app.api.messages import RecoverResponse, RestorationStatus, RestoreRequest
from spike.app.nexus import refusals
from spike.app.nexus.dialect import speaks_spike_go
from spike.protocol.api import ApiRequest, ApiResponse
from spike.protocol.effects import Phase
from spike.protocol.errors import LocalProtocolError, RemoteProtocolError, ShamirError
from spike.protocol.material import Share
from spike.protocol.nexus import DuplicateShare, ShareRejected
from spike.protocol.wire import ErrorCode, decode
from spike.transports.custody_driver import CustodyDriver

log = logging.getLogger("spike.nexus.operator")


class OperatorApi:
    def __init__(self, driver: CustodyDriver, on_export: Callable[[int], None] | None = None) -> None:
        self._driver = driver
        self._on_export = on_export  # told the key epoch of every export (spike status says how old it is)

    def recover(self, request: ApiRequest) -> ApiResponse:
        custody = self._driver.custody
        record = custody.record
        if custody.phase is not Phase.READY or record is None:
            return refusals.not_ready(custody.phase)
        shares = custody.export_shards()
        log.warning(
            "recovery shards exported to %s (key epoch %d)",
            request.peer,
            record.epoch,
            extra={"event": "shards_exported", "epoch": record.epoch},
        )
        if self._on_export is not None:
            self._on_export(record.epoch)
        shards = {i: list(s.secret_bytes()) for i, s in shares.items()}
        return ApiResponse.json(RecoverResponse(shards=shards, epoch=record.epoch))

    def restore(self, request: ApiRequest) -> ApiResponse:
        custody = self._driver.custody
        record = custody.record
        if record is None:
            log.info("restore refused: no key record (bootstrap first)")
            return ApiResponse.error(
                503,
                ErrorCode.NOT_READY,
                "it has no key record (a new data directory?): restore needs the data directory the shards belong to",
            )
        if custody.phase is Phase.READY:
            return self._already_restored(request)
        try:
            body = decode(request.body, RestoreRequest)
            share = Share(body.id, record.epoch, bytes(body.shard))
            progress = self._driver.submit_shard(share)
        except (RemoteProtocolError, ShamirError) as exc:
            log.info("restore refused: malformed shard: %s", exc)
            return refusals.bad_request("the shard is malformed (check the id and the 32 bytes of the shard)")
        except DuplicateShare as exc:
            log.info("restore refused: %s", exc)
            if speaks_spike_go(request):
                # SPIKE's Go Nexus answers a shard it holds already with the progress so far.
                needed = custody.shards_needed
                return ApiResponse.json(
                    RestorationStatus(collected=max(0, custody.threshold - needed), remaining=needed, restored=False)
                )
            return refusals.conflict(str(exc))
        except ShareRejected as exc:
            log.warning("restore refused: %s", exc)
            return refusals.bad_request(f"{exc}: it is not a shard of this deployment's key")
        except LocalProtocolError as exc:  # the key came back (from the keepers) since the phase was read
            log.info("restore refused: %s", exc)
            if self._driver.custody.phase is Phase.READY:
                return self._already_restored(request)
            return refusals.conflict(f"Nexus cannot take a shard now: {exc}")
        log.info(
            "recovery shard %d accepted from %s: %d more needed",
            share.id,
            request.peer,
            progress.needed,
            extra={"event": "shard_restored"},
        )
        return ApiResponse.json(
            RestorationStatus(collected=progress.accepted, remaining=progress.needed, restored=progress.ready)
        )

    def _already_restored(self, request: ApiRequest) -> ApiResponse:
        """A shard for a Nexus that holds its verified key: 409 for spike's CLI, SPIKE's 200 "restored" for Go's."""
        log.info("restore refused: Nexus already holds its root key")
        if speaks_spike_go(request):
            threshold = self._driver.custody.threshold
            return ApiResponse.json(RestorationStatus(collected=threshold, remaining=0, restored=True))
        return refusals.conflict("Nexus already holds its verified root key: there is nothing to restore")
