"""One configuration model: flag > environment variable > TOML file > default, for every setting.

Each setting is checked through `spike nexus --check-config` itself (the
real parser, the real environment and file layers, the printed JSON), four
times: default only, then the file, then the environment over the file, then
a flag over both.  A bad file (unknown key, wrong type, not TOML, unreadable)
stops any subcommand with exit code 2 and one line on stderr.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from spike.app import cli
from spike.app import config as cfg
from spike.app.commands.devca import DevIdentity

PEERS = {1: "https://k1.test:8443", 2: "https://k2.test:8443", 3: "https://k3.test:8443"}
PEERS_ENV = ",".join(f"{i}={u}" for i, u in PEERS.items())


# Each test reads configuration from a clean slate: no SPIKE_* variable of the machine, an empty HOME.
pytestmark = pytest.mark.usefixtures("clean_environment")


@pytest.fixture
def svid(dev_identity: DevIdentity, monkeypatch: pytest.MonkeyPatch) -> DevIdentity:
    files = dev_identity.files("nexus")
    monkeypatch.setenv("SPIKE_SVID_CERT", str(files.cert))
    monkeypatch.setenv("SPIKE_SVID_KEY", str(files.key))
    monkeypatch.setenv("SPIKE_SVID_BUNDLE", str(files.bundle))
    return dev_identity


def toml_value(value: object) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)  # strings and numbers are written alike


def write_toml(path: Path, settings: dict[str, dict[str, object]]) -> Path:
    lines = [f"{k} = {toml_value(v)}" for k, v in settings.get("", {}).items()]
    for section, values in settings.items():
        if section:
            lines.append(f"[{section}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
    path.write_text("\n".join(lines) + "\n")
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def check_config(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code, out, err = run(["nexus", "--check-config", *args], capsys)
    assert code == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


@dataclass(frozen=True)
class Setting:
    section: str  # "" for a top-level key
    key: str
    env: str
    flag: str | None
    values: tuple[object, object, object]  # in the file, in the environment, as a flag
    read: Callable[[dict[str, Any]], object]
    expect: tuple[object, object, object, object]  # with: nothing, the file, + env, + flag

    def __str__(self) -> str:
        return f"{self.section}.{self.key}" if self.section else self.key


HOME_DATA = "HOME/.spike/data"
PER_ID = {"keeper_identity": "per-id", "nexus_identity": "exact"}  # how keepers' and Nexus's SPIFFE IDs are read
SETTINGS = [
    Setting("nexus", "listen", "SPIKE_NEXUS_TLS_PORT", "--listen", (":1001", "127.0.0.2:1002", "[::1]:1003"),
            lambda c: c["bind"], (["0.0.0.0", 8553], ["0.0.0.0", 1001], ["127.0.0.2", 1002], ["::1", 1003])),
    Setting("nexus", "poll_interval", "SPIKE_NEXUS_KEEPER_POLL_INTERVAL", "--poll-interval", ("2s", "3000ms", "4"),
            lambda c: c["schedule"]["interval"], (5.0, 2.0, 3.0, 4.0)),
    Setting("nexus", "keeper_timeout", "SPIKE_NEXUS_KEEPER_TIMEOUT", "--keeper-timeout", (1, "1.5s", "500ms"),
            lambda c: c["schedule"]["request_timeout"], (2.0, 1.0, 1.5, 0.5)),
    Setting("nexus", "threshold", "SPIKE_NEXUS_SHAMIR_THRESHOLD", "--threshold", (3, "2", "3"),
            lambda c: c["threshold"], (2, 3, 2, 3)),
    Setting("nexus", "data_dir", "SPIKE_NEXUS_DATA_DIR", "--data-dir", ("/srv/file", "/srv/env", "/srv/flag"),
            lambda c: c["data_dir"], (HOME_DATA, "/srv/file", "/srv/env", "/srv/flag")),
    Setting("nexus", "metrics_listen", "SPIKE_NEXUS_METRICS_LISTEN", "--metrics-listen",
            ("127.0.0.1:9101", ":9102", "[::1]:9103"), lambda c: c["metrics_bind"],
            (None, ["127.0.0.1", 9101], ["0.0.0.0", 9102], ["::1", 9103])),
    Setting("nexus", "audit_log", "SPIKE_NEXUS_AUDIT_LOG", "--audit-log", ("/log/file", "/log/env", "/log/flag"),
            lambda c: c["audit_log"], (f"{HOME_DATA}/audit.log", "/log/file", "/log/env", "/log/flag")),
    Setting("nexus", "shutdown_grace", "SPIKE_NEXUS_SHUTDOWN_GRACE", "--shutdown-grace", ("1s", "2s", "3s"),
            lambda c: c["shutdown_grace"], (5.0, 1.0, 2.0, 3.0)),
    Setting("nexus", "waiting_summary_interval", "SPIKE_NEXUS_WAITING_SUMMARY_INTERVAL", None, ("10s", "20s", None),
            lambda c: c["waiting_summary_every"], (30.0, 10.0, 20.0, 20.0)),
    Setting("nexus", "keeper_summary_interval", "SPIKE_NEXUS_KEEPER_SUMMARY_INTERVAL", None, ("1m", "2m", None),
            lambda c: c["keeper_summary_every"], (300.0, 60.0, 120.0, 120.0)),
    Setting("nexus", "database_url", "SPIKE_NEXUS_DATABASE_URL", "--database-url",
            ("postgresql://f:pw-file@db.test/spike", "postgresql://e@db.test:5433/spike",
             "postgres://g:pw-flag@[::1]/spike?password=pw-query&sslmode=require"),
            lambda c: c["database_url"], (None, "postgresql://f:***@db.test/spike", "postgresql://e@db.test:5433/spike",
                                          "postgres://g:***@[::1]/spike?password=***&sslmode=require")),
    Setting("nexus", "max_secret_versions", "SPIKE_NEXUS_MAX_SECRET_VERSIONS", None, (5, "7", None),
            lambda c: c["max_secret_versions"], (10, 5, 7, 7)),
    Setting("nexus", "crypto_max_ciphertext_size", "SPIKE_NEXUS_CRYPTO_MAX_CIPHERTEXT_SIZE", None, (1000, "2000", None),
            lambda c: c["cipher_max_ciphertext"], (None, 1000, 2000, 2000)),
    Setting("", "log_level", "SPIKE_LOG_LEVEL", "--log-level", ("debug", "WARNING", "error"),
            lambda c: c["common"]["log_level"], ("info", "debug", "warning", "error")),
    Setting("", "log_format", "SPIKE_LOG_FORMAT", "--log-format", ("json", "text", "json"),
            lambda c: c["common"]["log_format"], ("text", "json", "text", "json")),
    Setting("", "trust_domain", "SPIKE_TRUST_ROOT", "--trust-domain", ("file.test", "env.test", "flag.test"),
            lambda c: c["common"]["trust"], (
                {**dict.fromkeys(("nexus", "keeper", "bootstrap", "pilot"), "spike.ist"), **PER_ID},
                {**dict.fromkeys(("nexus", "keeper", "bootstrap", "pilot"), "file.test"), **PER_ID},
                {**dict.fromkeys(("nexus", "keeper", "bootstrap", "pilot"), "env.test"), **PER_ID},
                {**dict.fromkeys(("nexus", "keeper", "bootstrap", "pilot"), "flag.test"), **PER_ID},
            )),
    Setting("nexus", "keeper_identity", "SPIKE_NEXUS_KEEPER_IDENTITY", "--keeper-identity",
            ("spike", "per-id", "spike"), lambda c: c["common"]["trust"]["keeper_identity"],
            ("per-id", "spike", "per-id", "spike")),
    Setting("nexus", "shard_derivation", "SPIKE_NEXUS_SHARD_DERIVATION", "--shard-derivation",
            ("spike", "hmac", "spike"), lambda c: c["shard_derivation"], ("hmac", "spike", "hmac", "spike")),
    Setting("trust", "keeper", "SPIKE_TRUST_ROOT_KEEPER", None, ("k-file.test", "k-env.test", None),
            lambda c: c["common"]["trust"]["keeper"], ("spike.ist", "k-file.test", "k-env.test", "k-env.test")),
    Setting("nexus", "keepers", "SPIKE_NEXUS_KEEPER_PEERS", "--keepers",
            ({"1": "https://f1:1", "2": "https://f2:1", "3": "https://f3:1"},
             "4=https://e4:1,5=https://e5:1,6=https://e6:1", "https://p1:1,https://p2:1,https://p3:1"),
            lambda c: c["keepers"], (None,
                                     {"1": "https://f1:1", "2": "https://f2:1", "3": "https://f3:1"},
                                     {"4": "https://e4:1", "5": "https://e5:1", "6": "https://e6:1"},
                                     {"1": "https://p1:1", "2": "https://p2:1", "3": "https://p3:1"})),
]  # fmt: skip


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_flag_over_environment_over_file_over_default(
    setting: Setting, svid: DevIdentity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    home = str(tmp_path / "home")

    def effective(*args: str) -> object:
        found = setting.read(check_config(capsys, *args))
        return json.loads(json.dumps(found).replace(home, "HOME"))

    if setting.env != "SPIKE_NEXUS_KEEPER_PEERS":
        monkeypatch.setenv("SPIKE_NEXUS_KEEPER_PEERS", PEERS_ENV)
        assert effective() == setting.expect[0]
    file_value, env_value, flag_value = setting.values
    config = write_toml(tmp_path / "spike.toml", {setting.section: {setting.key: file_value}})
    assert effective("--config", str(config)) == setting.expect[1]
    monkeypatch.setenv(setting.env, str(env_value))
    assert effective("--config", str(config)) == setting.expect[2]
    if setting.flag is not None:
        assert effective("--config", str(config), setting.flag, str(flag_value)) == setting.expect[3]
    assert not (tmp_path / "home").exists()  # nothing was created, not even the default data dir


def test_svid_files_from_the_file_the_environment_or_flags(
    dev_identity: DevIdentity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPIKE_NEXUS_KEEPER_PEERS", PEERS_ENV)
    nexus, keeper = dev_identity.files("nexus"), dev_identity.keeper(1)
    config = write_toml(
        tmp_path / "spike.toml",
        {"": {"svid_cert": str(nexus.cert), "svid_key": str(nexus.key), "svid_bundle": str(nexus.bundle)}},
    )
    svid = check_config(capsys, "--config", str(config))["common"]["svid"]
    assert svid == {"cert": str(nexus.cert), "key": str(nexus.key), "bundle": str(nexus.bundle), "trust_bundles": []}
    monkeypatch.setenv("SPIKE_SVID_CERT", str(keeper.cert))
    assert check_config(capsys, "--config", str(config))["common"]["svid"]["cert"] == str(keeper.cert)
    svid = check_config(capsys, "--config", str(config), "--svid-key", str(keeper.key))["common"]["svid"]
    assert svid == {"cert": str(keeper.cert), "key": str(keeper.key), "bundle": str(nexus.bundle), "trust_bundles": []}
    # Other trust domains' bundles are part of the effective configuration too.
    monkeypatch.setenv("SPIKE_TRUST_BUNDLES", f"other.test={nexus.bundle}")
    svid = check_config(capsys, "--config", str(config))["common"]["svid"]
    assert svid["trust_bundles"] == [["other.test", str(nexus.bundle)]]


def test_an_empty_environment_variable_does_not_hide_the_file(
    svid: DevIdentity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_toml(tmp_path / "spike.toml", {"nexus": {"keepers": PEERS_ENV, "poll_interval": "2s"}})
    monkeypatch.setenv("SPIKE_NEXUS_KEEPER_POLL_INTERVAL", "")
    monkeypatch.setenv("SPIKE_NEXUS_KEEPER_PEERS", "")
    effective = check_config(capsys, "--config", str(config))
    assert effective["schedule"]["interval"] == 2.0
    assert effective["keepers"] == {str(i): u for i, u in PEERS.items()}


def test_spike_config_names_the_file_and_the_flag_wins_over_it(
    svid: DevIdentity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    by_env = write_toml(
        tmp_path / "env.toml", {"": {"allow_threshold_one": True}, "nexus": {"keepers": PEERS_ENV, "threshold": 1}}
    )
    by_flag = write_toml(tmp_path / "flag.toml", {"nexus": {"keepers": PEERS_ENV, "threshold": 3}})
    monkeypatch.setenv("SPIKE_CONFIG", str(by_env))
    assert check_config(capsys)["threshold"] == 1
    assert check_config(capsys, "--config", str(by_flag))["threshold"] == 3


@pytest.mark.parametrize(
    "keepers",
    [
        '[nexus]\nkeepers = { 1 = "https://k1.test:8443", 2 = "https://k2.test:8443", 3 = "https://k3.test:8443" }',
        '[nexus.keepers]\n1 = "https://k1.test:8443"\n2 = "https://k2.test:8443"\n3 = "https://k3.test:8443"',
        '[nexus]\nkeepers = ["https://k1.test:8443", "https://k2.test:8443", "https://k3.test:8443"]',
        f'[nexus]\nkeepers = "{PEERS_ENV}"',
    ],
    ids=["inline table", "table", "list", "string"],
)
def test_every_form_of_the_keeper_list_in_the_file(
    keepers: str, svid: DevIdentity, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "spike.toml"
    config.write_text(keepers + "\n")
    assert check_config(capsys, "--config", str(config))["keepers"] == {str(i): u for i, u in PEERS.items()}


def test_check_config_prints_the_whole_effective_configuration_and_touches_nothing(
    svid: DevIdentity, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    config = write_toml(tmp_path / "spike.toml", {"nexus": {"keepers": PEERS_ENV, "data_dir": str(data)}})
    code, out, err = run(["nexus", "--check-config", "--config", str(config), "--metrics-listen", ":0"], capsys)
    assert (code, err) == (0, "")
    shown = json.loads(out)
    assert set(shown) == {
        "common", "bind", "keepers", "threshold", "schedule", "data_dir", "metrics_bind", "audit_log",
        "shutdown_grace", "waiting_summary_every", "keeper_summary_every", "database_url", "require_memory_lock",
        "retiring_keepers", "rotate_every", "crash_at", "config_file", "vault_kv_mount", "vault_token_ttl",
        "backend", "max_secret_versions", "cipher_max_ciphertext", "lite_workload_domains", "shard_derivation",
        "read_cache_staleness",
    }  # fmt: skip
    assert set(shown["common"]) == {"trust", "svid", "log_level", "log_format"}
    assert shown["audit_log"] == str(data / "audit.log")
    # Paths, never what the files hold.
    nexus = svid.files("nexus")
    for pem in (nexus.cert, nexus.key, nexus.bundle):
        assert pem.read_text().splitlines()[1] not in out
    assert "PRIVATE KEY" not in out and "BEGIN" not in out
    assert not data.exists()


def test_check_config_shows_the_workload_api_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", f"unix://{tmp_path}/agent.sock")
    monkeypatch.setenv("SPIKE_NEXUS_KEEPER_PEERS", PEERS_ENV)
    svid = check_config(capsys)["common"]["svid"]
    assert str(tmp_path / "agent.sock") in json.dumps(svid)


def test_the_other_subcommands_read_the_same_file(svid: DevIdentity, tmp_path: Path) -> None:
    config = write_toml(
        tmp_path / "spike.toml",
        {
            "": {"nexus_url": "https://nexus.test:9000", "log_format": "json"},
            "keeper": {"listen": "127.0.0.1:8441"},
            "bootstrap": {"timeout": "7s"},
        },
    )
    parser = cli.build_parser()

    def parse(*argv: str) -> Any:
        return parser.parse_args([*argv, "--config", str(config)])

    args = parse("keeper")
    assert cfg.keeper(args, cfg.environ(args)).bind == ("127.0.0.1", 8441)
    args = parse("bootstrap")
    boot = cfg.bootstrap(args, cfg.environ(args))
    assert (boot.nexus_url, boot.timeout, boot.common.log_format) == ("https://nexus.test:9000", 7.0, "json")
    for argv in (("status",), ("operator", "recover", "--dir", "x"), ("operator", "restore")):
        args = parse(*argv)
        assert cfg.client(args, cfg.environ(args)).nexus_url == "https://nexus.test:9000", argv
    args = parser.parse_args(["status", "--config", str(config), "--nexus", "https://flag.test:1"])
    assert cfg.client(args, cfg.environ(args)).nexus_url == "https://flag.test:1"


BAD_FILES = {
    "unknown top-level key": ("bogus = 1\n", "unknown setting bogus"),
    "unknown key in a section": ('[nexus]\npoll_intervall = "1s"\n', "unknown setting nexus.poll_intervall"),
    "unknown section": ('[nexsu]\nlisten = ":1"\n', "unknown setting nexsu"),
    "a section that is not a table": ('trust = "x.test"\n', "trust must be a table"),
    "an array of tables": ('[[nexus]]\nlisten = ":1"\n', "nexus must be a table"),
    "a value of the wrong type": ("[nexus]\nthreshold = [1, 2]\n", "nexus.threshold has an unsupported value type"),
    "a nested table": ('[nexus.schedule]\ninterval = "1s"\n', "unknown setting nexus.schedule"),
    "not TOML": ("trust_domain = \n", "is not valid TOML"),
    "unclosed table": ("[nexus\n", "is not valid TOML"),
    "duplicate key": ("log_level = 'info'\nlog_level = 'debug'\n", "is not valid TOML"),
    "not UTF-8": (b"log_level = '\xff'\n", "is not valid TOML"),
    "a bad value": ('[nexus]\npoll_interval = "fast"\n', "poll interval: 'fast' is not a duration"),
}


COMMANDS = {"nexus --check-config": ["nexus", "--check-config"], "nexus": ["nexus"], "keeper": ["keeper"],
            "status": ["status"]}  # fmt: skip


@pytest.mark.parametrize(
    ("case", "command"),
    [(case, command) for case in BAD_FILES for command in COMMANDS if case != "a bad value" or "nexus" in command],
)
def test_a_bad_file_stops_every_subcommand_with_one_line_and_exit_2(
    case: str,
    command: str,
    svid: DevIdentity,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    content, expected = BAD_FILES[case]
    monkeypatch.setenv("SPIKE_NEXUS_KEEPER_PEERS", PEERS_ENV)
    path = tmp_path / "spike.toml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, out, err = run([*COMMANDS[command], "--config", str(path)], capsys)
    assert code == 2
    assert out == ""
    assert err.startswith(f"spike {COMMANDS[command][0]}: configuration error: ") and err.endswith("\n"), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert expected in err, err
    if case != "a bad value":
        assert str(path) in err


@pytest.mark.parametrize("where", ["missing", "a directory"])
def test_an_unreadable_file_is_one_line_and_exit_2(
    where: str, svid: DevIdentity, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nowhere.toml" if where == "missing" else tmp_path
    code, out, err = run(["nexus", "--check-config", "--config", str(path)], capsys)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and f"cannot read the config file {path}" in err, err


def test_check_config_never_prints_the_database_password(
    svid: DevIdentity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPIKE_NEXUS_KEEPER_PEERS", PEERS_ENV)
    url = "postgresql://spike:Sup3r-S3cret%40x@db.test:5432/spike?password=An0ther-S3cret"
    code, out, err = run(["nexus", "--check-config", "--database-url", url], capsys)
    assert code == 0, err
    assert json.loads(out)["database_url"] == "postgresql://spike:***@db.test:5432/spike?password=***"
    assert "S3cret" not in out + err


def test_the_read_cache_staleness_by_flag_environment_or_file_postgresql_only(
    svid: DevIdentity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPIKE_NEXUS_KEEPER_PEERS", PEERS_ENV)
    url = "postgresql://spike@db.test:5432/spike"
    assert check_config(capsys, "--database-url", url)["read_cache_staleness"] == 0.02
    assert check_config(capsys, "--database-url", url, "--read-cache-staleness", "0")["read_cache_staleness"] == 0
    config = write_toml(tmp_path / "spike.toml", {"nexus": {"read_cache_staleness": "250ms"}})
    shown = check_config(capsys, "--database-url", url, "--config", str(config))
    assert shown["read_cache_staleness"] == 0.25
    monkeypatch.setenv("SPIKE_NEXUS_READ_CACHE_STALENESS", "1s")
    assert check_config(capsys, "--database-url", url)["read_cache_staleness"] == 1.0
    for bad, said in (("11s", "at most 10s"), ("-1s", "not a duration"), ("soon", "not a duration")):
        monkeypatch.setenv("SPIKE_NEXUS_READ_CACHE_STALENESS", bad)
        code, out, err = run(["nexus", "--check-config", "--database-url", url], capsys)
        assert (code, out) == (2, ""), bad
        assert said in err and len(err.splitlines()) == 1, err
    # On SQLite there is nothing to cache: said, not ignored.
    monkeypatch.setenv("SPIKE_NEXUS_READ_CACHE_STALENESS", "20ms")
    code, out, err = run(["nexus", "--check-config"], capsys)
    assert (code, out) == (2, "")
    assert "applies to PostgreSQL only" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("url", ["mysql://db.test/spike", "db.test:5432", "postgresql://db.test:port/x"])
def test_a_database_url_that_is_not_postgresql_stops_the_start(
    svid: DevIdentity, url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPIKE_NEXUS_KEEPER_PEERS", PEERS_ENV)
    code, _, err = run(["nexus", "--check-config", "--database-url", url], capsys)
    assert code == 2
    assert "database URL" in err


def test_threshold_one_only_when_allowed_by_flag_environment_or_file(
    svid: DevIdentity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every shard of a 1-of-n deployment is the root key: Nexus refuses it unless told it is meant."""
    monkeypatch.setenv("SPIKE_NEXUS_KEEPER_PEERS", PEERS_ENV)
    code, out, err = run(["nexus", "--check-config", "--threshold", "1"], capsys)
    assert (code, out) == (2, "")
    assert err.startswith("spike nexus: configuration error: threshold 1 makes every shard the root key itself")
    assert len(err.splitlines()) == 1
    assert check_config(capsys, "--threshold", "1", "--allow-threshold-one")["threshold"] == 1
    monkeypatch.setenv("SPIKE_ALLOW_THRESHOLD_ONE", "true")
    assert check_config(capsys, "--threshold", "1")["threshold"] == 1
    monkeypatch.setenv("SPIKE_ALLOW_THRESHOLD_ONE", "maybe")
    code, _, err = run(["nexus", "--check-config", "--threshold", "1"], capsys)
    assert code == 2
    assert "SPIKE_ALLOW_THRESHOLD_ONE must be true or false, not 'maybe'" in err


def test_require_memory_lock_from_flag_environment_or_file(
    svid: DevIdentity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPIKE_NEXUS_KEEPER_PEERS", PEERS_ENV)
    assert check_config(capsys)["require_memory_lock"] is False
    assert check_config(capsys, "--require-memory-lock")["require_memory_lock"] is True
    config = write_toml(tmp_path / "spike.toml", {"": {"require_memory_lock": True}})
    assert check_config(capsys, "--config", str(config))["require_memory_lock"] is True
    monkeypatch.setenv("SPIKE_REQUIRE_MEMORY_LOCK", "no")
    assert check_config(capsys, "--config", str(config))["require_memory_lock"] is False


@pytest.mark.parametrize(
    ("env", "value", "expected"),
    [
        ("SPIKE_NEXUS_SHARD_DERIVATION", "xor", "shard derivation must be hmac (spike's) or spike"),
        ("SPIKE_NEXUS_KEEPER_IDENTITY", "any", "keeper identity must be per-id"),
    ],
)
def test_an_unknown_spike_keeper_option_is_one_line_and_exit_2(
    env: str,
    value: str,
    expected: str,
    svid: DevIdentity,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SPIKE_NEXUS_KEEPER_PEERS", PEERS_ENV)
    monkeypatch.setenv(env, value)
    code, out, err = run(["nexus", "--check-config"], capsys)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert expected in err and repr(value) in err, err


@pytest.mark.parametrize(
    ("peers", "derivation", "said"),
    [
        (PEERS_ENV, "spike", None),
        ("https://k1.test:8443,https://k2.test:8443", "spike", None),  # the plain list: ids 1..n
        ("1=https://k1.test:8443,4=https://k4.test:8443", "spike", "keeper ids 4 outside 1..2"),
        ("1=https://k1.test:8443,4=https://k4.test:8443", "hmac", None),
    ],
)
def test_spike_derivation_warns_of_ids_spikes_go_nexus_does_not_deal_to(
    peers: str, derivation: str, said: str | None, svid: DevIdentity
) -> None:
    import argparse

    from spike.app.nexus.server import _ids_go_cannot_deal

    shares = str(len(peers.split(",")))
    env = {**os.environ, "SPIKE_NEXUS_KEEPER_PEERS": peers, "SPIKE_NEXUS_SHAMIR_SHARES": shares}
    env["SPIKE_NEXUS_SHARD_DERIVATION"] = derivation
    warning = _ids_go_cannot_deal(cfg.nexus(argparse.Namespace(), env))
    assert (warning is None) if said is None else (warning is not None and said in warning)
