"""Where a workload's X.509 SVID comes from, and how a new one replaces it.

One interface, `IdentitySource`, three kinds of source:

* `WorkloadApiSource` (workload_api.py): the SPIFFE Workload API (a SPIRE agent's socket, named
  by SPIFFE_ENDPOINT_SOCKET), through the `spiffe` package.  The SVID and the
  trust bundles arrive on a gRPC stream at start and again at every rotation.
* `SvidFileSource` (svid_files.py): the three PEM files spiffe-helper writes (certificate
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

The sources live in svid_files.py and workload_api.py, the PEM and key
loading they share in pem.py; which one runs is configuration's choice
(spike/app/identity.py).
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self

import msgspec

from spike.protocol.identity import SpiffeId
from spike.protocol.trust import TrustBundles

from .peer_trust import describe_bundles
from .tls import IdentityError

if TYPE_CHECKING:
    from .pem import PemLoader

log = logging.getLogger("spike.transports.identity")


# ---------------------------------------------------------------------- the interface


class LoadedIdentity(msgspec.Struct, frozen=True):
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


# ---------------------------------------------------------------------- the common part


class SourceBase:
    """What every source shares: the current identity, its generation, rotation callbacks."""

    origin = "?"

    def __init__(self) -> None:
        self._current: LoadedIdentity | None = None
        self._generation = 0
        self._subscribers: list[RotationCallback] = []
        self._install_lock = threading.Lock()
        from .pem import PemLoader  # pem.py builds the LoadedIdentity defined here

        self._loader: PemLoader = PemLoader()  # the one place key material is handed to OpenSSL

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
