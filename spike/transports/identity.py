"""Where a workload's X.509 SVID comes from, and how a new one replaces it.

One interface, `IdentitySource`, three kinds of source:

* `WorkloadApiSource`: the SPIFFE Workload API (a SPIRE agent's socket, named
  by SPIFFE_ENDPOINT_SOCKET), through the `spiffe` package.  The SVID and the
  trust bundles arrive on a gRPC stream at start and again at every rotation.
* `SvidFileSource`: the three PEM files spiffe-helper writes (certificate
  chain, key, bundle).  A cheap `stat` of the three, at most once per
  `check_interval` and only when a connection asks for a context, notices a
  change; the files are then read once and loaded only if they load cleanly
  together.  A half-written or broken update keeps the previous identity and
  is logged once.
* `StaticSource`: SVID files loaded once (the development trust domain that
  `spike dev` mints, tests).

Every source hands out complete `ssl.SSLContext` objects, rebuilt on each
rotation and never changed afterwards: a server or client asks for the
current one for every *new* connection (`HttpsServer` and `HttpsConnection`
take the bound method), so connections already open keep the identity they
were made with and new ones present the new SVID.  The trust bundles stay
per trust domain (`LoadedIdentity.bundles`): OpenSSL gets all of their CAs,
and each context carries the `PeerVerifier` that then holds every peer to
its own domain's bundle (peer_trust.py).

Key material never goes to a regular file: OpenSSL reads certificates and
keys only from paths, so the PEM goes into an anonymous in-memory file
(`memfd_create`) read through /proc/self/fd.  Where that is unavailable the
key is written encrypted under a one-time password, 0600 in a private 0700
directory, deleted as soon as it is loaded; the directory goes on `stop()`.
The `spiffe` package runs its stream in threads of its own; they live and
die inside `WorkloadApiSource`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import ssl
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self
from urllib.parse import urlsplit

from spike.protocol.identity import InvalidSpiffeId, SpiffeId, TrustDomains
from spike.protocol.trust import TrustBundles

from .peer_trust import PeerVerifier, attach, ca_certificates, describe_bundles, file_bundles
from .tls import IdentityError, SvidFiles, new_context

if TYPE_CHECKING:
    from cryptography import x509
    from spiffe import WorkloadApiClient
    from spiffe.workloadapi.workload_api_client import StreamCancelHandler
    from spiffe.workloadapi.x509_context import X509Context

log = logging.getLogger("spike.transports.identity")

DEFAULT_WORKLOAD_API_TIMEOUT = 10.0
DEFAULT_CHECK_INTERVAL = 1.0


# ---------------------------------------------------------------------- what configuration chooses


@dataclass(frozen=True, slots=True)
class WorkloadApiSpec:
    """Fetch the SVID from the SPIFFE Workload API at `address` (a ``unix://`` URI)."""

    address: str
    timeout: float = DEFAULT_WORKLOAD_API_TIMEOUT  # for the first SVID, at start


# What configuration hands to `identity_source`: SVID files, or the Workload API.
IdentitySpec = SvidFiles | WorkloadApiSpec


def workload_api_address(text: str) -> str:
    """SPIFFE_ENDPOINT_SOCKET as a ``unix://`` URI; a bare absolute path is accepted too.

    Raises ValueError for anything the `spiffe` package cannot dial (it speaks
    to unix domain sockets only).
    """
    text = text.strip()
    if text.startswith("/"):
        return f"unix://{text}"
    parts = urlsplit(text)
    if parts.scheme != "unix":
        raise ValueError(f"{text!r} is not a unix domain socket address (example: unix:///run/spire/agent.sock)")
    if parts.netloc or parts.query or parts.fragment or not parts.path.startswith("/"):
        raise ValueError(f"{text!r} is not a unix:///absolute/path address")
    return text


def socket_path(address: str) -> Path:
    """The file system path of a ``unix:`` address."""
    return Path("/" + urlsplit(address).path.lstrip("/"))


# ---------------------------------------------------------------------- the interface


@dataclass(frozen=True, slots=True)
class LoadedIdentity:
    """One SVID, ready to use: immutable, replaced whole on rotation."""

    spiffe_id: SpiffeId
    server: ssl.SSLContext
    client: ssl.SSLContext
    serial: int
    not_after: dt.datetime
    authorities: int  # CA certificates trusted
    digest: str  # of the certificates (never of the key): tells a real change from a rewrite
    bundles: TrustBundles  # which of them serves which trust domain

    def describe(self) -> str:
        return (
            f"{self.spiffe_id} (serial {self.serial:x}, valid until "
            f"{self.not_after.isoformat(timespec='seconds')}, {self.authorities} trusted CA certificate(s): "
            f"{describe_bundles(self.bundles)})"
        )


RotationCallback = Callable[[LoadedIdentity], None]


class IdentitySource(Protocol):
    """This workload's X.509 SVID and trust bundle, as TLS contexts, kept current."""

    origin: str  # where the identity comes from, for messages

    def start(self) -> Self:
        """Load the first identity; raises `IdentityError` with one clear sentence."""
        ...

    def stop(self) -> None: ...

    def server_context(self) -> ssl.SSLContext:
        """The context for the next accepted connection."""
        ...

    def client_context(self) -> ssl.SSLContext:
        """The context for the next outgoing connection."""
        ...

    @property
    def spiffe_id(self) -> SpiffeId: ...

    @property
    def current(self) -> LoadedIdentity: ...

    @property
    def generation(self) -> int:
        """1 after start, one more for every rotation."""
        ...

    def refresh(self) -> bool:
        """Look for a new identity now; True if one was installed."""
        ...

    def subscribe(self, callback: RotationCallback) -> None:
        """Call `callback(new identity)` after each rotation (from whichever thread noticed it)."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


def identity_source(
    spec: IdentitySpec, trust: TrustDomains | None = None, *, check_interval: float = DEFAULT_CHECK_INTERVAL
) -> IdentitySource:
    """The (not yet started) source that configuration chose."""
    domains = {trust.nexus, trust.keeper, trust.bootstrap, trust.pilot} if trust is not None else set()
    if isinstance(spec, WorkloadApiSpec):
        return WorkloadApiSource(spec.address, timeout=spec.timeout, trust_domains=domains)
    return SvidFileSource(spec, check_interval=check_interval, trust_domains=domains)


# ---------------------------------------------------------------------- handing PEM to OpenSSL


def _memfd_usable() -> bool:
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


class _PemLoader:
    """Gives OpenSSL the paths it wants without putting key material in a regular file."""

    use_memfd = _memfd_usable()

    def __init__(self) -> None:
        self._directory: Path | None = None

    @contextlib.contextmanager
    def paths(self, chain: bytes, key: bytes) -> Iterator[tuple[str, str, bytes | None]]:
        """(chain path, key path, key password) for as long as the block runs."""
        if self.use_memfd:
            fds = [_memfd(data) for data in (chain, key)]
            try:
                yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}", None
            finally:
                for fd in fds:
                    os.close(fd)
            return
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization

        password = os.urandom(24).hex().encode()
        try:
            private = serialization.load_pem_private_key(key, password=None)
            sealed = private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(password),
            )
        except (ValueError, TypeError, UnsupportedAlgorithm):
            sealed = key  # not a key OpenSSL could use either: let it say why
        directory = self._private_directory()
        written = [_private_file(directory, data) for data in (chain, sealed)]
        try:
            yield str(written[0]), str(written[1]), password
        finally:
            for path in written:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _private_directory(self) -> Path:
        if self._directory is None:
            import tempfile  # only where memfd is missing: a keeper stays small

            self._directory = Path(tempfile.mkdtemp(prefix="spike-svid-"))  # mode 0700
        return self._directory

    def close(self) -> None:
        if self._directory is not None:
            import shutil

            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("spike-svid", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


def _private_file(directory: Path, data: bytes) -> Path:
    path = directory / os.urandom(8).hex()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    return path


@dataclass(frozen=True, slots=True)
class _Leaf:
    spiffe_id: SpiffeId
    serial: int
    not_after: dt.datetime


def _decode_leaf(chain: bytes, chain_path: str) -> dict[str, Any] | None:
    """The leaf certificate as `getpeercert()` shows a peer's, read by the ssl module itself.

    CPython's `ssl._ssl._test_decode_cert` decodes the first certificate of a
    PEM file; reading our own leaf this way spares every keeper the ~9 MiB of
    cryptography's X.509 code.  Where it is missing, cryptography does it.
    """
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        decoded = decode(chain_path)
    except (ssl.SSLError, OSError, ValueError):
        raise IdentityError("invalid certificate, key or bundle (the certificate chain cannot be parsed)") from None
    return decoded if isinstance(decoded, dict) else None


def _leaf_identity(chain: bytes, chain_path: str) -> _Leaf:
    decoded = _decode_leaf(chain, chain_path)
    if decoded is not None:
        uris = [value for kind, value in decoded.get("subjectAltName", ()) if kind == "URI"]
        serial = int(decoded.get("serialNumber", "0"), 16)
        not_after = dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(decoded["notAfter"]), dt.UTC)
    else:
        from cryptography import x509

        try:
            leaf = x509.load_pem_x509_certificates(chain)[0]
        except ValueError:
            raise IdentityError("invalid certificate, key or bundle (the certificate chain cannot be parsed)") from None
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        serial, not_after = leaf.serial_number, leaf.not_valid_after_utc
    if len(uris) != 1:
        raise IdentityError("the SVID certificate does not carry exactly one SPIFFE ID (URI SAN)")
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise IdentityError(f"the SVID certificate's URI SAN is not a SPIFFE ID: {exc}") from None
    if not spiffe_id.path:
        raise IdentityError(f"the SVID certificate's SPIFFE ID {spiffe_id} has no path: it names a trust domain")
    return _Leaf(spiffe_id, serial, not_after)


# The trust bundles of an identity: given per domain (the Workload API), or read
# from files once this workload's own trust domain is known (its SVID's).
TrustSource = TrustBundles | Callable[[str], TrustBundles]


def build_identity(chain: bytes, key: bytes, trust: TrustSource, loader: _PemLoader) -> LoadedIdentity:
    """Both TLS contexts for one SVID (PEM chain, PEM key) and its trust bundles; `IdentityError` if they do not load.

    OpenSSL is given every domain's CAs at once (a first filter); the
    contexts carry a `PeerVerifier` that then holds each peer to the bundle
    of its own trust domain (spike/transports/peer_trust.py).
    """
    contexts = []
    with loader.paths(chain, key) as (chain_path, key_path, password):
        leaf = _leaf_identity(chain, chain_path)
        bundles = trust if isinstance(trust, TrustBundles) else trust(leaf.spiffe_id.trust_domain)
        store = bundles.all_authorities()
        verifier = PeerVerifier(bundles)
        for server_side in (True, False):
            ctx = new_context(server_side=server_side)
            try:
                ctx.load_cert_chain(chain_path, key_path, password)
                ctx.load_verify_locations(cadata=b"".join(store))
            except ssl.SSLError as exc:
                raise IdentityError(f"invalid certificate, key or bundle ({exc.reason or exc})") from None
            attach(ctx, verifier)
            contexts.append(ctx)
    digest = hashlib.sha256(chain)
    for domain in bundles.domains:
        digest.update(b"\0" + domain.encode() + b"\0" + b"".join(sorted(bundles.authorities(domain))))
    return LoadedIdentity(
        spiffe_id=leaf.spiffe_id,
        server=contexts[0],
        client=contexts[1],
        serial=leaf.serial,
        not_after=leaf.not_after,
        authorities=len(store),
        digest=digest.hexdigest(),
        bundles=bundles,
    )


# ---------------------------------------------------------------------- the common part


class _Source:
    origin = "?"

    def __init__(self) -> None:
        self._current: LoadedIdentity | None = None
        self._generation = 0
        self._subscribers: list[RotationCallback] = []
        self._install_lock = threading.Lock()
        self._loader = _PemLoader()

    # The interface -----------------------------------------------------------------------

    @property
    def current(self) -> LoadedIdentity:
        current = self._current
        if current is None:
            raise IdentityError(f"the identity from {self.origin} is not loaded (source not started)")
        return current

    @property
    def spiffe_id(self) -> SpiffeId:
        return self.current.spiffe_id

    @property
    def generation(self) -> int:
        return self._generation

    def server_context(self) -> ssl.SSLContext:
        self._poll()
        return self.current.server

    def client_context(self) -> ssl.SSLContext:
        self._poll()
        return self.current.client

    def refresh(self) -> bool:
        return False

    def subscribe(self, callback: RotationCallback) -> None:
        with self._install_lock:
            self._subscribers.append(callback)

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        self._loader.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # For the sources ---------------------------------------------------------------------

    def _poll(self) -> None:
        """Hook: a connection is about to use the identity."""

    def _install(self, new: LoadedIdentity) -> bool:
        with self._install_lock:
            old = self._current
            if old is not None and old.digest == new.digest:
                return False  # rewritten with the same content
            self._current = new
            self._generation += 1
            subscribers = list(self._subscribers)
        if old is None:
            log.debug("X.509 SVID %s loaded from %s", new.describe(), self.origin)
        else:
            log.info("X.509 SVID rotated (from %s): now %s", self.origin, new.describe())
            if old.spiffe_id != new.spiffe_id:
                log.warning("the rotated SVID has another SPIFFE ID: was %s, now %s", old.spiffe_id, new.spiffe_id)
            for callback in subscribers:
                try:
                    callback(new)
                except Exception:
                    log.exception("an identity rotation callback failed")
        return True


# ---------------------------------------------------------------------- SVID files


_Signature = tuple[tuple[int, int, int, int, int], ...]


def _files_origin(files: SvidFiles) -> str:
    extra = "".join(f", {path} ({domain})" for domain, path in files.trust_bundles)
    return f"SVID files {files.cert}, {files.key}, {files.bundle}{extra}"


def load_files(files: SvidFiles, loader: _PemLoader) -> LoadedIdentity:
    """The identity in SVID files (chain, key, bundle, and the bundles of other trust domains)."""
    chain, key, own, *per_domain = _read_files(files)
    return build_identity(chain, key, file_bundles(files, own, per_domain), loader)


class _FileSource(_Source):
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


# ---------------------------------------------------------------------- the SPIFFE Workload API


class WorkloadApiSource(_Source):
    """X.509 SVIDs streamed by the SPIFFE Workload API (FetchX509SVID), rotated as they arrive.

    The stream runs in the `spiffe` package's own thread; every update builds
    new contexts there and swaps them in.  An update that cannot be used (no
    SVID, no trust bundle for this workload's trust domain, a broken
    certificate) keeps the current identity and is logged; if the package
    gives up on the stream, it is opened again after `restart_delay` seconds
    (doubling up to a minute while it keeps failing).

    `trust_domains`, when given, limits the bundles trusted to those of
    these domains (and the workload's own): a federated domain's CA is
    trusted only where the configuration names that domain, and, as every
    bundle, only for the IDs of its own domain (peer_trust.py).
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float = DEFAULT_WORKLOAD_API_TIMEOUT,
        trust_domains: Collection[str] = (),
        restart_delay: float = 1.0,
    ) -> None:
        super().__init__()
        self.address = workload_api_address(address)
        self.origin = f"the SPIFFE Workload API at {self.address}"
        self.timeout = timeout
        self.trust_domains = frozenset(trust_domains)
        self.restart_delay = restart_delay
        self._client: WorkloadApiClient | None = None
        self._stream: StreamCancelHandler | None = None
        self._restart: threading.Timer | None = None
        self._delay = restart_delay
        self._first = threading.Event()
        self._start_error: str | None = None
        self._stopping = False
        self._state = threading.Lock()
        self._last_problem = ""
        self._missing_domains: frozenset[str] = frozenset()
        self.updates = 0  # updates received, usable or not
        self.rejected = 0  # updates that could not be used

    def start(self) -> Self:
        if self._current is not None:
            return self
        path = socket_path(self.address)
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise IdentityError(f"no SPIFFE Workload API socket at {path} (SPIFFE_ENDPOINT_SOCKET)") from None
        except OSError as exc:
            raise IdentityError(f"cannot reach the SPIFFE Workload API socket {path}: {exc.strerror}") from None
        if not stat.S_ISSOCK(mode):
            raise IdentityError(f"{path} is not a socket (SPIFFE_ENDPOINT_SOCKET)")
        # gRPC's fork handlers can abort a child forked while a stream is open
        # (grpc/grpc#43055); spike forks only to exec, so it needs none of them.
        os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
        from spiffe import WorkloadApiClient
        from spiffe.errors import ArgumentError

        try:
            self._client = WorkloadApiClient(self.address)
        except ArgumentError as exc:
            raise IdentityError(f"SPIFFE Workload API {self.address}: {exc}") from None
        self._stopping = False
        self._open_stream()
        if not self._first.wait(self.timeout):
            reason = self._why_no_svid()
            self.stop()
            raise IdentityError(f"{self.origin} sent no X.509 SVID within {self.timeout:g}s{reason}")
        if self._start_error is not None:
            error = self._start_error
            self.stop()
            what = "trust bundle" if "bundle" in error.lower() else "X.509 SVID"
            raise IdentityError(f"{self.origin} sent no usable {what}: {error}")
        return self

    def stop(self) -> None:
        with self._state:
            self._stopping = True
            timer, self._restart = self._restart, None
            stream, self._stream = self._stream, None
            client, self._client = self._client, None
        if timer is not None:
            timer.cancel()
        if stream is not None:
            stream.cancel()
        if client is not None:
            client.close()
        super().stop()

    def refresh(self) -> bool:
        return False  # the Workload API pushes every change

    # The stream (runs in the spiffe package's thread) --------------------------------------

    def _open_stream(self) -> None:
        with self._state:
            self._restart = None
            if self._stopping or self._client is None:
                return
            self._stream = self._client.stream_x509_contexts(self._on_update, self._on_error)

    def _on_update(self, context: X509Context) -> None:
        if self._stopping:
            return
        self.updates += 1
        try:
            new = self._identity_of(context)
        except IdentityError as exc:
            self.rejected += 1
            self._problem(str(exc))
            return
        except Exception as exc:  # never let the package's thread die on our account
            self.rejected += 1
            self._problem(f"{exc.__class__.__name__}: {exc}")
            return
        self._delay = self.restart_delay
        self._last_problem = ""
        self._install(new)
        self._first.set()

    def _on_error(self, error: Exception) -> None:
        # The package calls this when it gives up on the stream (its own retries
        # cover an agent that is down or restarting): the stream is over.
        if self._current is None:
            self._problem(str(error))
            return
        with self._state:
            if self._stopping:
                return
            delay, self._delay = self._delay, min(self._delay * 2, 60.0)
            self._restart = threading.Timer(delay, self._open_stream)
            self._restart.daemon = True
            self._restart.start()
        if str(error) != self._last_problem:
            log.warning(
                "%s stream failed (%s): keeping the current identity %s; reconnecting in %gs",
                self.origin,
                error,
                self.current.spiffe_id,
                delay,
            )
            self._last_problem = str(error)

    def _problem(self, reason: str) -> None:
        if self._current is None:
            # At start: the first answer decides, and start() reports it.
            self._start_error = reason
            self._first.set()
            return
        if reason != self._last_problem:
            log.warning(
                "%s sent an update that cannot be used (%s): keeping the current identity %s",
                self.origin,
                reason,
                self.current.spiffe_id,
            )
            self._last_problem = reason

    def _identity_of(self, context: X509Context) -> LoadedIdentity:
        svid = context.default_svid
        own = svid.spiffe_id.trust_domain.name
        bundles = {bundle.trust_domain.name: bundle for bundle in context.x509_bundle_set.bundles}
        if not bundles.get(own) or not bundles[own].x509_authorities:
            raise IdentityError(f"no X.509 trust bundle for this workload's trust domain {own}")
        wanted = (self.trust_domains | {own}) if self.trust_domains else set(bundles)
        missing = frozenset(wanted - set(bundles))
        if missing and missing != self._missing_domains:
            log.warning(
                "%s sent no trust bundle for trust domain(s) %s: their peers will be refused",
                self.origin,
                ", ".join(sorted(missing)),
            )
        self._missing_domains = missing
        # Each domain's CAs stay that domain's: the API says which bundle is whose,
        # and a peer is held to its own domain's (peer_trust.py).
        trusted = TrustBundles()
        for domain in sorted(wanted & set(bundles)):
            ders = b"".join(_der(cert) for cert in bundles[domain].x509_authorities)
            if ders:
                certificates = ca_certificates(ders, f"the trust bundle of {domain}")
                trusted |= TrustBundles.for_domain(domain, certificates, check_labels=False)
        from cryptography.hazmat.primitives import serialization

        chain = _pem(svid.cert_chain)
        key = svid.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return build_identity(chain, key, trusted, self._loader)

    def _why_no_svid(self) -> str:
        """After a silent timeout, one direct call says why (no registration entry, ...)."""
        if self._start_error is not None:
            return f": {self._start_error}"
        client = self._client
        if client is None:
            return ""
        try:
            client.fetch_x509_context(timeout=min(1.0, self.timeout))
        except Exception as exc:
            return f" ({exc})"
        return ""


def _der(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.DER)


def _pem(certs: Sequence[x509.Certificate]) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)
