"""SPIKE's environment variables: each is honoured with SPIKE's meaning or refused at start, by name.

SPIKE_VARIABLES is SPIKE's own list (spiffe/spike-sdk-go config/env/global.go,
plus the names SPIKE's code, docs and log package read elsewhere), written
here by hand: a variable SPIKE adds must be decided on before this passes.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spike.app import cli, spike_env
from spike.app import config as cfg
from spike.app.commands.devca import DevIdentity
from spike.app.identity import WorkloadApiSpec
from spike.app.nexus.cipher_api import CipherApi
from spike.app.nexus.server import open_backend
from spike.app.spike_env import Component
from spike.protocol.api import ApiRequest, ApiResponse

REPO = Path(__file__).resolve().parents[2]

SPIKE_VARIABLES = frozenset(
    {
        # spike-sdk-go config/env/global.go
        "SPIKE_BANNER_ENABLED", "SPIKE_BOOTSTRAP_CONFIGMAP_NAME", "SPIKE_BOOTSTRAP_FORCE",
        "SPIKE_BOOTSTRAP_INIT_VERIFICATION_TIMEOUT", "SPIKE_BOOTSTRAP_TIMEOUT", "SPIKE_BOOTSTRAP_KEEPER_MAX_RETRIES",
        "SPIKE_BOOTSTRAP_KEEPER_RETRY_INITIAL_INTERVAL", "SPIKE_BOOTSTRAP_KEEPER_RETRY_MAX_INTERVAL",
        "SPIKE_BOOTSTRAP_KEEPER_TIMEOUT", "SPIKE_HTTP_CLIENT_DIALER_KEEP_ALIVE", "SPIKE_HTTP_CLIENT_DIALER_TIMEOUT",
        "SPIKE_HTTP_CLIENT_EXPECT_CONTINUE_TIMEOUT", "SPIKE_HTTP_CLIENT_IDLE_CONN_TIMEOUT",
        "SPIKE_HTTP_CLIENT_MAX_CONNS_PER_HOST", "SPIKE_HTTP_CLIENT_MAX_IDLE_CONNS",
        "SPIKE_HTTP_CLIENT_MAX_IDLE_CONNS_PER_HOST", "SPIKE_HTTP_CLIENT_RESPONSE_HEADER_TIMEOUT",
        "SPIKE_HTTP_CLIENT_TIMEOUT", "SPIKE_HTTP_CLIENT_TLS_HANDSHAKE_TIMEOUT", "SPIKE_HTTP_SERVER_READ_HEADER_TIMEOUT",
        "SPIKE_KEEPER_TLS_PORT", "SPIKE_NEXUS_API_URL", "SPIKE_NEXUS_BACKEND_STORE",
        "SPIKE_NEXUS_CRYPTO_MAX_CIPHERTEXT_SIZE", "SPIKE_NEXUS_DB_BUSY_TIMEOUT_MS", "SPIKE_NEXUS_DB_CONN_MAX_LIFETIME",
        "SPIKE_NEXUS_DB_INITIALIZATION_TIMEOUT", "SPIKE_NEXUS_DB_JOURNAL_MODE", "SPIKE_NEXUS_DB_MAX_IDLE_CONNS",
        "SPIKE_NEXUS_DB_MAX_OPEN_CONNS", "SPIKE_NEXUS_DB_OPERATION_TIMEOUT", "SPIKE_NEXUS_DB_SKIP_SCHEMA_CREATION",
        "SPIKE_NEXUS_DATA_DIR", "SPIKE_NEXUS_KEEPER_PEERS", "SPIKE_NEXUS_KEEPER_UPDATE_INTERVAL",
        "SPIKE_NEXUS_MAX_SECRET_VERSIONS", "SPIKE_NEXUS_PBKDF2_ITERATION_COUNT", "SPIKE_NEXUS_RECOVERY_MAX_INTERVAL",
        "SPIKE_NEXUS_SHAMIR_MAX_SHARE_COUNT", "SPIKE_NEXUS_SHAMIR_SHARES", "SPIKE_NEXUS_SHAMIR_THRESHOLD",
        "SPIKE_NEXUS_TLS_PORT", "SPIKE_PILOT_RECOVERY_DIR", "SPIKE_PILOT_SHOW_MEMORY_WARNING",
        "SPIKE_SPIFFE_SOURCE_TIMEOUT", "SPIKE_STACK_TRACES_ON_LOG_FATAL", "SPIKE_SYSTEM_LOG_LEVEL", "SPIKE_TRUST_ROOT",
        "SPIKE_TRUST_ROOT_BOOTSTRAP", "SPIKE_TRUST_ROOT_KEEPER", "SPIKE_TRUST_ROOT_LITE_WORKLOAD",
        "SPIKE_TRUST_ROOT_NEXUS", "SPIKE_TRUST_ROOT_PILOT",
        # read or documented elsewhere in spiffe/spike: old names in its docs, its Go test suite's switches
        "SPIKE_SHOW_MEMORY_WARNING", "SPIKE_DATABASE_SKIP_SCHEMA_CREATION", "SPIKE_INTEGRATION_TEST",
        "SPIKE_INTEGRATION_DESTRUCTIVE",
    }
)  # fmt: skip

PEERS_ENV = "1=https://k1.test:8443,2=https://k2.test:8443,3=https://k3.test:8443"


# Each test reads configuration from a clean slate: no SPIKE_* variable of the machine, an empty HOME.
pytestmark = pytest.mark.usefixtures("clean_environment")


def base_env(identity: DevIdentity) -> dict[str, str]:
    files = identity.files("nexus")
    return {
        "SPIKE_SVID_CERT": str(files.cert),
        "SPIKE_SVID_KEY": str(files.key),
        "SPIKE_SVID_BUNDLE": str(files.bundle),
        "SPIKE_NEXUS_KEEPER_PEERS": PEERS_ENV,
    }


def start(component: Component, env: dict[str, str]) -> object:
    """What each process does first with its configuration."""
    args = argparse.Namespace()
    if component is Component.NEXUS:
        return cfg.nexus(args, env)
    if component is Component.KEEPER:
        return cfg.keeper(args, env)
    if component is Component.BOOTSTRAP:
        return cfg.bootstrap(args, env)
    return cfg.client(args, env)


def refused(component: Component, env: dict[str, str]) -> str:
    with pytest.raises(cfg.ConfigError) as caught:
        start(component, env)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_every_variable_spike_reads_is_decided_on() -> None:
    assert spike_env.KNOWN == SPIKE_VARIABLES


def test_every_variable_has_a_row_in_the_docs() -> None:
    table = (REPO / "docs" / "spike-environment.md").read_text()
    missing = [name for name in sorted(SPIKE_VARIABLES) if f"`{name}`" not in table]
    assert not missing


REFUSALS = [(entry, component) for entry in spike_env.REFUSED for component in sorted(entry.components, key=str)]


@pytest.mark.parametrize(("entry", "component"), REFUSALS, ids=lambda x: getattr(x, "name", None) or str(x))
def test_a_refused_variable_stops_the_start_with_one_line_naming_it(
    entry: spike_env.Refused, component: Component, dev_identity: DevIdentity
) -> None:
    # SPIKE reads its on/off flags as "anything but true is off": for those, true is what spike cannot do.
    value = "true" if entry.accepted is not None and entry.accepted("not-what-spike-does") else "not-what-spike-does"
    message = refused(component, {**base_env(dev_identity), entry.name: value})
    assert message.startswith(f"{entry.name}={value!r} is not supported: ")


@pytest.mark.parametrize(
    ("name", "accepted", "refused_value"),
    [
        ("SPIKE_BANNER_ENABLED", "false", "TRUE"),
        ("SPIKE_BANNER_ENABLED", "1", " true "),  # SPIKE: anything but "true" is off
        ("SPIKE_STACK_TRACES_ON_LOG_FATAL", "False", "true"),
        ("SPIKE_NEXUS_DB_JOURNAL_MODE", "wal", "DELETE"),
        ("SPIKE_NEXUS_DB_BUSY_TIMEOUT_MS", "5000", "4000"),
        ("SPIKE_NEXUS_DB_SKIP_SCHEMA_CREATION", "false", "true"),
        ("SPIKE_NEXUS_DB_SKIP_SCHEMA_CREATION", "F", "1"),
        ("SPIKE_DATABASE_SKIP_SCHEMA_CREATION", "0", "T"),
    ],
)
def test_a_value_that_is_exactly_what_spike_does_is_accepted(
    name: str, accepted: str, refused_value: str, dev_identity: DevIdentity
) -> None:
    start(Component.NEXUS, {**base_env(dev_identity), name: accepted})
    assert refused(Component.NEXUS, {**base_env(dev_identity), name: refused_value}).startswith(name)


def test_a_variable_is_refused_only_by_the_components_spike_reads_it_in(dev_identity: DevIdentity) -> None:
    env = {**base_env(dev_identity), "SPIKE_NEXUS_DB_MAX_OPEN_CONNS": "10", "SPIKE_BOOTSTRAP_KEEPER_TIMEOUT": "30s"}
    start(Component.KEEPER, env)
    start(Component.PILOT, env)


def test_real_processes_exit_2_with_one_line(dev_identity: DevIdentity, tmp_path: Path) -> None:
    env = {**os.environ, **base_env(dev_identity), "HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    for argv, name in (
        (["nexus", "--check-config"], "SPIKE_NEXUS_DB_MAX_OPEN_CONNS"),
        (["bootstrap"], "SPIKE_BOOTSTRAP_KEEPER_MAX_RETRIES"),
        (["keeper"], "SPIKE_HTTP_SERVER_READ_HEADER_TIMEOUT"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "spike", *argv], env={**env, name: "7"}, capture_output=True, text=True, check=False
        )
        assert done.returncode == 2, done.stderr
        assert done.stdout == ""
        assert done.stderr.count("\n") == 1 and f"{name}='7' is not supported" in done.stderr


# Honoured variables: each one's effect.


def test_system_log_level_is_spikes_name_of_the_log_level(dev_identity: DevIdentity) -> None:
    env = base_env(dev_identity)
    for value, level in (("DEBUG", "debug"), ("info", "info"), ("WARN", "warning"), ("Error", "error")):
        config = start(Component.KEEPER, {**env, "SPIKE_SYSTEM_LOG_LEVEL": value})
        assert isinstance(config, cfg.KeeperConfig) and config.common.log_level == level
    both = start(Component.KEEPER, {**env, "SPIKE_SYSTEM_LOG_LEVEL": "ERROR", "SPIKE_LOG_LEVEL": "debug"})
    assert isinstance(both, cfg.KeeperConfig) and both.common.log_level == "debug"
    assert refused(Component.KEEPER, {**env, "SPIKE_SYSTEM_LOG_LEVEL": "loud"}).startswith("SPIKE_SYSTEM_LOG_LEVEL")


def test_spiffe_source_timeout_is_the_workload_api_wait_in_go_durations() -> None:
    env = {"SPIFFE_ENDPOINT_SOCKET": "unix:///run/agent.sock", "SPIKE_SPIFFE_SOURCE_TIMEOUT": "1m30s"}
    svid = cfg.common(argparse.Namespace(), env).svid
    assert isinstance(svid, WorkloadApiSpec) and svid.timeout == 90.0
    ours = cfg.common(argparse.Namespace(), {**env, "SPIKE_WORKLOAD_API_TIMEOUT": "5s"}).svid
    assert isinstance(ours, WorkloadApiSpec) and ours.timeout == 5.0


def test_go_durations_everywhere() -> None:
    assert cfg.parse_duration("1h2m3.5s", "x") == 3723.5
    assert cfg.parse_duration("250ms", "x") == 0.25
    assert cfg.parse_duration("1500us", "x") == 0.0015
    assert cfg.parse_duration("2", "x") == 2.0
    for bad in ("1d", "s", "1 m 2", "-1s", "0s"):
        with pytest.raises(cfg.ConfigError):
            cfg.parse_duration(bad, "x")


def test_trust_root_lists_of_one_domain_are_honoured_and_of_several_refused(dev_identity: DevIdentity) -> None:
    env = base_env(dev_identity)
    config = start(Component.NEXUS, {**env, "SPIKE_TRUST_ROOT": "a.test, a.test", "SPIKE_TRUST_ROOT_PILOT": "p.test,"})
    assert isinstance(config, cfg.NexusConfig)
    assert (config.common.trust.nexus, config.common.trust.pilot) == ("a.test", "p.test")
    message = refused(Component.NEXUS, {**env, "SPIKE_TRUST_ROOT_KEEPER": "a.test,b.test"})
    assert message.startswith("SPIKE_TRUST_ROOT_KEEPER='a.test,b.test': spike takes one trust domain per role")
    message = refused(Component.NEXUS, {**env, "SPIKE_TRUST_ROOT": "a.test,b.test"})
    assert message.startswith("SPIKE_TRUST_ROOT=")


def test_the_lite_workload_trust_root_names_the_domains_of_the_lite_role(dev_identity: DevIdentity) -> None:
    env = base_env(dev_identity)

    def domains(**more: str) -> tuple[str, ...]:
        config = start(Component.NEXUS, {**env, **more})
        assert isinstance(config, cfg.NexusConfig)
        return config.lite_workload_domains

    assert domains() == ("spike.ist",)
    assert domains(SPIKE_TRUST_ROOT="corp.test") == ("corp.test",)
    # Only an ID is compared for this role (no peer is trusted for it): SPIKE's list is honoured whole.
    assert domains(SPIKE_TRUST_ROOT_LITE_WORKLOAD="a.test, b.test,a.test") == ("a.test", "b.test")
    message = refused(Component.NEXUS, {**env, "SPIKE_TRUST_ROOT_LITE_WORKLOAD": "a.test,bad domain"})
    assert message.startswith("SPIKE_TRUST_ROOT_LITE_WORKLOAD: ")


def test_max_secret_versions_is_the_stores_default(dev_identity: DevIdentity, tmp_path: Path) -> None:
    env = {**base_env(dev_identity), "SPIKE_NEXUS_DATA_DIR": str(tmp_path / "data")}
    config = start(Component.NEXUS, {**env, "SPIKE_NEXUS_MAX_SECRET_VERSIONS": "3"})
    assert isinstance(config, cfg.NexusConfig)
    (tmp_path / "data").mkdir()
    backend = open_backend(config)
    try:
        assert backend.default_max_versions == 3
    finally:
        backend.close()
    default = start(Component.NEXUS, env)
    assert isinstance(default, cfg.NexusConfig) and default.max_secret_versions == 10
    for bad in ("0", "-1", "ten", "1001"):
        message = refused(Component.NEXUS, {**env, "SPIKE_NEXUS_MAX_SECRET_VERSIONS": bad})
        assert message.startswith("SPIKE_NEXUS_MAX_SECRET_VERSIONS must be")


def test_max_share_count_bounds_the_shares(dev_identity: DevIdentity) -> None:
    env = base_env(dev_identity)
    start(Component.NEXUS, {**env, "SPIKE_NEXUS_SHAMIR_MAX_SHARE_COUNT": "3"})
    message = refused(Component.NEXUS, {**env, "SPIKE_NEXUS_SHAMIR_MAX_SHARE_COUNT": "2"})
    assert message == "shares (3) is more than SPIKE_NEXUS_SHAMIR_MAX_SHARE_COUNT (2)"
    assert refused(Component.NEXUS, {**env, "SPIKE_NEXUS_SHAMIR_MAX_SHARE_COUNT": "0"}).startswith(
        "SPIKE_NEXUS_SHAMIR_MAX_SHARE_COUNT must be"
    )


def _cipher(api: CipherApi, action: str, body: bytes) -> ApiResponse:
    request = ApiRequest("POST", f"/v1/cipher/{action}", None, body, "", "application/octet-stream")
    answer = api.encrypt(request) if action == "encrypt" else api.decrypt(request)
    assert isinstance(answer, ApiResponse)
    return answer


def test_crypto_max_ciphertext_size_limits_the_cipher_as_spike_does(dev_identity: DevIdentity) -> None:
    config = start(Component.NEXUS, {**base_env(dev_identity), "SPIKE_NEXUS_CRYPTO_MAX_CIPHERTEXT_SIZE": "48"})
    assert isinstance(config, cfg.NexusConfig) and config.cipher_max_ciphertext == 48
    api = CipherApi(max_ciphertext=config.cipher_max_ciphertext)
    api.unlock(lambda: bytes(range(32)))
    sealed = _cipher(api, "encrypt", b"p" * 32)  # 32 bytes of plaintext: 48 of ciphertext with the tag
    assert sealed.status == 200
    assert _cipher(api, "decrypt", sealed.body).body == b"p" * 32
    too_long = _cipher(api, "encrypt", b"p" * 33)
    assert too_long.status == 400 and b"longer than 32 bytes" in too_long.body
    assert _cipher(api, "decrypt", sealed.body + b"x").status == 400
    default = CipherApi(max_ciphertext=None)
    default.unlock(lambda: bytes(range(32)))
    assert _cipher(default, "encrypt", b"p" * 65536).status == 200  # spike's own limit when unset: 1 MiB
    for bad in ("16", "0", "big", str(1024 * 1024 + 17)):
        assert refused(
            Component.NEXUS, {**base_env(dev_identity), "SPIKE_NEXUS_CRYPTO_MAX_CIPHERTEXT_SIZE": bad}
        ).startswith("SPIKE_NEXUS_CRYPTO_MAX_CIPHERTEXT_SIZE must be")


def test_backend_store_names(dev_identity: DevIdentity) -> None:
    env = base_env(dev_identity)
    url = "postgresql://spike@db.test/spike"

    def backend(**more: str) -> str:
        config = start(Component.NEXUS, {**env, **more})
        assert isinstance(config, cfg.NexusConfig)
        return config.backend

    assert backend() == "sqlite"
    assert backend(SPIKE_NEXUS_BACKEND_STORE="SQLite") == "sqlite"
    assert backend(SPIKE_NEXUS_DATABASE_URL=url) == "postgresql"
    assert backend(SPIKE_NEXUS_BACKEND_STORE="postgres", SPIKE_NEXUS_DATABASE_URL=url) == "postgresql"
    assert backend(SPIKE_NEXUS_BACKEND_STORE="postgresql", SPIKE_NEXUS_DATABASE_URL=url) == "postgresql"
    assert backend(SPIKE_NEXUS_BACKEND_STORE="Lite") == "lite"
    for more, start_of_line in (
        ({"SPIKE_NEXUS_BACKEND_STORE": "postgres"}, "SPIKE_NEXUS_BACKEND_STORE=postgres needs"),
        ({"SPIKE_NEXUS_BACKEND_STORE": "sqlite", "SPIKE_NEXUS_DATABASE_URL": url}, "SPIKE_NEXUS_BACKEND_STORE=sqlite"),
        ({"SPIKE_NEXUS_BACKEND_STORE": "etcd"}, "the backend store (--backend-store, SPIKE_NEXUS_BACKEND_STORE) must"),
        # memory is served now (tests/ops/test_memory_backend_config.py), without keepers: the base's are refused.
        ({"SPIKE_NEXUS_BACKEND_STORE": "memory"}, "--keepers (SPIKE_NEXUS_KEEPER_PEERS) cannot be used with"),
        (
            {"SPIKE_NEXUS_BACKEND_STORE": "lite", "SPIKE_NEXUS_DATABASE_URL": url},
            "SPIKE_NEXUS_BACKEND_STORE=lite keeps",
        ),
    ):
        assert refused(Component.NEXUS, {**env, **more}).startswith(start_of_line)


def test_bootstrap_force_and_timeout_as_spike_reads_them(dev_identity: DevIdentity) -> None:
    env = base_env(dev_identity)

    def config(**more: str) -> cfg.BootstrapConfig:
        found = start(Component.BOOTSTRAP, {**env, **more})
        assert isinstance(found, cfg.BootstrapConfig)
        return found

    assert config(SPIKE_BOOTSTRAP_FORCE="true").force
    assert not config(SPIKE_BOOTSTRAP_FORCE="TRUE").force  # SPIKE forces on exactly "true"
    assert not config().force
    assert config(SPIKE_BOOTSTRAP_TIMEOUT="0").timeout == math.inf  # SPIKE's 0: no deadline
    assert config(SPIKE_BOOTSTRAP_TIMEOUT="2m30s").timeout == 150.0
    assert config().timeout == 60.0


def test_pilot_recovery_dir_is_where_recover_writes_without_dir(
    dev_identity: DevIdentity, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = start(Component.PILOT, {**base_env(dev_identity), "SPIKE_PILOT_RECOVERY_DIR": "~/recover"})
    assert isinstance(config, cfg.ClientConfig) and config.recovery_dir == tmp_path / "home" / "recover"
    for name, value in base_env(dev_identity).items():
        monkeypatch.setenv(name, value)
    code = cli.main(["operator", "recover"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == "spike operator: give the directory for the shard files: --dir or SPIKE_PILOT_RECOVERY_DIR\n"
