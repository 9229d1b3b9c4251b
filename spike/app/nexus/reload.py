"""SIGHUP: a running Nexus reads its configuration again and applies what it can without a restart."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import anyio

from spike.app.config import ConfigError, NexusConfig
from spike.app.nexus.lifecycle import KeyLifecycle
from spike.transports.custody_driver import CustodyDriver

log = logging.getLogger("spike.nexus")


# What a SIGHUP reload applies; the rest needs a restart (said when it changed).
RELOADED = ("keepers", "retiring_keepers", "threshold", "rotate_every")


async def reload_on_sighup(
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
                    name
                    for name in fresh.__struct_fields__
                    if name not in RELOADED and name != "common" and getattr(fresh, name) != getattr(previous, name)
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
