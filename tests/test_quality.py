"""Repository-level checks that belong in the test command: lint, types, docs match CI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)


def test_ruff_is_clean() -> None:
    result = _run(str(BIN / "ruff"), "check", "spike", "tests", "examples", "bench", "build")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean() -> None:
    # The code only: the docs' snippets keep their aligned comments.
    result = _run(str(BIN / "ruff"), "format", "--check", "spike", "tests", "examples", "bench", "build")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    # The examples are documentation for embedders: typed like the package they show.
    result = _run(str(BIN / "mypy"), "spike", "examples")
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_opens_with_exactly_two_commands_and_ci_runs_the_second() -> None:
    readme = (ROOT / "README.md").read_text()
    first_section = readme.split("\n## ", 2)[1]
    commands = re.findall(r"```sh\n(.*?)\n```", first_section, flags=re.S)
    assert len(commands) == 2, commands
    assert all("\n" not in c for c in commands)
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines(), "the README's test command must be what .ci/run runs"


IO_MODULES = (
    "anyio", "h11", "ssl", "socket", "asyncio", "selectors", "threading", "http", "logging", "random", "secrets",
    "spike.transports", "spike.app",
)  # fmt: skip


def test_protocol_imports_no_io_modules() -> None:
    """The sans-IO core loads no sockets, event loops, threads, loggers or random sources (docs/embedding.md)."""
    code = (
        "import sys, spike.protocol; "
        f"bad = [m for m in {IO_MODULES!r} if m in sys.modules]; "
        "print(bad); raise SystemExit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


def test_links_in_the_docs_point_inside_the_repository() -> None:
    """A clone has nothing beside it: every relative link in a Markdown file names a file of the repository."""
    broken = []
    for page in [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL, or an anchor on the same page
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
    assert "DESIGN.md" not in (ROOT / "README.md").read_text()
