"""SVID files as an identity source: loaded once (`StaticSource`) or reloaded when rewritten (`SvidFileSource`)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import Self

from .identity import LoadedIdentity, SourceBase
from .peer_trust import file_bundles
from .pem import PemLoader, build_identity
from .tls import IdentityError, SvidFiles

log = logging.getLogger("spike.transports.identity")

DEFAULT_CHECK_INTERVAL = 1.0


_Signature = tuple[tuple[int, int, int, int, int], ...]


def _files_origin(files: SvidFiles) -> str:
    extra = "".join(f", {path} ({domain})" for domain, path in files.trust_bundles)
    return f"SVID files {files.cert}, {files.key}, {files.bundle}{extra}"


def load_files(files: SvidFiles, loader: PemLoader) -> LoadedIdentity:
    """The identity in SVID files (chain, key, bundle, and the bundles of other trust domains)."""
    chain, key, own, *per_domain = _read_files(files)
    return build_identity(chain, key, file_bundles(files, own, per_domain), loader)


class _FileSource(SourceBase):
    def __init__(self, files: SvidFiles, trust_domains: Collection[str]) -> None:
        super().__init__()
        self.files = files
        self.origin = _files_origin(files)
        self.trust_domains = frozenset(trust_domains)
        self._missing_domains: frozenset[str] = frozenset()

    def _install(self, new: LoadedIdentity) -> bool:
        missing = self.trust_domains - set(new.bundles.domains)
        if missing != self._missing_domains and missing:
            # Info, not a warning: a one-shot command may not need them, and its stderr stays one line.
            log.info(
                "%s hold no trust bundle for trust domain(s) %s: their peers will be refused",
                self.origin,
                ", ".join(sorted(missing)),
            )
        self._missing_domains = missing
        return super()._install(new)


class StaticSource(_FileSource):
    """SVID files loaded once, at start, and never again."""

    def __init__(self, files: SvidFiles, *, trust_domains: Collection[str] = ()) -> None:
        super().__init__(files, trust_domains)

    def start(self) -> Self:
        if self._current is None:
            self._install(load_files(self.files, self._loader))
        return self


class SvidFileSource(_FileSource):
    """SVID files that spiffe-helper (or anything) rewrites: reloaded when they change.

    `check_interval` bounds how often the files are looked at (three `stat`
    calls); the look happens when a connection asks for a context, or on
    `refresh()`.  A change is loaded only if the three files, read once,
    load cleanly together; otherwise the previous identity stays, and the
    files are read again when they change again (or, in case a change went
    unnoticed, every `retry_broken_after` seconds).  One warning is logged per
    broken spell, however many half-written states it passes through, and the
    rotation that ends it is logged as any other.
    """

    def __init__(
        self,
        files: SvidFiles,
        *,
        check_interval: float = DEFAULT_CHECK_INTERVAL,
        retry_broken_after: float = 10.0,
        trust_domains: Collection[str] = (),
    ) -> None:
        super().__init__(files, trust_domains)
        self.check_interval = check_interval
        self.retry_broken_after = retry_broken_after
        self._last_check = 0.0
        self._loaded: _Signature | None = None
        self._broken: object = None  # the signature (or missing file) of the last failed change
        self._broken_since = 0.0
        self._warned = False
        self._refreshing = threading.Lock()
        self.checks = 0  # stat rounds, for tests and metrics
        self.failures = 0  # changes that did not load

    def start(self) -> Self:
        if self._current is not None:
            return self
        try:
            signature: _Signature | None = self._signature()
        except OSError:
            signature = None  # reading says which file, and why
        self._install(load_files(self.files, self._loader))
        self._loaded = signature
        self._last_check = time.monotonic()
        return self

    def _poll(self) -> None:
        if time.monotonic() - self._last_check >= self.check_interval:
            self.refresh()

    def refresh(self) -> bool:
        if self._current is None or not self._refreshing.acquire(blocking=False):
            return False  # not started, or another thread is looking right now
        try:
            return self._refresh()
        finally:
            self._refreshing.release()

    def _refresh(self) -> bool:
        now = time.monotonic()
        self._last_check = now
        self.checks += 1
        try:
            signature = self._signature()
        except OSError as exc:
            return self._failed(("missing", exc.filename), f"cannot stat {exc.filename}: {exc.strerror}", now)
        if signature == self._loaded:
            return False
        if signature == self._broken and now - self._broken_since < self.retry_broken_after:
            return False
        try:
            new = load_files(self.files, self._loader)
        except IdentityError as exc:
            return self._failed(signature, str(exc), now)
        self._loaded = signature
        self._broken = None
        self._warned = False
        return self._install(new)

    def _failed(self, signature: object, reason: str, now: float) -> bool:
        if signature != self._broken:
            self.failures += 1
            self._broken = signature
        self._broken_since = now
        if not self._warned:
            self._warned = True
            log.warning(
                "the SVID files changed but do not load (%s): keeping the current identity %s until they load again",
                reason,
                self.current.spiffe_id,
            )
        return False

    def _signature(self) -> _Signature:
        stats = [os.stat(path) for path in _paths(self.files)]
        return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for s in stats)


def _paths(files: SvidFiles) -> list[Path]:
    return [files.cert, files.key, files.bundle, *(path for _, path in files.trust_bundles)]


def _read_files(files: SvidFiles) -> list[bytes]:
    """Chain, key, bundle, then each per-domain bundle: the contents of `_paths(files)`."""
    contents = []
    for path in _paths(files):
        try:
            contents.append(path.read_bytes())
        except FileNotFoundError:
            raise IdentityError(f"cannot read {path}: no such file") from None
        except PermissionError:
            raise IdentityError(f"cannot read {path}: permission denied") from None
        except OSError as exc:
            raise IdentityError(f"cannot read {path}: {exc.strerror or exc}") from None
    return contents
