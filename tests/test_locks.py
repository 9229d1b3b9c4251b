"""The dependency locks in requirements/: complete, hashed, consistent, and what every install uses."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ("runtime", "test", "build")
TEST_TOOLS = {"pytest", "hypothesis", "mypy", "ruff", "pluggy", "iniconfig"}


def pins(lock: str) -> dict[str, tuple[str, list[str]]]:
    """Package -> (version, sha256 hashes) of one lock file."""
    text = (ROOT / "requirements" / f"{lock}.txt").read_text()
    found: dict[str, tuple[str, list[str]]] = {}
    for entry in re.split(r"\n(?=[A-Za-z0-9])", text):
        head = re.match(r"([A-Za-z0-9_.\-]+)==([^\s;\\]+)", entry)
        if head:
            hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", entry)
            found[canonicalize_name(head[1])] = (head[2], hashes)
    return found


def declared() -> tuple[list[Requirement], dict[str, list[Requirement]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {name: [Requirement(r) for r in reqs] for name, reqs in project["optional-dependencies"].items()}
    return [Requirement(r) for r in project["dependencies"]], extras


@pytest.mark.parametrize("lock", LOCKS)
def test_every_pin_is_exact_and_hashed(lock: str) -> None:
    locked = pins(lock)
    assert len(locked) >= 10, f"requirements/{lock}.txt parsed to {locked}"
    unhashed = [name for name, (_, hashes) in locked.items() if not hashes]
    assert not unhashed, f"pins without a hash in requirements/{lock}.txt: {unhashed}"
    assert "setuptools" in locked, "the build backend is pinned, so --no-build-isolation fetches nothing unpinned"


def test_each_lock_holds_what_its_install_needs_within_pyprojects_ranges() -> None:
    runtime, extras = declared()
    wanted = {"runtime": runtime, "test": runtime + extras["test"], "build": runtime + extras["build"]}
    for lock, requirements in wanted.items():
        locked = pins(lock)
        for requirement in requirements:
            name = canonicalize_name(requirement.name)
            assert name in locked, f"{requirement} is not in requirements/{lock}.txt: run requirements/lock"
            version = locked[name][0]
            assert requirement.specifier.contains(version, prereleases=True), (
                f"requirements/{lock}.txt pins {name}=={version}, outside pyproject.toml's {requirement}"
            )
    assert not TEST_TOOLS & set(pins("build")), "no test tool may be frozen into the binary's environment"
    assert not TEST_TOOLS & set(pins("runtime"))


def test_the_locks_agree_on_every_version() -> None:
    seen: dict[str, tuple[str, str]] = {}
    for lock in LOCKS:
        for name, (version, hashes) in pins(lock).items():
            if name in seen:
                assert seen[name][0] == version, f"{name}: {seen[name][1]} pins {seen[name][0]}, {lock} pins {version}"
            seen[name] = (version, lock)
            assert hashes == pins("test").get(name, (version, hashes))[1], f"{name}: the locks list other files"


def test_every_install_of_this_repository_uses_a_lock() -> None:
    readme = (ROOT / "README.md").read_text()
    first_section = readme.split("\n## ", 2)[1]
    run, test = re.findall(r"```sh\n(.*?)\n```", first_section, flags=re.S)
    assert "--require-hashes -r requirements/runtime.txt" in run
    assert "--require-hashes -r requirements/test.txt" in test
    for command in (run, test):
        assert "--no-deps --no-build-isolation -e ." in command, "spike itself must add nothing unpinned"
    build = (ROOT / "build" / "build.sh").read_text()
    assert "--require-hashes" in build and "requirements/build.txt" in build
