"""Vault tokens issued by `auth/cert/login`: short-lived, bound to one SPIFFE ID, kept only as hashes.

A token is 30 random bytes (240 bits, in base32 after "s.") given to the
client once; Nexus keeps the SHA-256 of it, never the token, so neither memory
nor a core dump of Nexus yields one that works.  (A fast hash is enough: the
token is random, not a password to guess.)  Each token remembers the SPIFFE ID
it was issued to, and is refused on a connection whose SVID names another.

Tokens live in this Nexus's memory only: a restart of Nexus forgets them, and
with several instances behind a load balancer a token works only on the
instance that issued it.  Clients re-login with their certificate (hvac,
vault-agent's cert auto-auth), or send no token at all: the SVID alone is
enough on every route (docs/vault-clients.md).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
from collections.abc import Callable

import msgspec

from spike.protocol.identity import SpiffeId

DEFAULT_TTL = 3600.0
MAX_LIFETIME = 24 * 3600.0  # from issue: renewals never take a token past this
PER_IDENTITY = 64  # live tokens per SPIFFE ID: a further login retires that identity's oldest
MAX_TOKENS = 100_000  # all identities together: a login past this is refused (429)
PREFIX = "s."
SWEEP_EVERY = 60.0  # seconds between looks for expired tokens (and whenever memory is full)


class Token(msgspec.Struct, frozen=True):
    """What Nexus remembers of an issued token: never the token itself."""

    spiffe_id: SpiffeId
    accessor: str
    issued_at: float  # wall clock, seconds
    ttl: float  # as issued or last renewed
    expires_at: float
    max_expires_at: float

    def remaining(self, now: float) -> float:
        return max(0.0, self.expires_at - now)


class TooManyTokens(Exception):
    pass


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def _random_text(size: int) -> str:
    return base64.b32encode(secrets.token_bytes(size)).decode("ascii").rstrip("=").lower()


class TokenStore:
    """The tokens this Nexus issued: hash -> `Token`.  Safe from any thread."""

    def __init__(
        self,
        ttl: float = DEFAULT_TTL,
        *,
        clock: Callable[[], float],
        max_lifetime: float = MAX_LIFETIME,
        per_identity: int = PER_IDENTITY,
        max_tokens: int = MAX_TOKENS,
    ) -> None:
        self.ttl = ttl
        self._clock = clock
        self._max_lifetime = max(max_lifetime, ttl)
        self._per_identity = per_identity
        self._max_tokens = max_tokens
        self._tokens: dict[bytes, Token] = {}
        self._by_id: dict[SpiffeId, dict[bytes, None]] = {}  # each identity's token hashes, oldest first
        self._swept = -float("inf")
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._tokens)

    def issue(self, caller: SpiffeId) -> tuple[str, Token]:
        """A new token for `caller`, and what is kept of it; `TooManyTokens` when memory is full."""
        now = self._clock()
        token = PREFIX + _random_text(30)
        entry = Token(caller, _random_text(15), now, self.ttl, now + self.ttl, now + self._max_lifetime)
        with self._lock:
            if now - self._swept >= SWEEP_EVERY or len(self._tokens) >= self._max_tokens:
                self._sweep(now)
            own = self._by_id.get(caller, {})
            while len(own) >= self._per_identity:
                self._drop(next(iter(own)))
            if len(self._tokens) >= self._max_tokens:
                raise TooManyTokens(f"{len(self._tokens)} live tokens")
            key = _digest(token)
            self._tokens[key] = entry
            self._by_id.setdefault(caller, {})[key] = None
        return token, entry

    def check(self, token: str, caller: SpiffeId | None) -> Token | None:
        """The live token `token` if it was issued to `caller`; None for any other (unknown, expired, revoked)."""
        entry = self._tokens.get(_digest(token))
        if entry is None or caller is None or entry.spiffe_id != caller:
            return None
        if entry.expires_at <= self._clock():
            with self._lock:
                self._drop(_digest(token))
            return None
        return entry

    def renew(self, token: str, caller: SpiffeId | None, increment: float | None) -> Token | None:
        """Extend a live token by `increment` seconds from now (its TTL when None), never past its lifetime."""
        now = self._clock()
        key = _digest(token)
        with self._lock:
            entry = self._tokens.get(key)
            if entry is None or caller is None or entry.spiffe_id != caller or entry.expires_at <= now:
                return None
            ttl = self.ttl if not increment or increment <= 0 else increment
            expires = min(now + ttl, entry.max_expires_at)
            renewed = msgspec.structs.replace(entry, ttl=expires - now, expires_at=expires)
            self._tokens[key] = renewed
        return renewed

    def revoke(self, token: str, caller: SpiffeId | None) -> bool:
        key = _digest(token)
        with self._lock:
            entry = self._tokens.get(key)
            if entry is None or caller is None or entry.spiffe_id != caller:
                return False
            self._drop(key)
        return True

    def _drop(self, key: bytes) -> None:
        entry = self._tokens.pop(key, None)
        if entry is None:
            return
        own = self._by_id.get(entry.spiffe_id)
        if own is not None:
            own.pop(key, None)
            if not own:
                del self._by_id[entry.spiffe_id]

    def _sweep(self, now: float) -> None:
        self._swept = now
        for key in [key for key, entry in self._tokens.items() if entry.expires_at <= now]:
            self._drop(key)
