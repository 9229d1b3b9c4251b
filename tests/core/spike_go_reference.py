"""SPIKE's ComputeShares, rewritten in Python from its Go code (not from spike's implementation).

What each step follows (read at spiffe/spike-sdk-go f45bc03, which pins cloudflare/circl v1.6.2, and
spiffe/spike 42547a7e; Go's crypto/rand as of Go 1.26, where Int still reads the reader it is given):

* spike-sdk-go ``crypto/shamir.go``, ``ComputeShares``: the root key is
  unmarshalled into a P-256 scalar (big-endian), and
  ``shamir.New(NewDeterministicReader(rk[:]), threshold-1, rootSecret).Share(n)``
  gives shares with ids 1..n; the Nexus (spike ``app/nexus/internal/
  initialization/recovery/update.go``, ``sendShardsToKeepers``) sends keeper
  ``k`` the share whose id is ``k``, marshalled as 32 big-endian bytes.
* spike-sdk-go ``crypto/io.go``, ``DeterministicReader.Read``: starts at
  SHA256(seed); when the current 32-byte block is used up, the next block is
  SHA256 of the previous one; a read copies what is left of the block.
* circl ``secretsharing/ss.go``, ``New``: coefficient 0 is the secret,
  coefficients 1..t are ``g.RandomScalar(rnd)`` in order; circl
  ``group/short.go``, ``RandomScalar``: ``crypto/rand.Int(rd, N)``; Go's
  ``crypto/rand/util.go``, ``Int``: reads ``k`` bytes with ``io.ReadFull``,
  masks the top byte to the bit length of N-1, retries while not below N.
* circl ``math/polynomial``, ``Evaluate``: Horner's rule mod N.
"""

from __future__ import annotations

import hashlib

from spike.protocol import ORDER


class DeterministicReader:
    """spike-sdk-go crypto/io.go DeterministicReader, read by read as the Go code does it."""

    def __init__(self, seed: bytes) -> None:
        self.data = hashlib.sha256(seed).digest()
        self.pos = 0

    def read(self, size: int) -> bytes:
        if self.pos >= len(self.data):
            self.data = hashlib.sha256(self.data).digest()
            self.pos = 0
        chunk = self.data[self.pos : self.pos + size]
        self.pos += len(chunk)
        return chunk


def _read_full(reader: DeterministicReader, size: int) -> bytes:
    out = b""
    while len(out) < size:
        out += reader.read(size - len(out))
    return out


def _go_rand_int(reader: DeterministicReader, maximum: int) -> int:
    """Go crypto/rand.Int(reader, maximum)."""
    bit_len = (maximum - 1).bit_length()
    k = (bit_len + 7) // 8
    b = bit_len % 8 or 8
    while True:
        buf = bytearray(_read_full(reader, k))
        buf[0] &= (1 << b) - 1
        n = int.from_bytes(buf, "big")
        if n < maximum:
            return n


def go_compute_shares(root_key: bytes, threshold: int, n: int) -> dict[int, bytes]:
    """SPIKE's ComputeShares: keeper id -> the 32 bytes SPIKE's Nexus sends it."""
    reader = DeterministicReader(root_key)
    poly = [int.from_bytes(root_key, "big")] + [_go_rand_int(reader, ORDER) for _ in range(threshold - 1)]

    def evaluate(x: int) -> int:
        acc = poly[-1]
        for c in reversed(poly[:-1]):
            acc = (acc * x + c) % ORDER
        return acc

    return {i: evaluate(i).to_bytes(32, "big") for i in range(1, n + 1)}
