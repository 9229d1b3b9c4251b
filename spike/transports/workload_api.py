"""The SPIFFE Workload API as an identity source: X.509 SVIDs streamed by an agent, rotated as they arrive.

The `spiffe` package runs its stream in threads of its own; they live and die
inside `WorkloadApiSource`.  It is imported only when this source starts.
"""

from __future__ import annotations

import logging
import stat
import threading
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Self
from urllib.parse import urlsplit

from spike.protocol.trust import TrustBundles

from .identity import LoadedIdentity, SourceBase
from .peer_trust import ca_certificates
from .pem import build_identity, der, pem_chain
from .tls import IdentityError

if TYPE_CHECKING:
    from spiffe import WorkloadApiClient
    from spiffe.workloadapi.workload_api_client import StreamCancelHandler
    from spiffe.workloadapi.x509_context import X509Context

log = logging.getLogger("spike.transports.identity")

DEFAULT_WORKLOAD_API_TIMEOUT = 10.0


def socket_path(address: str) -> Path:
    """The file system path of a ``unix:`` address."""
    return Path("/" + urlsplit(address).path.lstrip("/"))


class WorkloadApiSource(SourceBase):
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
        # Configuration hands a checked unix:///absolute/path URI; a bare path is taken too.
        self.address = f"unix://{address}" if address.startswith("/") else address
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
            ders = b"".join(der(cert) for cert in bundles[domain].x509_authorities)
            if ders:
                certificates = ca_certificates(ders, f"the trust bundle of {domain}")
                trusted |= TrustBundles.for_domain(domain, certificates, check_labels=False)
        from cryptography.hazmat.primitives import serialization

        chain = pem_chain(svid.cert_chain)
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
