"""The memory backend's configuration: SPIKE_NEXUS_BACKEND_STORE=memory or `--backend-store memory`, and what
cannot go with it (issue 17 section 4).

Every setting that speaks of keepers, shards, rotation or somewhere to keep data is refused at start in
one line naming it: a Nexus that ignored `--keepers` would let its operator believe the secrets are kept.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spike.app import cli
from spike.app import config as cfg
from spike.app.commands.devca import DevIdentity

REPO = Path(__file__).resolve().parents[2]


# Each test reads configuration from a clean slate: no SPIKE_* variable of the machine, an empty HOME.
pytestmark = pytest.mark.usefixtures("clean_environment")


def svid_env(identity: DevIdentity) -> dict[str, str]:
    files = identity.files("nexus")
    return {
        "SPIKE_SVID_CERT": str(files.cert),
        "SPIKE_SVID_KEY": str(files.key),
        "SPIKE_SVID_BUNDLE": str(files.bundle),
    }


def parsed(argv: list[str]) -> argparse.Namespace:
    return cli.build_parser().parse_args(["nexus", *argv])


def test_memory_by_spikes_variable_or_by_the_flag_needs_no_keepers(dev_identity: DevIdentity) -> None:
    env = svid_env(dev_identity)
    for args, more in (
        (parsed([]), {"SPIKE_NEXUS_BACKEND_STORE": "memory"}),
        (parsed([]), {"SPIKE_NEXUS_BACKEND_STORE": "Memory"}),
        (parsed(["--backend-store", "memory"]), {}),
    ):
        config = cfg.nexus(args, {**env, **more})
        assert config.backend == "memory"
        assert (config.keepers, config.threshold, config.data_dir, config.audit_log) == ({}, 0, cfg.NO_DATA_DIR, None)
    # What still means something: the listen address, an audit log asked for, versions kept, memory lock.
    config = cfg.nexus(
        parsed(["--backend-store", "memory", "--audit-log", "/tmp/a.log", "--listen", ":9999"]),
        {**env, "SPIKE_NEXUS_MAX_SECRET_VERSIONS": "4", "SPIKE_REQUIRE_MEMORY_LOCK": "true"},
    )
    assert (config.bind[1], config.audit_log, config.max_secret_versions) == (9999, Path("/tmp/a.log"), 4)
    assert config.require_memory_lock


def test_the_flag_wins_over_spikes_variable(dev_identity: DevIdentity) -> None:
    peers = "https://k1:8443,https://k2:8443,https://k3:8443"
    env = {**svid_env(dev_identity), "SPIKE_NEXUS_BACKEND_STORE": "sqlite", "SPIKE_NEXUS_KEEPER_PEERS": peers}
    assert cfg.nexus(parsed(["--backend-store", "memory"]), {**env, "SPIKE_NEXUS_KEEPER_PEERS": ""}).backend == "memory"
    assert cfg.nexus(parsed(["--backend-store", "lite"]), env).backend == "lite"


REFUSED_FLAGS = [
    (["--keepers", "1=https://k1:8443"], "--keepers (SPIKE_NEXUS_KEEPER_PEERS)"),
    (["--retiring-keepers", "4=https://k4:8443"], "--retiring-keepers (SPIKE_NEXUS_RETIRING_KEEPER_PEERS)"),
    (["--shares", "3"], "--shares (SPIKE_NEXUS_SHAMIR_SHARES)"),
    (["--threshold", "2"], "--threshold (SPIKE_NEXUS_SHAMIR_THRESHOLD)"),
    (["--shard-derivation", "spike"], "--shard-derivation (SPIKE_NEXUS_SHARD_DERIVATION)"),
    (["--keeper-identity", "spike"], "--keeper-identity (SPIKE_NEXUS_KEEPER_IDENTITY)"),
    (["--poll-interval", "1s"], "--poll-interval (SPIKE_NEXUS_KEEPER_POLL_INTERVAL)"),
    (["--keeper-timeout", "1s"], "--keeper-timeout (SPIKE_NEXUS_KEEPER_TIMEOUT)"),
    (["--rotate-every", "24h"], "--rotate-every (SPIKE_NEXUS_ROTATE_EVERY)"),
    (["--data-dir", "/tmp/x"], "--data-dir (SPIKE_NEXUS_DATA_DIR)"),
    (["--database-url", "postgresql://db/spike"], "--database-url (SPIKE_NEXUS_DATABASE_URL)"),
    (["--metrics-listen", ":9090"], "--metrics-listen (SPIKE_NEXUS_METRICS_LISTEN)"),
]

REFUSED_VARIABLES = [
    ("SPIKE_NEXUS_KEEPER_PEERS", "https://k1:8443"),
    ("SPIKE_NEXUS_RETIRING_KEEPER_PEERS", "4=https://k4:8443"),
    ("SPIKE_NEXUS_SHAMIR_SHARES", "3"),
    ("SPIKE_NEXUS_SHAMIR_THRESHOLD", "2"),
    ("SPIKE_NEXUS_SHAMIR_MAX_SHARE_COUNT", "5"),
    ("SPIKE_NEXUS_SHARD_DERIVATION", "hmac"),
    ("SPIKE_NEXUS_KEEPER_IDENTITY", "per-id"),
    ("SPIKE_NEXUS_KEEPER_POLL_INTERVAL", "5s"),
    ("SPIKE_NEXUS_KEEPER_TIMEOUT", "2s"),
    ("SPIKE_NEXUS_WAITING_SUMMARY_INTERVAL", "30s"),
    ("SPIKE_NEXUS_KEEPER_SUMMARY_INTERVAL", "5m"),
    ("SPIKE_NEXUS_ROTATE_EVERY", "24h"),
    ("SPIKE_NEXUS_DATA_DIR", "/tmp/x"),
    ("SPIKE_NEXUS_DATABASE_URL", "postgresql://db/spike"),
    ("SPIKE_NEXUS_METRICS_LISTEN", ":9090"),
]


@pytest.mark.parametrize(("argv", "named"), REFUSED_FLAGS)
def test_a_setting_that_means_nothing_without_keepers_is_refused_by_flag(
    dev_identity: DevIdentity, argv: list[str], named: str
) -> None:
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.nexus(parsed(["--backend-store", "memory", *argv]), svid_env(dev_identity))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{named} cannot be used with the memory backend"), message


@pytest.mark.parametrize(("name", "value"), REFUSED_VARIABLES)
def test_a_setting_that_means_nothing_without_keepers_is_refused_by_variable(
    dev_identity: DevIdentity, name: str, value: str
) -> None:
    env = {**svid_env(dev_identity), "SPIKE_NEXUS_BACKEND_STORE": "memory", name: value}
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.nexus(parsed([]), env)
    message = str(caught.value)
    assert "\n" not in message and name in message and "memory backend" in message, message


def test_the_toml_file_counts_as_its_variables(dev_identity: DevIdentity, tmp_path: Path) -> None:
    file = tmp_path / "nexus.toml"
    file.write_text('[nexus]\nbackend_store = "memory"\nthreshold = 2\n')
    env = {**svid_env(dev_identity), **cfg.load_config_file(file)}
    with pytest.raises(cfg.ConfigError, match=r"^--threshold \(SPIKE_NEXUS_SHAMIR_THRESHOLD\) cannot be used"):
        cfg.nexus(parsed([]), env)


def test_a_real_process_refuses_in_one_line_and_checks_its_config(dev_identity: DevIdentity, tmp_path: Path) -> None:
    env = {**os.environ, **svid_env(dev_identity), "HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    env["SPIKE_NEXUS_BACKEND_STORE"] = "memory"
    refused = subprocess.run(
        [sys.executable, "-m", "spike", "nexus", "--keepers", "1=https://k1:8443"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "--keepers (SPIKE_NEXUS_KEEPER_PEERS) cannot be used" in refused.stderr
    checked = subprocess.run(
        [sys.executable, "-m", "spike", "nexus", "--check-config"], env=env, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stderr
    assert '"backend": "memory"' in checked.stdout and '"keepers": {}' in checked.stdout
    assert list(tmp_path.iterdir()) == []  # no ~/.spike made
