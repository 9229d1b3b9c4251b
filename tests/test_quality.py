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
        "import sys; from spike.protocol import *; "  # every public name: the package loads them lazily
        f"bad = [m for m in {IO_MODULES!r} if m in sys.modules]; "
        "print(bad); raise SystemExit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


# What a client command must not load: it never serves, and it never runs the custody machine.
CLIENT_MAY_NOT_LOAD = (
    "spike.transports.server", "spike.transports.runner", "spike.transports.http1", "spike.app.nexus",
    "spike.app.store", "spike.protocol.nexus", "spike.protocol.effects", "spike.protocol.keeper",
)  # fmt: skip


def test_client_commands_import_no_server_code() -> None:
    """A CLI command's start-up is what its user waits for (issue 20): server modules stay out of it."""
    commands = ("secret", "policy", "status", "operator", "bootstrap")
    code = (
        "import sys; from spike.app import cli, config; "
        f"[__import__('spike.app.commands.' + c) for c in {commands!r}]; cli.build_parser('secret'); "
        f"banned = {CLIENT_MAY_NOT_LOAD!r}; "
        "bad = sorted(m for m in sys.modules if any(m == b or m.startswith(b + '.') for b in banned)); "
        "print(bad); raise SystemExit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


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


# ---------------------------------------------------------------------- the floors of the import graph

ROOM_FLOORS = {
    # Shared contracts and process-wide plumbing: below every room that uses them.
    "spike.app.identity": 0,
    "spike.app.errors": 0,
    "spike.app.logs": 0,
    "spike.app.api": 0,
    "spike.app.model": 0,
    "spike.app.spike_env": 0,  # SPIKE's variables spike refuses: read by config
    "spike.app.config": 1,
    "spike.app.memory": 1,
    "spike.app.startup": 1,
    "spike.app.spike_db": 1,  # SPIKE's Go database, read by `spike migrate`
    # What the server keeps.
    "spike.app.store": 2,
    # The server and the clients: side by side, neither imports the other.
    "spike.app.nexus": 3,
    "spike.app.commands": 3,
    "spike.app.keeper": 3,
    # The entry point, which dispatches to all of them.
    "spike.app.cli": 4,
}


def _imports(path: Path, package: str) -> set[str]:
    """Every module `path` imports, top-level or lazily inside a function, as absolute names."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _module_files(package: str) -> dict[str, Path]:
    root = ROOT / Path(*package.split("."))
    files = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    return files


def _room_of(module: str) -> str | None:
    return next((room for room in ROOM_FLOORS if module == room or module.startswith(room + ".")), None)


def test_every_app_module_is_in_a_room_and_no_import_points_up_a_floor() -> None:
    """docs/design.md section 7: a room imports its own modules and lower floors only."""
    problems = []
    for module, path in sorted(_module_files("spike.app").items()):
        if module == "spike.app":
            continue
        room = _room_of(module)
        if room is None:
            problems.append(f"{module} is in no room: add it to ROOM_FLOORS or move it into one")
            continue
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for imported in sorted(_imports(path, package)):
            other = _room_of(imported)
            if other is None or other == room:
                continue
            if ROOM_FLOORS[other] >= ROOM_FLOORS[room]:
                problems.append(f"{module} imports {imported} (floor {ROOM_FLOORS[other]} >= {ROOM_FLOORS[room]})")
    assert not problems, "\n".join(problems)


PROTOCOL_MAY_NOT_IMPORT = (
    "time", "os", "subprocess", "random", "secrets", "socket", "ssl", "selectors", "asyncio", "threading",
    "logging", "http", "anyio", "h11", "spike.transports", "spike.app",
)  # fmt: skip


def test_the_core_and_the_transports_import_nothing_above_them() -> None:
    """spike.protocol reads no clock, draws no randomness, does no I/O; spike.transports never imports spike.app."""
    problems = []
    for module, path in sorted(_module_files("spike.protocol").items()):
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for imported in _imports(path, package):
            if any(imported == bad or imported.startswith(bad + ".") for bad in PROTOCOL_MAY_NOT_IMPORT):
                problems.append(f"{module} imports {imported}")
    for module, path in sorted(_module_files("spike.transports").items()):
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        problems += [f"{module} imports {i}" for i in _imports(path, package) if i.startswith("spike.app")]
    assert not problems, "\n".join(sorted(set(problems)))


def test_tests_import_their_helpers_as_packages() -> None:
    """No conftest puts a tier's directory on sys.path, and no test module imports another test module."""
    problems = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(ROOT)
        if re.search(r"sys\.path\.(insert|append)", text):
            problems.append(f"{rel}: changes sys.path")
        for imported in _imports(path, ".".join(rel.with_suffix("").parts[:-1])):
            if imported.rsplit(".", 1)[-1].startswith("test_") or imported.startswith("test_"):
                problems.append(f"{rel}: imports the test module {imported}")
    assert not problems, "\n".join(problems)
