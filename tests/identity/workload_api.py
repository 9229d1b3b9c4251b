"""A real SPIFFE Workload API server for tests (imported by the identity tests).

SPIRE cannot be installed here, so this stands in for a SPIRE agent: a gRPC
server on a unix socket speaking the Workload API with the real protobuf
definitions (the generated `workload_pb2` modules that the `spiffe` package
ships).  It implements the two X.509 calls a workload uses:

* ``FetchX509SVID`` (server streaming): the workload's SVID, key and trust
  bundle at once, and again every time the test rotates something;
* ``FetchX509Bundles`` (server streaming): the trust bundles alone.

As a SPIRE agent does, it refuses a call without the ``workload.spiffe.io:
true`` header (INVALID_ARGUMENT) and answers PERMISSION_DENIED "no identity
issued" to a workload that has no registration entry.

A SPIRE agent tells workloads apart by attesting the caller's process; here
each workload gets a socket of its own instead.  SVIDs are minted by `TestCa`
objects with devca's `mint_svid`, so they are exactly what `spike dev` issues.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Before gRPC is loaded: its fork handlers can abort a child forked while this
# server streams (grpc/grpc#43055), and the tests fork `spike` processes.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from spiffe._proto import workload_pb2, workload_pb2_grpc

from spike.app.commands.devca import CA_CERT, CA_KEY, DevIdentity, mint_svid, new_ca

# ---------------------------------------------------------------------- certificate authorities


class TestCa:
    """A SPIFFE trust domain's signing CA (in memory)."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(self, trust_domain: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.trust_domain = trust_domain
        self.cert = cert
        self.key = key

    @classmethod
    def new(cls, trust_domain: str, label: str = "test CA") -> TestCa:
        now = dt.datetime.now(dt.UTC)
        cert, key = new_ca(
            trust_domain, label, not_before=now - dt.timedelta(minutes=5), not_after=now + dt.timedelta(days=30)
        )
        return cls(trust_domain, cert, key)

    @classmethod
    def of(cls, identity: DevIdentity) -> TestCa:
        """The CA of a `mint_dev_identity` directory, so its files and the Workload API agree."""
        cert = x509.load_pem_x509_certificate((identity.directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((identity.directory / CA_KEY).read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(identity.trust_domain, cert, key)

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def mint(self, spiffe_id: str, *, hours: float = 1.0, server_names: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
        """(certificate PEM, PKCS8 key PEM) of a fresh SVID (with DNS/IP SANs for `server_names`, as SPIRE's -dns)."""
        now = dt.datetime.now(dt.UTC)
        return mint_svid(
            self.cert,
            self.key,
            spiffe_id,
            not_before=now - dt.timedelta(minutes=1),
            not_after=now + dt.timedelta(hours=hours),
            server_names=server_names,
        )


def serial_of(cert_pem_or_der: bytes) -> int:
    if cert_pem_or_der.startswith(b"-----"):
        return x509.load_pem_x509_certificate(cert_pem_or_der).serial_number
    return x509.load_der_x509_certificate(cert_pem_or_der).serial_number


def _der_of_pem_cert(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def _der_of_pem_key(pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(pem, None)
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# ---------------------------------------------------------------------- the gRPC service


# An answer a workload gets: its SVID response, or an error status.
Answer = workload_pb2.X509SVIDResponse | tuple[grpc.StatusCode, str]


class _Service(workload_pb2_grpc.SpiffeWorkloadAPIServicer):  # type: ignore[misc]
    """One workload's view of the Workload API: streams every new answer to every open stream."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._version = 0
        self._answer: Answer = (grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
        self._bundles: dict[str, bytes] = {}
        self._closed = False
        self.svid_streams = 0  # FetchX509SVID calls accepted
        self.bundle_streams = 0
        self.refused_calls = 0  # calls without the security header

    def publish(self, answer: Answer, bundles: dict[str, bytes]) -> None:
        with self._changed:
            self._answer = answer
            self._bundles = dict(bundles)
            self._version += 1
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _checked(self, context: Any) -> None:
        metadata = dict(context.invocation_metadata())
        if metadata.get("workload.spiffe.io") != "true":
            self.refused_calls += 1
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")

    def _versions(self, context: Any) -> Iterator[tuple[Answer, dict[str, bytes]]]:
        seen = -1
        while True:
            with self._changed:
                while self._version == seen and not self._closed and context.is_active():
                    self._changed.wait(0.05)
                if self._closed or not context.is_active():
                    return
                seen = self._version
                answer, bundles = self._answer, self._bundles
            yield answer, bundles

    def FetchX509SVID(self, request: Any, context: Any) -> Iterator[workload_pb2.X509SVIDResponse]:
        self._checked(context)
        self.svid_streams += 1
        for answer, _ in self._versions(context):
            if isinstance(answer, tuple):
                context.abort(*answer)
            yield answer

    def FetchX509Bundles(self, request: Any, context: Any) -> Iterator[workload_pb2.X509BundlesResponse]:
        self._checked(context)
        self.bundle_streams += 1
        for answer, bundles in self._versions(context):
            if isinstance(answer, tuple):
                context.abort(*answer)
            yield workload_pb2.X509BundlesResponse(bundles=bundles)


# ---------------------------------------------------------------------- the fixture


@dataclass
class Workload:
    name: str
    spiffe_id: str
    socket: Path
    service: _Service
    server: grpc.Server
    cert_pem: bytes = b""  # the SVID currently issued (leaf first), empty while none is
    key_pem: bytes = b""
    registered: bool = True
    history: list[int] = field(default_factory=list)  # serials issued, in order
    server_names: tuple[str, ...] = ()  # DNS/IP SANs of every SVID issued to it

    @property
    def address(self) -> str:
        return f"unix://{self.socket}"

    @property
    def serial(self) -> int:
        return serial_of(self.cert_pem)


class WorkloadApi:
    """Workload API sockets for named workloads, with SVIDs the test can rotate at any time."""

    def __init__(self, ca: TestCa) -> None:
        self.signing_ca = ca
        self.bundle: list[TestCa] = [ca]  # what every workload is told to trust
        self.federated: dict[str, list[TestCa]] = {}
        # A short directory: a unix socket path must fit in 108 bytes.
        self.directory = Path(tempfile.mkdtemp(prefix="wlapi-", dir="/tmp"))
        self.workloads: dict[str, Workload] = {}

    def add(self, name: str, spiffe_id: str, *, register: bool = True, server_names: tuple[str, ...] = ()) -> Workload:
        """A workload with its own socket; registered ones get an SVID at once (naming `server_names` too)."""
        service = _Service()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"wlapi-{name}"))
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(service, server)
        socket = self.directory / f"{name}.sock"
        server.add_insecure_port(f"unix:{socket}")
        server.start()
        workload = Workload(name, spiffe_id, socket, service, server, registered=register, server_names=server_names)
        self.workloads[name] = workload
        if register:
            self.issue(name)
        return workload

    def address(self, name: str) -> str:
        return self.workloads[name].address

    def serial(self, name: str) -> int:
        return self.workloads[name].serial

    # Rotations -----------------------------------------------------------------------------

    def issue(self, name: str, ca: TestCa | None = None) -> int:
        """A new SVID for `name` (from `ca`, default the signing CA), streamed at once; its serial."""
        workload = self.workloads[name]
        cert_pem, key_pem = (ca or self.signing_ca).mint(workload.spiffe_id, server_names=workload.server_names)
        workload.cert_pem, workload.key_pem, workload.registered = cert_pem, key_pem, True
        workload.history.append(workload.serial)
        self._publish(workload)
        return workload.serial

    def issue_all(self, ca: TestCa | None = None) -> None:
        if ca is not None:
            self.signing_ca = ca
        for name, workload in self.workloads.items():
            if workload.registered:
                self.issue(name)

    def set_bundle(self, cas: list[TestCa]) -> None:
        """Every workload is told to trust exactly these CAs (SVIDs unchanged)."""
        self.bundle = list(cas)
        self.republish()

    def federate(self, trust_domain: str, cas: list[TestCa]) -> None:
        self.federated[trust_domain] = list(cas)
        self.republish()

    def republish(self) -> None:
        for workload in self.workloads.values():
            if workload.registered:
                self._publish(workload)

    def deny(self, name: str, code: grpc.StatusCode = grpc.StatusCode.PERMISSION_DENIED) -> None:
        """Answer `name`'s streams with an error (PERMISSION_DENIED: no registration entry)."""
        workload = self.workloads[name]
        workload.registered = False
        workload.service.publish((code, "no identity issued"), {})

    def send(self, name: str, response: workload_pb2.X509SVIDResponse) -> None:
        """Stream any response at all (a broken one, for instance) to `name`."""
        self.workloads[name].service.publish(response, {})

    def response(self, workload: Workload, *, bundle: bytes | None = None) -> workload_pb2.X509SVIDResponse:
        """The response a SPIRE agent sends: the SVID chain and key in DER, the bundle as DER certificates."""
        own = b"".join(ca.der for ca in self.bundle) if bundle is None else bundle
        federated = {f"spiffe://{td}": b"".join(ca.der for ca in cas) for td, cas in self.federated.items()}
        chain = b"".join(
            c.public_bytes(serialization.Encoding.DER) for c in x509.load_pem_x509_certificates(workload.cert_pem)
        )
        return workload_pb2.X509SVIDResponse(
            svids=[
                workload_pb2.X509SVID(
                    spiffe_id=workload.spiffe_id,
                    x509_svid=chain,
                    x509_svid_key=_der_of_pem_key(workload.key_pem),
                    bundle=own,
                )
            ],
            federated_bundles=federated,
        )

    def _publish(self, workload: Workload) -> None:
        bundles = {f"spiffe://{self.signing_ca.trust_domain}": b"".join(ca.der for ca in self.bundle)}
        workload.service.publish(self.response(workload), bundles)

    def close(self) -> None:
        for workload in self.workloads.values():
            workload.service.close()
        for workload in self.workloads.values():
            workload.server.stop(grace=None).wait(5)
        shutil.rmtree(self.directory, ignore_errors=True)


__all__ = ["TestCa", "Workload", "WorkloadApi", "serial_of"]
