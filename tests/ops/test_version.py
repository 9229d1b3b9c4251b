"""`spike --version` names the commit it runs from: stamped into the binary, read from git in a checkout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import spike

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
