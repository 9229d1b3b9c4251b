"""Trust per domain on real connections: is a TLS peer's chain anchored in its own domain's bundle?

OpenSSL verifies a peer's chain against one store: every CA of every trust
domain configured (a first filter).  After the handshake, `refusal` checks
with the pure rule (`spike.protocol.trust.chain_refusal`) that the chain
OpenSSL verified ends at a CA of the bundle of the trust domain the peer's
SPIFFE ID names; otherwise the peer is refused, whatever it claims.

The check reuses OpenSSL's verification (the same X.509 profile, no second
parser: a keeper never loads cryptography's X.509 code) and only looks at
which anchor the chain reached.  That costs a few microseconds; a verdict is
still remembered per peer certificate, because a resumed TLS session carries
no chain to look at: a certificate whose chain was seen to end in its own
domain's bundle may resume, any other is refused.

Every context spike builds carries its `PeerVerifier` (`attach`).  A context
built elsewhere gets one from the ``spiffe://<trust domain>`` URI SANs of the
CAs it trusts (`verifier_of`): a CA that names no domain serves none.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from spike.protocol.identity import SpiffeId
from spike.protocol.trust import CaCertificate, TrustBundleError, TrustBundles, chain_refusal, trust_domains_named

from .tls import IdentityError, SvidFiles

log = logging.getLogger("spike.transports.trust")

_ENCODING_DER = getattr(getattr(ssl, "_ssl", None), "ENCODING_DER", 2)


class _Peer(Protocol):
    """What `ssl.SSLObject` and `ssl.SSLSocket` share, as far as this module needs."""

    @property
    def context(self) -> ssl.SSLContext: ...

    def getpeercert(self, binary_form: bool = ...) -> Any: ...


def ca_certificates(data: bytes, what: str) -> list[CaCertificate]:
    """The CA certificates in `data` (PEM, or concatenated DER), as OpenSSL parses them.

    OpenSSL itself parses them so that their DER is byte for byte what it
    later puts in a verified chain.  Raises `IdentityError` naming `what` when
    there is no CA certificate at all.
    """
    scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    pem = b"-----BEGIN" in data
    try:
        # Text around PEM blocks (comments) is skipped by OpenSSL; only ASCII can be handed over.
        scratch.load_verify_locations(cadata=data.decode("ascii", errors="ignore") if pem else data)
    except (ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        raise IdentityError(f"{what}: no CA certificate can be read from it ({reason})") from None
    ders = [bytes(der) for der in scratch.get_ca_certs(binary_form=True)]
    ignored = scratch.cert_store_stats()["x509"] - len(ders)
    if ignored:
        log.warning("%s: %d certificate(s) that are not CAs ignored: they are trusted for nothing", what, ignored)
    if not ders:
        raise IdentityError(f"{what}: it holds no CA certificate")
    return [(_described(der), der) for der in ders]


def _described(der: bytes) -> dict[str, Any]:
    """A CA certificate's subject and SANs as the ssl module decodes them (one store per certificate:
    nothing to pair up)."""
    alone = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    alone.load_verify_locations(cadata=der)
    infos = alone.get_ca_certs()
    return infos[0] if infos else {}


def file_bundles(files: SvidFiles, own: bytes, per_domain: Sequence[bytes]) -> Callable[[str], TrustBundles]:
    """The trust bundles of SVID files, once the SVID's trust domain is known.

    `own` is the content of the bundle file (`files.bundle`): this workload's
    own trust domain's, which may also hold other domains' CAs if each says
    which domain it serves (its ``spiffe://`` URI SAN); `per_domain` the
    contents of `files.trust_bundles`, each one domain's.
    """

    def resolve(own_domain: str) -> TrustBundles:
        what = f"trust bundle {files.bundle}"
        try:
            bundles = TrustBundles.labelled(own_domain, ca_certificates(own, what))
            for (domain, path), data in zip(files.trust_bundles, per_domain, strict=True):
                what = f"trust bundle of {domain} ({path})"
                bundles |= TrustBundles.for_domain(domain, ca_certificates(data, what))
        except TrustBundleError as exc:
            raise IdentityError(f"{what}: {exc}") from None
        return bundles

    return resolve


def verified_chain(peer: _Peer) -> list[bytes] | None:
    """The chain OpenSSL verified for the peer (DER, the peer's certificate first, the anchor last).

    None when there is none to look at: a resumed session, or no TLS at all.
    """
    public = getattr(peer, "get_verified_chain", None)
    if public is not None:  # Python 3.13 and later: DER bytes
        return [bytes(der) for der in public()] or None
    inner = getattr(peer, "_sslobj", None)
    chain = inner.get_verified_chain() if inner is not None else None  # 3.11, 3.12: certificate objects
    if not chain:
        return None
    return [cert.public_bytes(_ENCODING_DER) for cert in chain]


class PeerVerifier:
    """The per-domain check for the connections of one TLS context (one set of bundles).

    Thread-safe: a context may serve connections on several threads.
    """

    def __init__(self, bundles: TrustBundles, *, remembered: int = 4096, warn_every: float = 60.0) -> None:
        self.bundles = bundles
        self._remembered = remembered
        self._warn_every = warn_every
        self._accepted: OrderedDict[bytes, None] = OrderedDict()  # SHA-256 of accepted peer certificates
        self._warned: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()
        self.checks = 0  # chains actually looked at (the rest were remembered), for tests and benchmarks

    def refusal(self, peer: _Peer, claimed: SpiffeId) -> str | None:
        """Why the peer of this connection is not `claimed` (the SPIFFE ID in its certificate), or None."""
        leaf = peer.getpeercert(binary_form=True)
        if not leaf:
            return "no peer certificate"
        key = hashlib.sha256(leaf).digest()
        with self._lock:
            if key in self._accepted:
                self._accepted.move_to_end(key)
                return None
        reason = chain_refusal(claimed, verified_chain(peer), self.bundles)
        with self._lock:
            self.checks += 1
            if reason is None:
                self._accepted[key] = None
                if len(self._accepted) > self._remembered:
                    self._accepted.popitem(last=False)
        return reason

    def worth_warning(self, peer: _Peer) -> bool:
        """Whether a refusal of this peer certificate should be logged now (once a minute per certificate)."""
        key = hashlib.sha256(peer.getpeercert(binary_form=True) or b"").digest()
        now = time.monotonic()
        with self._lock:
            last = self._warned.get(key)
            if last is not None and now - last < self._warn_every:
                return False
            self._warned[key] = now
            self._warned.move_to_end(key)
            if len(self._warned) > self._remembered:
                self._warned.popitem(last=False)
        return True


_VERIFIERS: weakref.WeakKeyDictionary[ssl.SSLContext, PeerVerifier] = weakref.WeakKeyDictionary()
_VERIFIERS_LOCK = threading.Lock()


def attach(context: ssl.SSLContext, verifier: PeerVerifier) -> None:
    """Say which CA serves which domain for the peers of connections made with `context`."""
    with _VERIFIERS_LOCK:
        _VERIFIERS[context] = verifier


def verifier_of(context: ssl.SSLContext) -> PeerVerifier:
    """The verifier attached to `context`; for a context spike did not build, one from its CAs' URI SANs."""
    with _VERIFIERS_LOCK:
        found = _VERIFIERS.get(context)
    if found is not None:
        return found
    bundles = TrustBundles()
    for raw in context.get_ca_certs(binary_form=True):
        der = bytes(raw)
        info = _described(der)
        domains = trust_domains_named(info)
        if len(domains) == 1:  # a CA naming no domain, or several, serves none
            bundles |= TrustBundles.for_domain(next(iter(domains)), [(info, der)])
    verifier = PeerVerifier(bundles)
    attach(context, verifier)
    return verifier


def refusal(peer: _Peer | None, claimed: SpiffeId) -> str | None:
    """Why the TLS peer of a connection is not `claimed`, or None.  `peer` is its `ssl_object`."""
    if peer is None:
        return "no TLS connection to check it on"
    return verifier_of(peer.context).refusal(peer, claimed)


def warn_refused(peer: _Peer, who: str, claimed: SpiffeId, reason: str) -> None:
    """The log line of a refused peer, at most once a minute for one certificate."""
    if verifier_of(peer.context).worth_warning(peer):
        log.warning(
            "refused %s presenting %s (trust domain %s): %s",
            who,
            claimed,
            claimed.trust_domain,
            reason,
            extra={"event": "peer_refused", "peer": str(claimed), "trust_domain": claimed.trust_domain},
        )


def describe_bundles(bundles: TrustBundles) -> str:
    """'spike.ist (2 CAs), other.org (1 CA)', for log lines."""
    parts = []
    for domain in bundles.domains:
        count = len(bundles.authorities(domain))
        parts.append(f"{domain} ({count} CA{'s' if count != 1 else ''})")
    return ", ".join(parts) or "none"
