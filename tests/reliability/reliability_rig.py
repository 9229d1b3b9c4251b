"""Shared pieces of the reliability tier: proxied clusters, probes, and the leak watch with its scanner.

`ProxiedCluster` is the end-to-end harness's `Cluster` with an optional
`FaultProxy` in front of every keeper: Nexus is configured with the proxies'
ports, the keepers listen on their own, and the test still reaches each
keeper directly (`read_shard`, as Nexus would) to know the truth.

`LeakWatch` collects, as the tests run, every secret value (each carries
the session's random token, so one search finds them all), every shard read
from a keeper and every root key rebuilt from them, plus the directories
the tests wrote.  `scan` looks for them in every form a leak could take.
"""

from __future__ import annotations

import base64
import contextlib
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from spike.app.commands.client import fetch_status, nexus_connection
from spike.app.commands.devca import DevIdentity
from spike.app.errors import CommandError
from spike.app.store.sqlite_schema import NexusStore
from spike.protocol.material import Share
from spike.protocol.shamir import combine
from spike.transports.blocking import ClientSession
from spike.transports.client import TransportError
from spike.transports.tls import client_context
from tests.e2e.harness import Cluster, HarnessError, pick_port
from tests.reliability.faultproxy import FaultProxy, ProxyLoop

# What the tests of this tier print at the end of the run (counts, inputs tried): see conftest.py.
REPORT: list[str] = []

# ---------------------------------------------------------------------- clusters


@dataclass
class ProxiedCluster(Cluster):
    """A `Cluster` whose Nexus reaches keeper i through `proxies[i]` (when `proxied`)."""

    proxied: bool = False
    proxies: dict[int, FaultProxy] = field(default_factory=dict)
    proxy_loop: ProxyLoop | None = None
    peer_override: dict[int, str] = field(default_factory=dict)  # keeper id -> URL (a fake keeper)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.proxied:
            self.proxy_loop = ProxyLoop()
            for keeper_id in self.keeper_ids:
                self.proxies[keeper_id] = FaultProxy(
                    self.proxy_loop, self.keeper_ports[keeper_id], port=pick_port(), name=f"keeper {keeper_id}"
                )

    @property
    def peers(self) -> str:
        def url(keeper_id: int) -> str:
            if keeper_id in self.peer_override:
                return self.peer_override[keeper_id]
            if keeper_id in self.proxies:
                return self.proxies[keeper_id].url
            return self.keeper_url(keeper_id)

        return ",".join(f"{i}={url(i)}" for i in self.keeper_ids)

    def close(self) -> None:
        super().close()
        for proxy in self.proxies.values():
            proxy.close()
        if self.proxy_loop is not None:
            self.proxy_loop.close()


@contextlib.contextmanager
def ready_cluster(identity: DevIdentity, root: Path, leak_watch: LeakWatch, label: str) -> Iterator[ProxiedCluster]:
    """Real keeper and Nexus processes (2-of-3), bootstrapped, every keeper holding its shard.

    Its files, and its shards and key at the end, go to the secrets sweep under `label`.
    """
    cluster = ProxiedCluster(identity, root)
    leak_watch.add_dir(cluster.root)
    try:
        cluster.start_ready()
        yield cluster
    finally:
        leak_watch.add_cluster(cluster, label)
        cluster.close()


class StatusProbe:
    """Nexus's status as `spike status --format json` reads it, from one long-lived client (cheap to call often)."""

    def __init__(self, cluster: Cluster, timeout: float = 3.0) -> None:
        self._session = ClientSession(client_context(cluster.identity.files("pilot-superuser")), timeout=timeout)
        self._nexus = nexus_connection(self._session, cluster.nexus_url, cluster.trust)
        self.last_error = ""

    def get(self) -> dict[str, Any] | None:
        try:
            return msgspec.to_builtins(fetch_status(self._nexus))  # type: ignore[no-any-return]
        except (TransportError, CommandError) as exc:
            self.last_error = str(exc)
            return None

    def close(self) -> None:
        self._session.close()


class ShardProbe:
    """Reads keepers' shards directly (not through any proxy), acting as Nexus."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self._session = ClientSession(client_context(cluster.identity.files("nexus")), timeout=2.0)

    def read(self, keeper_id: int) -> Share | str | None:
        """The keeper's shard, None if it is empty, or a string saying why it could not be read."""
        try:
            return self._cluster.read_shard(keeper_id, self._session)
        except (TransportError, HarnessError) as exc:
            return f"unreadable: {exc}"

    def close(self) -> None:
        self._session.close()


# ---------------------------------------------------------------------- the leak watch


class LeakWatch:
    """What no file written by the session may contain, and where the tests wrote."""

    def __init__(self, basetemp: Path) -> None:
        self.basetemp = basetemp
        self.token = "RLV" + secrets.token_hex(8).upper()  # in every secret value the tests write
        self.values = 0
        self.binary: dict[str, bytes] = {}  # shards and keys, by a name for the report
        self.dirs: list[Path] = []
        self._lock = threading.Lock()
        self.sources: dict[str, int] = {}  # which tests registered what, for the report

    def value(self, label: str = "") -> str:
        """A fresh secret value: the session token, a label and 16 random hex digits."""
        with self._lock:
            self.values += 1
        return f"{self.token}-{label}-{secrets.token_hex(8)}"

    def add_secret(self, name: str, secret: bytes, source: str = "") -> None:
        with self._lock:
            self.binary[name] = bytes(secret)
            if source:
                self.sources[source] = self.sources.get(source, 0) + 1

    def add_dir(self, directory: Path) -> None:
        with self._lock:
            if directory not in self.dirs:
                self.dirs.append(directory)

    def add_shards(self, shards: dict[int, Share], label: str, threshold: int | None = None) -> None:
        for keeper_id, share in shards.items():
            self.add_secret(f"{label} keeper {keeper_id} epoch {share.epoch} shard", share.secret_bytes(), label)
        if threshold is not None and len(shards) >= threshold:
            key = combine(list(shards.values())[:threshold], threshold)
            try:
                self.add_secret(f"{label} root key", key.secret_bytes(), label)
            finally:
                key.wipe()

    def add_cluster(self, cluster: Cluster, label: str) -> None:
        """Best effort at teardown: every live keeper's shard and the key they rebuild."""
        self.add_dir(cluster.root)
        with contextlib.suppress(Exception):
            shards = cluster.read_shards()
            store = NexusStore(cluster.data_dir)
            try:
                record = store.load_key_record()
            finally:
                store.close()
            self.add_shards(shards, label, record.threshold if record is not None else None)

    def keep_copy(self, directory: Path, into: Path) -> Path:
        """Copy a directory that will vanish (a tmpfs) into the session's tmp tree, for the final sweep."""
        target = into / f"kept-{directory.name}"
        shutil.copytree(directory, target, dirs_exist_ok=True)
        self.add_dir(target)
        return target


def files_under(directories: Iterable[Path]) -> list[Path]:
    found: set[Path] = set()
    for directory in directories:
        if directory.is_file():
            found.add(directory)
        elif directory.is_dir():
            found.update(p for p in directory.rglob("*") if p.is_file() and not p.is_symlink())
    return sorted(found)


# ---------------------------------------------------------------------- the scanner

STRIDE = 4  # windows of the binary secrets start every 4 bytes ...
WINDOW = 8  # ... and are 8 long: any leak of 11 or more consecutive bytes contains one


def _windows(secret: bytes) -> list[bytes]:
    return [secret[i : i + WINDOW] for i in range(0, len(secret) - WINDOW + 1, STRIDE)]


def _b64_pieces(data: bytes, encode: Any) -> list[bytes]:
    """Pieces of `data`'s base64 that appear whatever the alignment it was encoded at."""
    pieces = []
    for shift in range(3):
        text = encode(b"\0" * shift + data)
        # Skip the characters that depend on the padding bytes; keep 12-character runs of the rest.
        body = text[4:-4]
        pieces.extend(body[i : i + 12] for i in range(0, max(1, len(body) - 12), 8))
    return [p for p in pieces if len(p) == 12]


_HEX_RUN = re.compile(rb"[0-9A-Fa-f]{16,}")
_B64_RUN = re.compile(rb"[A-Za-z0-9+/_\-]{12,}")
_INT_LIST = re.compile(rb"\d{1,3}(?:, ?\d{1,3}){7,}")
_BIG_INT = re.compile(rb"\d{60,}")


@dataclass
class Needles:
    """Everything to look for, prepared once for a set of secrets."""

    token_forms: list[tuple[str, bytes]]
    raw: list[tuple[str, bytes]]
    hex_windows: dict[bytes, str]  # lower-case hex of a window -> secret name
    b64: dict[bytes, str]  # a 12-character piece of a secret's base64 -> what it is
    int_windows: dict[bytes, str]  # the raw window bytes -> name (for int lists)
    integers: list[tuple[str, bytes]]

    @classmethod
    def build(cls, token: str, binary: dict[str, bytes]) -> Needles:
        raw_token = token.encode()
        token_forms = [
            ("value token", raw_token),
            ("value token as hex", raw_token.hex().encode()),
            ("value token as HEX", raw_token.hex().upper().encode()),
        ]
        for name, enc in (("base64", base64.b64encode), ("base64url", base64.urlsafe_b64encode)):
            token_forms += [(f"value token as {name}", p) for p in _b64_pieces(raw_token, enc)]
        raw, integers = [], []
        b64: dict[bytes, str] = {}
        hex_windows: dict[bytes, str] = {}
        int_windows: dict[bytes, str] = {}
        for name, secret in binary.items():
            for window in _windows(secret):
                raw.append((f"{name} as raw bytes", window))
                hex_windows[window.hex().encode()] = name
                int_windows[window] = name
            for form, enc in (("base64", base64.b64encode), ("base64url", base64.urlsafe_b64encode)):
                b64.update((p, f"{name} as {form}") for p in _b64_pieces(secret, enc))
            integers.append((f"{name} as an integer", str(int.from_bytes(secret, "big")).encode()))
        return cls(token_forms, raw, hex_windows, b64, int_windows, integers)


def scan_bytes(data: bytes, needles: Needles) -> set[str]:
    """The names (with forms) of what `data` holds."""
    hits: set[str] = set()
    for what, needle in needles.token_forms:
        if needle in data:
            hits.add(what)
    for what, needle in needles.raw:
        if needle in data:
            hits.add(what)
    for match in _HEX_RUN.finditer(data):
        run = match.group().lower()
        for i in range(len(run) - 2 * WINDOW + 1):
            name = needles.hex_windows.get(run[i : i + 2 * WINDOW])
            if name is not None:
                hits.add(f"{name} as hex")
    if needles.b64:
        for match in _B64_RUN.finditer(data):
            run = match.group()
            for i in range(len(run) - 11):
                what = needles.b64.get(run[i : i + 12])
                if what is not None:
                    hits.add(what)
    for match in _INT_LIST.finditer(data):
        numbers = [int(n) for n in re.findall(rb"\d+", match.group())]
        if any(n > 255 for n in numbers):
            continue
        as_bytes = bytes(numbers)
        for i in range(len(as_bytes) - WINDOW + 1):
            name = needles.int_windows.get(as_bytes[i : i + WINDOW])
            if name is not None:
                hits.add(f"{name} as a list of ints")
    for match in _BIG_INT.finditer(data):
        for what, number in needles.integers:
            if number in match.group():
                hits.add(what)
    return hits


def scan(files: Iterable[Path], needles: Needles) -> Iterator[str]:
    """'file: what' for every secret found in any of `files`."""
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        for what in sorted(scan_bytes(data, needles)):
            yield f"{path}: {what}"


# ---------------------------------------------------------------------- small utilities


def rss_kib(pid: int) -> int:
    """The process's resident set (VmRSS) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def monotonic() -> float:
    return time.monotonic()
