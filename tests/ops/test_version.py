"""`spike --version` names the commit it runs from: stamped into the binary, read from git in a checkout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import spike
from spike.app import cli

ROOT = Path(spike.__file__).resolve().parent.parent


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_version_from_a_git_checkout_names_its_commit() -> None:
    assert (ROOT / ".git").exists(), "the tests run from a git checkout (an editable install)"
    commit = _git("rev-parse", "--short=12", "HEAD")
    if _git("status", "--porcelain", "--", "spike", "pyproject.toml"):
        commit += "-dirty"
    done = subprocess.run([sys.executable, "-m", "spike", "--version"], capture_output=True, text=True, check=True)
    assert done.stdout == f"spike {spike.__version__} (commit {commit})\n"
    assert done.stderr == ""


def test_version_outside_git_says_unknown(tmp_path: Path) -> None:
    """A copy of the sources with no .git (an sdist, a vendored copy) does not guess."""
    copy = tmp_path / "src"
    copy.mkdir()
    subprocess.run(["cp", "-R", str(ROOT / "spike"), str(copy)], check=True)
    done = subprocess.run(
        [sys.executable, "-m", "spike", "--version"],
        cwd=copy,
        env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout == f"spike {spike.__version__} (commit unknown)\n"


def test_the_parser_makes_the_version_line_only_when_asked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In a checkout the line runs git twice (~11 ms): no command but --version pays for it."""
    asked: list[str] = []

    def version_line() -> str:
        asked.append("version")
        return "spike 9.9.9 (commit abc)"

    monkeypatch.setattr(cli, "version_line", version_line)
    parser = cli.build_parser("nexus")
    assert asked == []
    with pytest.raises(SystemExit) as stopped:
        parser.parse_args(["--version"])
    assert (stopped.value.code, capsys.readouterr().out, asked) == (0, "spike 9.9.9 (commit abc)\n", ["version"])
