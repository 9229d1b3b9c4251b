"""Reading the SVID's own leaf: the ssl module's decoder and the cryptography fallback agree."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import pytest

from spike.app.commands.devca import DevIdentity
from spike.transports.pem import PemLoader, cert_time, leaf_identity
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


@pytest.mark.parametrize(
    "text",
    [
        "Jun  1 12:00:00 2027 GMT",  # a day under 10 is padded with a space, as OpenSSL prints it
        "Dec 31 23:59:59 9999 GMT",
        "Feb 29 00:00:00 2028 GMT",
        "Jan 01 00:00:01 1970 GMT",
        "Mar 12 07:08:09 2049 GMT",
        "Jun 31 12:00:00 2027 GMT",  # the ssl module rolls it over to July 1; so does cert_time, through it
    ],
)
def test_certificate_times_read_as_the_ssl_module_reads_them(text: str) -> None:
    assert cert_time(text).timestamp() == ssl.cert_time_to_seconds(text)
    assert cert_time(text).tzinfo is dt.UTC


@pytest.mark.parametrize("text", ["Foo  1 12:00:00 2027 GMT", "Jun  1 12:00 2027 GMT", "Jun  1 12:00:00 2027 UTC", ""])
def test_a_certificate_time_of_another_form_fails_as_the_ssl_module_fails(text: str) -> None:
    with pytest.raises(ValueError):
        ssl.cert_time_to_seconds(text)
    with pytest.raises(ValueError):
        cert_time(text)
