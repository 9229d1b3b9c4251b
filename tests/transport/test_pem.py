"""Reading the SVID's own leaf: the ssl module's decoder and the cryptography fallback agree."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from spike.app.commands.devca import DevIdentity
from spike.transports.pem import PemLoader, leaf_identity
from spike.transports.tls import IdentityError

ROLES = ("nexus", "keeper-1", "bootstrap", "pilot-superuser")


@pytest.mark.parametrize("role", ROLES)
def test_the_fallback_reads_what_the_ssl_decoder_reads(dev_identity: DevIdentity, role: str) -> None:
    """`ssl._ssl._test_decode_cert` is a private CPython hook: where it is gone, cryptography must say the same."""
    assert hasattr(ssl, "_ssl") and hasattr(ssl._ssl, "_test_decode_cert"), "this CPython has the hook"
    files = dev_identity.files(role)
    chain, key = files.cert.read_bytes(), files.key.read_bytes()
    loader = PemLoader()
    try:
        with loader.paths(chain, key) as (chain_path, _, _):
            fast = leaf_identity(chain, chain_path)
            slow = leaf_identity(chain, chain_path, use_ssl_decoder=False)
    finally:
        loader.close()
    assert fast == slow
    assert str(fast.spiffe_id).startswith("spiffe://spike.test/spike/")


@pytest.mark.parametrize("use_ssl_decoder", [True, False])
def test_both_readers_refuse_a_chain_that_is_not_a_certificate(use_ssl_decoder: bool, tmp_path: Path) -> None:
    path = tmp_path / "chain.pem"
    garbage = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
    path.write_bytes(garbage)
    with pytest.raises(IdentityError, match="cannot be parsed"):
        leaf_identity(garbage, str(path), use_ssl_decoder=use_ssl_decoder)
