"""Choosing the identity source: `--identity`, SPIKE_IDENTITY, or inferred from SPIFFE_ENDPOINT_SOCKET."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from spike.app import config as cfg
from spike.app.commands.devca import DevIdentity
from spike.app.identity import WorkloadApiSpec, identity_source, workload_api_address
from spike.transports.svid_files import SvidFileSource
from spike.transports.tls import SvidFiles
from spike.transports.workload_api import WorkloadApiSource


def args(**values: object) -> argparse.Namespace:
    return argparse.Namespace(**values)


def files_env(identity: DevIdentity) -> dict[str, str]:
    files = identity.keeper(1)
    return {
        "SPIKE_SVID_CERT": str(files.cert),
        "SPIKE_SVID_KEY": str(files.key),
        "SPIKE_SVID_BUNDLE": str(files.bundle),
    }


def test_the_socket_alone_means_the_workload_api() -> None:
    spec = cfg.identity(args(), {"SPIFFE_ENDPOINT_SOCKET": "unix:///run/spire/agent.sock"})
    assert spec == WorkloadApiSpec("unix:///run/spire/agent.sock", 10.0)


def test_svid_files_win_when_both_are_there(dev_identity: DevIdentity) -> None:
    env = {"SPIFFE_ENDPOINT_SOCKET": "unix:///run/spire/agent.sock", **files_env(dev_identity)}
    assert cfg.identity(args(), env) == dev_identity.keeper(1)
    # ... one flag is enough to mean files
    only_flag = {"SPIFFE_ENDPOINT_SOCKET": "unix:///x.sock"}
    with pytest.raises(cfg.ConfigError, match="SPIKE_SVID_KEY"):
        cfg.identity(args(svid_cert=str(dev_identity.keeper(1).cert)), only_flag)


def test_an_explicit_choice_wins(dev_identity: DevIdentity) -> None:
    env = {"SPIFFE_ENDPOINT_SOCKET": "/run/spire/agent.sock", **files_env(dev_identity)}
    spec = cfg.identity(args(identity="workload-api"), {**env, "SPIKE_WORKLOAD_API_TIMEOUT": "2s"})
    assert spec == WorkloadApiSpec("unix:///run/spire/agent.sock", 2.0)
    assert cfg.identity(args(), {**env, "SPIKE_IDENTITY": "workload-api"}) == WorkloadApiSpec(
        "unix:///run/spire/agent.sock", 10.0
    )
    assert cfg.identity(args(identity="files"), env) == dev_identity.keeper(1)


@pytest.mark.parametrize(
    ("chosen", "env", "message"),
    [
        ("workload-api", {}, "needs SPIFFE_ENDPOINT_SOCKET"),
        ("workload-api", {"SPIFFE_ENDPOINT_SOCKET": "tcp://127.0.0.1:8081"}, "not a unix domain socket"),
        ("workload-api", {"SPIFFE_ENDPOINT_SOCKET": "unix://host/agent.sock"}, "unix:///absolute/path"),
        ("workload-api", {"SPIFFE_ENDPOINT_SOCKET": "/a.sock", "SPIKE_WORKLOAD_API_TIMEOUT": "soon"}, "duration"),
        (None, {"SPIKE_IDENTITY": "spire"}, "must be workload-api or files"),
        (None, {}, "no X.509 SVID configured: .*SPIFFE_ENDPOINT_SOCKET"),
    ],
)
def test_bad_choices_are_one_sentence(chosen: str | None, env: dict[str, str], message: str) -> None:
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.identity(args(identity=chosen), env)


def test_common_carries_the_choice(dev_identity: DevIdentity) -> None:
    assert cfg.common(args(), files_env(dev_identity)).svid == dev_identity.keeper(1)
    spec = cfg.common(args(), {"SPIFFE_ENDPOINT_SOCKET": "unix:///s.sock"}).svid
    assert isinstance(spec, WorkloadApiSpec)


def test_addresses() -> None:
    assert workload_api_address("/run/agent.sock") == "unix:///run/agent.sock"
    assert workload_api_address("unix:/run/agent.sock") == "unix:/run/agent.sock"
    with pytest.raises(ValueError, match="not a unix"):
        workload_api_address("run/agent.sock")


def test_the_spec_picks_the_source(tmp_path: Path, dev_identity: DevIdentity) -> None:
    files: SvidFiles = dev_identity.keeper(1)
    assert isinstance(identity_source(files), SvidFileSource)
    trust = cfg.common(args(), {"SPIFFE_ENDPOINT_SOCKET": f"unix://{tmp_path}/a.sock"}).trust
    source = identity_source(WorkloadApiSpec(f"unix://{tmp_path}/a.sock", 3.0), trust)
    assert isinstance(source, WorkloadApiSource)
    assert source.timeout == 3.0
    assert source.trust_domains == {cfg.DEFAULT_TRUST_DOMAIN}


def test_the_config_file_can_choose_the_workload_api(tmp_path: Path) -> None:
    toml = tmp_path / "spike.toml"
    toml.write_text(
        'identity = "workload-api"\n'
        'spiffe_endpoint_socket = "unix:///run/spire/agent.sock"\n'
        'workload_api_timeout = "3s"\n'
    )
    spec = cfg.identity(args(), cfg.load_config_file(toml))
    assert spec == WorkloadApiSpec("unix:///run/spire/agent.sock", 3.0)


# ---------------------------------------------------------------------- bundles of other trust domains


def test_trust_bundles_name_one_file_per_trust_domain(dev_identity: DevIdentity, foreign_identity: DevIdentity) -> None:
    theirs = foreign_identity.files("nexus").bundle
    env = {**files_env(dev_identity), "SPIKE_TRUST_BUNDLES": f" other.test={theirs} , partner.test={theirs},"}
    spec = cfg.identity(args(), env)
    assert isinstance(spec, SvidFiles)
    assert spec.trust_bundles == (("other.test", theirs), ("partner.test", theirs))
    flag = cfg.identity(args(trust_bundles=f"other.test={theirs}"), env)
    assert isinstance(flag, SvidFiles) and flag.trust_bundles == (("other.test", theirs),)
    assert cfg.identity(args(), files_env(dev_identity)) == dev_identity.keeper(1)  # none: the default


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("other.test", r"'other.test' is not trust-domain=file"),
        ("=/etc/x.pem", r"is not trust-domain=file"),
        ("Other.Test={bundle}", r"invalid trust domain name 'Other.Test'"),
        ("other.test={bundle},other.test={bundle}", r"other.test appears twice"),
        ("other.test={missing}", r"trust bundle of other.test '.*missing.pem': no such file"),
        ("other.test={directory}", r"not a regular file"),
        (",", r"no trust-domain=file given"),
    ],
)
def test_bad_trust_bundles_are_one_sentence(
    value: str, message: str, dev_identity: DevIdentity, tmp_path: Path
) -> None:
    bundle = dev_identity.files("nexus").bundle
    text = value.format(bundle=bundle, missing=tmp_path / "missing.pem", directory=tmp_path)
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.identity(args(), {**files_env(dev_identity), "SPIKE_TRUST_BUNDLES": text})


def test_trust_bundles_are_refused_with_the_workload_api(dev_identity: DevIdentity) -> None:
    bundle = dev_identity.files("nexus").bundle
    env = {"SPIFFE_ENDPOINT_SOCKET": "unix:///run/spire/agent.sock", "SPIKE_TRUST_BUNDLES": f"other.test={bundle}"}
    with pytest.raises(cfg.ConfigError, match="the agent sends the bundles of federated trust domains itself"):
        cfg.identity(args(), env)


def test_the_config_file_gives_trust_bundles_as_a_table(dev_identity: DevIdentity, tmp_path: Path) -> None:
    bundle = dev_identity.files("nexus").bundle
    toml = tmp_path / "spike.toml"
    toml.write_text(f'[trust]\npilot = "other.test"\nbundles = {{ "other.test" = "{bundle}" }}\n')
    settings = cfg.load_config_file(toml)
    assert settings["SPIKE_TRUST_BUNDLES"] == f"other.test={bundle}"
    spec = cfg.identity(args(), {**files_env(dev_identity), **settings})
    assert isinstance(spec, SvidFiles) and spec.trust_bundles == (("other.test", bundle),)
