"""``sys/health``, ``sys/seal-status`` and the mount look-up Vault's CLIs make, from spike's custody phase.

Vault is *sealed* until it has its key; spike's Nexus is "sealed" the same way
until it has rebuilt and verified its root key from t keepers (or operators'
recovery shards): ``t``/``n`` are the threshold and the number of keepers, and
``progress`` the verified shards collected so far.  Before `spike bootstrap`
Nexus is not initialised.  Load balancers, Kubernetes probes and dashboards
built for Vault read these as they are.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from spike import __version__
from spike.app.nexus.vault import envelope
from spike.app.nexus.vault.request import BadRequest, VaultRequest, parse_int
from spike.protocol.api import ApiResponse
from spike.protocol.effects import Phase
from spike.protocol.nexus import NexusCustody

CLUSTER_NAME = "spike"
VERSION = f"spike-{__version__}"


class SysPaths:
    def __init__(self, custody: Callable[[], NexusCustody], storage_type: str, mounts: dict[str, dict[str, Any]]):
        self._custody = custody
        self._storage_type = storage_type
        self._mounts = mounts  # "secret/" -> what sys/internal/ui/mounts says of it

    def health(self, request: VaultRequest) -> ApiResponse:
        """Vault's codes: 200 active, 503 sealed, 501 not initialised (each can be chosen by a parameter)."""
        custody = self._custody()
        phase = custody.phase
        initialised, sealed = phase is not Phase.UNINITIALISED, phase is not Phase.READY
        try:
            if not initialised:
                status = self._code(request, "uninitcode", 501)
            elif sealed:
                status = self._code(request, "sealedcode", 503)
            else:
                status = self._code(request, "activecode", 200)
        except BadRequest as exc:
            return envelope.errors(400, str(exc))
        body: dict[str, Any] = {
            "initialized": initialised,
            "sealed": sealed,
            "standby": False,  # every Nexus instance serves reads and writes: none stands by
            "performance_standby": False,
            "replication_performance_mode": "disabled",
            "replication_dr_mode": "disabled",
            "server_time_utc": int(time.time()),
            "version": VERSION,
        }
        if not sealed:
            body.update(cluster_name=CLUSTER_NAME, cluster_id=self._cluster_id(custody))
        return ApiResponse.json(body, status)

    @staticmethod
    def _code(request: VaultRequest, name: str, default: int) -> int:
        text = request.query.get(name)
        if text is None:
            return default
        code = parse_int(text, name)
        if not 100 <= code <= 599:
            raise BadRequest(f"{name} must be an HTTP status code")
        return code

    def seal_status(self, request: VaultRequest) -> ApiResponse:
        custody = self._custody()
        phase = custody.phase
        initialised, sealed = phase is not Phase.UNINITIALISED, phase is not Phase.READY
        threshold = custody.threshold if initialised else 0
        body: dict[str, Any] = {
            "type": "shamir",
            "initialized": initialised,
            "sealed": sealed,
            "t": threshold,
            "n": len(custody.keeper_ids) if initialised else 0,
            "progress": max(0, threshold - custody.shards_needed) if initialised and sealed else 0,
            "nonce": "",
            "version": VERSION,
            "build_date": "",
            "migration": False,
            "recovery_seal": False,
            "storage_type": self._storage_type,
        }
        if not sealed:
            body.update(cluster_name=CLUSTER_NAME, cluster_id=self._cluster_id(custody))
        return ApiResponse.json(body)

    @staticmethod
    def _cluster_id(custody: NexusCustody) -> str:
        record = custody.record
        return "" if record is None else f"epoch-{record.epoch}"

    def leader(self) -> ApiResponse:
        """`vault status` asks this once unsealed: no HA cluster, every Nexus instance is active."""
        return ApiResponse.json(
            {
                "ha_enabled": False,
                "is_self": False,
                "active_time": "0001-01-01T00:00:00Z",
                "leader_address": "",
                "leader_cluster_address": "",
                "performance_standby": False,
                "performance_standby_last_remote_wal": 0,
            }
        )

    def ui_mount(self, request: VaultRequest, path: str) -> ApiResponse:
        """Which mount serves `path`, and what it is: the CLIs' ``kv`` commands ask before anything else."""
        for mount, info in self._mounts.items():
            if path == mount.rstrip("/") or path.startswith(mount):
                return envelope.ok(info)
        return envelope.errors(
            403,
            "preflight capability check returned 403, please ensure client's policies grant access to path "
            f'"{path.rstrip("/")}/"',
        )
