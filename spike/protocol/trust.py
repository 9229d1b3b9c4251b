"""Trust per domain: which CA serves which trust domain, and whether a peer's chain ends at its own.

SPIFFE verifies an X.509 SVID against the bundle of the trust domain its
SPIFFE ID names, never against the CAs of every domain a workload trusts:
otherwise a CA of one domain (a federated partner, the domain the pilots
live in) can mint SVIDs of another.  A TLS library verifies a chain against
one store, so the store holds every configured domain's CAs (a first filter:
signatures, validity, CA constraints) and `chain_refusal` then checks that
the chain the TLS library verified ends at a CA of the bundle of the domain
the peer's SPIFFE ID names.  That is the whole SPIFFE rule: a path from the
leaf to one of its own domain's authorities.

Which CA serves which domain is data, never a guess: a bundle given for one
trust domain, or the ``spiffe://<trust domain>`` URI SAN a SPIFFE CA carries.
`TrustBundles.labelled` reads a bundle that may hold several domains' CAs
(each must then say which domain it serves); `TrustBundles.for_domain` reads
a bundle given for one domain.

Pure: the inputs are what Python's ``ssl`` module gives (DER bytes, and the
dicts of ``SSLContext.get_ca_certs()``, the same form as ``getpeercert()``);
no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .errors import LocalProtocolError
from .identity import InvalidSpiffeId, SpiffeId

# One CA certificate as the ssl module describes it: (`get_ca_certs()` dict, DER bytes).
CaCertificate = tuple[Mapping[str, Any], bytes]

_SHORT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
}


class TrustBundleError(LocalProtocolError, ValueError):
    """A trust bundle does not say which trust domain one of its CAs serves (or says two things)."""


def _subject(info: Mapping[str, Any]) -> str:
    parts: list[str] = []
    for rdn in info.get("subject", ()):
        for entry in rdn if isinstance(rdn, tuple | list) else ():
            if isinstance(entry, tuple | list) and len(entry) == 2:
                parts.append(f"{_SHORT_NAMES.get(str(entry[0]), str(entry[0]))}={entry[1]}")
    return ", ".join(parts) or "(empty subject)"


def trust_domains_named(info: Mapping[str, Any]) -> frozenset[str]:
    """The trust domains a CA certificate names in its ``spiffe://`` URI SANs."""
    domains = set()
    sans = info.get("subjectAltName", ())
    for entry in sans if isinstance(sans, tuple | list) else ():
        if isinstance(entry, tuple | list) and len(entry) == 2 and entry[0] == "URI" and isinstance(entry[1], str):
            if not entry[1].startswith("spiffe://"):
                continue
            try:
                domains.add(SpiffeId.parse(entry[1]).trust_domain)
            except InvalidSpiffeId:
                continue
    return frozenset(domains)


class TrustBundles:
    """Which CA certificates (DER) serve which trust domain; immutable.

    Build it with `labelled` and `for_domain` and combine with ``|``.  A CA
    may serve several domains when it is given for each of them.
    """

    __slots__ = ("_authorities", "_names")

    def __init__(
        self, authorities: Mapping[str, Iterable[bytes]] | None = None, names: Mapping[bytes, str] | None = None
    ) -> None:
        self._authorities = {domain: frozenset(ders) for domain, ders in (authorities or {}).items()}
        self._authorities = {domain: ders for domain, ders in self._authorities.items() if ders}
        self._names = dict(names or {})

    @classmethod
    def labelled(cls, own_domain: str, certificates: Sequence[CaCertificate]) -> TrustBundles:
        """A bundle that may hold several domains' CAs: each CA serves the domain its URI SAN names.

        A CA without a ``spiffe://`` URI SAN serves `own_domain` (the workload's
        own trust domain, whose bundle this is) as long as no CA of the bundle
        names another domain; in a bundle of several domains it is refused
        (`TrustBundleError`): nothing says which domain it serves.
        """
        labelled = [(info, der, trust_domains_named(info)) for info, der in certificates]
        several = {domain for _, _, domains in labelled for domain in domains} - {own_domain}
        authorities: dict[str, set[bytes]] = {}
        names: dict[bytes, str] = {}
        for info, der, domains in labelled:
            names[der] = _subject(info)
            if len(domains) > 1:
                raise TrustBundleError(
                    f"CA certificate {names[der]!r} names several trust domains ({', '.join(sorted(domains))})"
                )
            if not domains and several:
                raise TrustBundleError(
                    f"CA certificate {names[der]!r} has no spiffe://<trust domain> URI SAN, and the bundle holds "
                    f"CAs of several trust domains ({', '.join(sorted(several | {own_domain}))}): nothing says "
                    "which one it serves (give each trust domain a bundle of its own)"
                )
            domain = next(iter(domains)) if domains else own_domain
            authorities.setdefault(domain, set()).add(der)
        return cls(authorities, names)

    @classmethod
    def for_domain(
        cls, domain: str, certificates: Sequence[CaCertificate], *, check_labels: bool = True
    ) -> TrustBundles:
        """The bundle of `domain`: every CA of it serves `domain`, and only `domain`.

        With `check_labels`, a CA whose URI SAN names another trust domain is
        refused (`TrustBundleError`): the bundle and the CA disagree, which is
        a configuration mistake worth stopping for.  Without, the bundle's word
        is taken (the Workload API's bundles: a federated domain's odd CA must
        not stop this workload's own rotation; it serves that domain only).
        """
        names: dict[bytes, str] = {}
        for info, der in certificates:
            names[der] = _subject(info)
            others = trust_domains_named(info) - {domain}
            if check_labels and others:
                raise TrustBundleError(
                    f"CA certificate {names[der]!r} in the bundle of {domain} names trust domain "
                    f"{', '.join(sorted(others))} (URI SAN)"
                )
        return cls({domain: list(names)}, names)

    def __or__(self, other: TrustBundles) -> TrustBundles:
        authorities = {domain: set(ders) for domain, ders in self._authorities.items()}
        for domain, ders in other._authorities.items():
            authorities.setdefault(domain, set()).update(ders)
        return TrustBundles(authorities, {**self._names, **other._names})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrustBundles) and self._authorities == other._authorities

    def __hash__(self) -> int:
        return hash(frozenset(self._authorities.items()))

    def __repr__(self) -> str:
        counts = ", ".join(f"{domain}: {len(ders)}" for domain, ders in sorted(self._authorities.items()))
        return f"TrustBundles({counts})"

    @property
    def domains(self) -> tuple[str, ...]:
        """The trust domains with at least one CA, sorted."""
        return tuple(sorted(self._authorities))

    def authorities(self, domain: str) -> frozenset[bytes]:
        """The DER of `domain`'s CA certificates (empty if it has none)."""
        return self._authorities.get(domain, frozenset())

    def all_authorities(self) -> tuple[bytes, ...]:
        """Every CA certificate of every domain, once each, in a stable order: what a TLS store trusts."""
        return tuple(sorted({der for ders in self._authorities.values() for der in ders}))

    def serving(self, der: bytes) -> tuple[str, ...]:
        """The trust domains the CA certificate `der` serves, sorted."""
        return tuple(sorted(domain for domain, ders in self._authorities.items() if der in ders))

    def name(self, der: bytes) -> str:
        """The subject of a CA certificate of these bundles, for messages."""
        return self._names.get(der, "an unknown CA")


def chain_refusal(peer: SpiffeId, verified_chain: Sequence[bytes] | None, bundles: TrustBundles) -> str | None:
    """Why `peer`'s certificate chain does not make it `peer`, or None if it does.

    `verified_chain` is the chain the TLS library verified (DER, the peer's
    certificate first and the trust anchor it reached last:
    ``SSLSocket.get_verified_chain()``).  The peer is `peer` only if that
    anchor is a CA of the bundle of `peer`'s own trust domain.  No chain (a
    resumed TLS session carries none) is a refusal: there is nothing to check.
    """
    domain = peer.trust_domain
    if not verified_chain:
        return "no verified certificate chain to check it against its trust domain's bundle"
    own = bundles.authorities(domain)
    if not own:
        return f"there is no trust bundle for its trust domain {domain}"
    anchor = verified_chain[-1]
    if anchor in own:
        return None
    serves = bundles.serving(anchor)
    elsewhere = f"a CA of {', '.join(serves)}" if serves else "a CA of no configured trust domain"
    return (
        f"its certificate chain ends at {bundles.name(anchor)!r}, {elsewhere}, "
        f"which is not in the trust bundle of {domain}"
    )
