"""A real `spike keeper` on SVID files that are rotated under it, as spiffe-helper or a Kubernetes volume does.

The keeper looks at its files at most once a second, when a connection
arrives; each probe here is a new connection and reads the serial of the
certificate the keeper presents.  A broken write is ignored (one warning),
an in-place rewrite is picked up once complete, and so is a Kubernetes-style
swap of the whole directory behind a symlink.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spike.app.commands.devca import DevIdentity
from spike.transports.tls import client_context
from tests.e2e.harness import base_env, pick_port, presented_serial, wait_until
from tests.identity.workload_api import TestCa, serial_of

pytestmark = pytest.mark.e2e

KEEPER = "spiffe://spike.test/spike/keeper/1"


def write_svid(directory: Path, ca: TestCa, *, in_place: bool = False) -> int:
    cert, key = ca.mint(KEEPER)
    for name, data in (("svid.pem", cert), ("svid_key.pem", key), ("bundle.pem", ca.pem)):
        path = directory / name
        if in_place and path.exists():
            with path.open("r+b") as f:  # truncate and write, as a plain open(..., "w") does
                f.truncate(0)
                f.write(data)
        else:
            path.write_bytes(data)
    return serial_of(cert)


def test_a_keeper_follows_its_svid_files(dev_identity: DevIdentity, tmp_path: Path) -> None:
    ca = TestCa.of(dev_identity)
    # As Kubernetes mounts a secret: files reached through a symlink to the current directory.
    first_dir, second_dir = tmp_path / "v1", tmp_path / "v2"
    first_dir.mkdir()
    second_dir.mkdir()
    current = tmp_path / "current"
    current.symlink_to(first_dir)
    first = write_svid(first_dir, ca)
    port = pick_port()
    log = tmp_path / "keeper.log"
    env = {
        **base_env(),
        "SPIKE_SVID_CERT": str(current / "svid.pem"),
        "SPIKE_SVID_KEY": str(current / "svid_key.pem"),
        "SPIKE_SVID_BUNDLE": str(current / "bundle.pem"),
        "SPIKE_TRUST_ROOT": "spike.test",
    }
    with log.open("wb") as out:
        keeper = subprocess.Popen(
            [sys.executable, "-m", "spike", "keeper", "--listen", f"127.0.0.1:{port}"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: "listening on" in log.read_text() or keeper.poll() is not None, "the keeper to listen")
        assert keeper.poll() is None, log.read_text()
        nexus = client_context(dev_identity.files("nexus"))
        assert presented_serial(port, nexus) == first

        # A broken write: ignored, said once, the keeper goes on with its SVID.
        (first_dir / "svid.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\ntruncat")
        wait_until(
            lambda: presented_serial(port, nexus) == first and "do not load" in log.read_text(),
            "the broken files to be noticed",
            every=0.1,
        )
        probes_until = time.monotonic() + 1.2  # more than one check interval of probing
        while time.monotonic() < probes_until:
            assert presented_serial(port, nexus) == first
            time.sleep(0.1)

        # Rewritten in place, file after file: picked up once all three load together.
        second = write_svid(first_dir, ca, in_place=True)
        wait_until(lambda: presented_serial(port, nexus) == second, "the rewritten SVID", every=0.1)

        # The whole directory swapped at once (a new symlink renamed over the old one).
        third = write_svid(second_dir, ca)
        swap = tmp_path / "current.new"
        swap.symlink_to(second_dir)
        os.replace(swap, current)
        wait_until(lambda: presented_serial(port, nexus) == third, "the swapped-in SVID", every=0.1)
        shutil.rmtree(first_dir)  # the old version goes, as the kubelet removes it
        for _ in range(5):
            assert presented_serial(port, nexus) == third
    finally:
        keeper.kill()
        keeper.wait(10)
    text = log.read_text()
    assert text.count("do not load") == 1, text
    assert text.count("X.509 SVID rotated") == 2, text
    assert "Traceback" not in text
