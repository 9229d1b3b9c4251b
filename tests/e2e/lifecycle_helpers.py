"""What the rotation tests with real processes share: secrets written and read back, a writer, a settled deployment."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from spike.app.api.messages import (
    SECRETS_PATH,
    SecretGetRequest,
    SecretGetResponse,
    SecretPutRequest,
    SecretPutResponse,
)
from spike.app.commands.client import NexusError
from tests.e2e.harness import Cluster, wait_until

ROTATION_TIMEOUT = 30.0


@dataclass
class Secrets:
    """What was acknowledged: path -> value (one version each)."""

    acked: dict[str, str] = field(default_factory=dict)
    in_doubt: set[str] = field(default_factory=set)

    def put(self, cluster: Cluster, count: int, prefix: str, nexus: int = 1) -> None:
        with cluster.client(nexus=nexus) as client:
            for n in range(count):
                path, value = f"{prefix}/{n}", f"{prefix}-value-{n}"
                client.call(SECRETS_PATH, SecretPutRequest(path=path, values={"v": value}), SecretPutResponse)
                self.acked[path] = value

    def check(self, cluster: Cluster, nexus: int = 1) -> None:
        """Every acknowledged secret reads back exactly (a first read may meet a connection to a killed Nexus)."""
        wrong = []
        with cluster.client(nexus=nexus, timeout=10.0) as client:
            for path, value in self.acked.items():
                for attempt in range(3):
                    try:
                        got = client.call(SECRETS_PATH, SecretGetRequest(path=path), SecretGetResponse, action="get")
                    except NexusError as exc:
                        if exc.status != 0 or attempt == 2:
                            wrong.append(f"{path}: {exc}")
                            break
                        continue
                    if got.data != {"v": value}:
                        wrong.append(f"{path}: acknowledged {value!r}, read {got.data!r}")
                    break
        assert not wrong, "\n".join(wrong[:20])


def writing(cluster: Cluster, book: Secrets, prefix: str, stop: threading.Event, nexus: int = 1) -> threading.Thread:
    """A writer putting fresh secrets until `stop` (while a rotation goes on): acknowledged ones go in `book`."""

    def run() -> None:
        n = 0
        while not stop.is_set():
            with cluster.client(nexus=nexus, timeout=5.0) as client:
                while not stop.is_set():
                    path, value = f"{prefix}/{n}", f"{prefix}-{n}"
                    n += 1
                    try:
                        client.call(SECRETS_PATH, SecretPutRequest(path=path, values={"v": value}), SecretPutResponse)
                    except NexusError as exc:
                        book.in_doubt.add(path)
                        stop.wait(0.05)
                        if exc.status == 0:
                            break
                    else:
                        book.acked[path] = value

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def settled(cluster: Cluster, epoch: int, nexus: int = 1, keepers: tuple[int, ...] | None = None) -> None:
    """READY at `epoch` with no rotation, and every keeper holding its shard of that epoch alone."""
    ids = tuple(cluster.keeper_ids) if keepers is None else keepers

    def done(s: dict[str, object]) -> bool:
        return s["phase"] == "ready" and s["epoch"] == epoch and s["rotation"] is None

    cluster.wait_status(done, f"ready at epoch {epoch}, no rotation", ROTATION_TIMEOUT, nexus)
    wait_until(
        lambda: all(cluster.held_epochs(k) == (epoch,) for k in ids),
        f"keepers {ids} holding epoch {epoch} alone",
        ROTATION_TIMEOUT,
        every=0.2,
    )
