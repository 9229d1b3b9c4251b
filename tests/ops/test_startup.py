"""The collector pause of a server's start-up (spike/app/startup.py): whatever way a start ends, it ends."""

from __future__ import annotations

import argparse
import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from spike.app import cli, startup
from spike.app.commands.devca import DevIdentity

KEEPERS = "1=https://k1.test:8443,2=https://k2.test:8443,3=https://k3.test:8443"


@pytest.fixture(autouse=True)
def collector_restored() -> Iterator[None]:
    """Each test starts with the collector on and nothing frozen, and leaves it so."""
    assert gc.isenabled()
    yield
    gc.unfreeze()
    gc.enable()


def test_listening_freezes_what_start_up_allocated_and_resumes_collection() -> None:
    with startup.collector_paused(True):
        assert not gc.isenabled()
        startup.listening()
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0
    assert gc.isenabled()


def test_a_start_that_ends_before_listening_gives_the_collector_back() -> None:
    with pytest.raises(RuntimeError), startup.collector_paused(True):
        assert not gc.isenabled()
        raise RuntimeError("the SVID is unreadable")
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_a_collector_someone_else_turned_off_stays_off() -> None:
    gc.disable()
    with startup.collector_paused(True):
        startup_state = gc.isenabled()
    assert (startup_state, gc.isenabled()) == (False, False)


def test_only_server_commands_pause_it(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []

    def version(args: object) -> int:
        seen.append(gc.isenabled())
        return 0

    monkeypatch.setitem(cli.COMMANDS, "version", version)
    assert cli.main(["version"]) == 0
    assert seen == [True]


@pytest.mark.parametrize("extra", [["--check-config"], ["--keepers", "not a keeper list"]])
def test_spike_nexus_that_never_listens_leaves_the_collector_on(
    extra: list[str], dev_identity: DevIdentity, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = dev_identity.files("nexus")
    argv = ["nexus", "--svid-cert", str(files.cert), "--svid-key", str(files.key), "--svid-bundle", str(files.bundle)]
    code = cli.main([*argv, "--keepers", KEEPERS, "--data-dir", str(tmp_path / "data"), *extra])
    assert code == (0 if extra == ["--check-config"] else 2), capsys.readouterr().err
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_a_command_builds_its_own_parser_and_the_help_lists_every_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`spike nexus` builds the nexus parser only; the top level's help, wherever -h stands, lists all."""
    sub = next(a for a in cli.build_parser("nexus")._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"nexus"}
    every = {"keeper", "nexus", "bootstrap", "status", "dev", "dev-identity", "secret", "cipher", "policy", "operator"}
    for argv in (["-h"], ["-h", "nexus"], ["--help", "secret"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        listed = capsys.readouterr().out
        assert all(f"    {name} " in listed or f"    {name}\n" in listed for name in every), (argv, listed)


def test_a_server_that_never_paused_the_collector_leaves_it_alone() -> None:
    """Nexus or a keeper run in-process (a test, an embedding): nothing frozen on their account."""
    startup.listening()
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0
