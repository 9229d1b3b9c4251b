"""SPIKE's variables on real processes: a lite Nexus, SPIKE's version limit and log level (issue 17)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.e2e.harness import Cluster

pytestmark = pytest.mark.e2e


def test_spike_env_lite_nexus_serves_the_cipher_and_refuses_secrets_as_spikes_lite(
    make_cluster: Callable[..., Cluster],
) -> None:
    c = make_cluster(nexus_env={"SPIKE_NEXUS_BACKEND_STORE": "lite", "SPIKE_SYSTEM_LOG_LEVEL": "INFO"})
    c.start_ready()
    sealed = c.run("cipher", "encrypt", "--armor", stdin=b"attack at dawn")
    assert sealed.returncode == 0, sealed
    opened = c.run("cipher", "decrypt", stdin=sealed.stdout.encode())
    assert (opened.returncode, opened.stdout) == (0, "attack at dawn"), opened
    put = c.run("secret", "put", "a/b", "k=v")
    assert put.returncode != 0 and len(put.stderr.splitlines()) == 1, put
    assert "lite backend" in c.nexus().text()


def test_spike_env_max_secret_versions_keeps_that_many(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(nexus_env={"SPIKE_NEXUS_MAX_SECRET_VERSIONS": "2"})
    c.start_ready()
    for n in (1, 2, 3):
        assert c.run("secret", "put", "v/app", f"n={n}").returncode == 0
    kept = c.run("secret", "get", "v/app", "n", "--version", "2")
    assert kept.stdout == "2\n", kept
    old = c.run("secret", "get", "v/app", "n", "--version", "1")
    assert old.returncode != 0 and old.stdout == "", old  # SPIKE's 2: version 1 is gone


def test_spike_env_bootstrap_force_replaces_the_key_as_force_does(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster()
    c.start_ready()
    again = c.run("bootstrap", identity="bootstrap")
    assert again.returncode != 0, again  # already bootstrapped: refused without force
    forced = c.run("bootstrap", identity="bootstrap", env={"SPIKE_BOOTSTRAP_FORCE": "true"})
    assert forced.returncode == 0, forced
