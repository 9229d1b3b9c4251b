"""What a release promises about the binary: reproducible bytes, and an SBOM of exactly what is in it.

Reproducible: a second build of this checkout, in another work dir and output dir, gives the same bytes as
the dist/spike the smoke tests use (and the same SBOM).  On a difference the test names the archive entries
it falls in.  With `SPIKE_BINARY` (a release) this test is skipped: build/release.sh makes that comparison
itself on the machine that built the release.

The SBOM (CycloneDX, `dist/spike.cdx.json`, written by build/sbom.py) must list exactly the distributions
frozen into the binary.  What is in the binary is read here with a reader of our own (binary_build.Contents),
and the distributions are this test venv's: the locks give it the same version of every runtime dependency
as the build venv (one resolution, tests/test_locks.py).  Each listed file hash must be one the lock allows.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from importlib import metadata
from pathlib import Path, PurePosixPath

import pytest

from tests.binary.binary_build import ROOT, Built, Contents, run_build

pytestmark = pytest.mark.e2e

# In the build venv and frozen in part: PyInstaller's bootloader (the executable itself), its loader
# modules and runtime hooks; the contrib hooks' runtime hook for cryptography.  Not in the test venv.
BUILD_TOOLS_IN_THE_BINARY = {"pyinstaller", "pyinstaller-hooks-contrib"}
TEST_TOOLS = {"pytest", "hypothesis", "mypy", "ruff", "pluggy", "iniconfig", "types-pyyaml", "mypy-extensions"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(lock: str) -> dict[str, tuple[str, set[str]]]:
    pins: dict[str, tuple[str, set[str]]] = {}
    for block in re.split(r"\n(?=\S)", (ROOT / "requirements" / lock).read_text()):
        pin = re.match(r"([A-Za-z0-9_.-]+)==([^ ;\\\n]+)", block)
        if pin:
            pins[canonical(pin[1])] = (pin[2], set(re.findall(r"--hash=sha256:([0-9a-f]{64})", block)))
    return pins


def frozen_distributions(contents: Contents) -> set[str]:
    """Distributions of this venv with a module in the PYZ or a file in the executable."""
    files = contents.files | contents.lazy
    found = set()
    for dist in metadata.distributions():
        name = canonical(dist.metadata["Name"])
        if name in TEST_TOOLS or name == "spike":
            continue
        for record in dist.files or []:
            path = PurePosixPath(str(record))
            if path.parts[0] == ".." or path.parts[0].endswith(".dist-info"):
                continue
            module = ".".join(path.with_suffix("").parts).removesuffix(".__init__")
            if (path.suffix == ".py" and module in contents.modules) or str(path) in files:
                found.add(name)
                break
    return found


def test_the_sbom_lists_exactly_the_distributions_frozen_into_the_binary(built: Built) -> None:
    assert built.sbom.exists(), f"no SBOM beside the binary ({built.sbom.name})"
    bom = json.loads(built.sbom.read_text())
    assert (bom["bomFormat"], bom["specVersion"]) == ("CycloneDX", "1.5")
    pypi = {c["name"]: c for c in bom["components"] if c["purl"].startswith("pkg:pypi/")}

    contents = Contents.of(built.binary)
    expected = frozen_distributions(contents)
    assert {"cryptography", "grpcio", "protobuf", "psycopg", "psycopg-binary", "spiffe", "uvloop"} <= expected
    assert set(pypi) - BUILD_TOOLS_IN_THE_BINARY == expected
    assert set(pypi) >= BUILD_TOOLS_IN_THE_BINARY, "PyInstaller's bootloader and hooks are in the binary too"
    assert not {"pip", "setuptools", "altgraph", "packaging"} & set(pypi), "build-only tools are listed"

    # Built from the lock, unless .ci/newest builds from pyproject.toml's ranges (SPIKE_BUILD_UNLOCKED=1).
    lock = locked("build.txt")
    from_lock = os.environ.get("SPIKE_BUILD_UNLOCKED", "0") != "1"
    for name, component in pypi.items():
        version, hashes = lock[name] if from_lock else (component["version"], set())
        if name not in BUILD_TOOLS_IN_THE_BINARY:
            version = metadata.version(name)  # this venv's: the lock's, or under .ci/newest the newest
        assert component["version"] == version, f"{name}: SBOM {component['version']}, expected {version}"
        assert component["purl"] == f"pkg:pypi/{name}@{version}"
        (digest,) = [h["content"] for h in component["hashes"] if h["alg"] == "SHA-256"]
        assert not from_lock or digest in hashes, f"{name}: the SBOM's sha256 is not one the lock allows"
    assert pypi["cryptography"]["licenses"] == [{"expression": "Apache-2.0 OR BSD-3-Clause"}]

    binary = bom["metadata"]["component"]
    assert binary["name"] == "spike"
    (digest,) = [h["content"] for h in binary["hashes"]]
    assert digest == hashlib.sha256(built.binary.read_bytes()).hexdigest()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", bom["metadata"]["timestamp"])


def test_two_builds_of_one_checkout_are_byte_identical(built: Built, tmp_path: Path) -> None:
    if built.given:
        pytest.skip("SPIKE_BINARY is a given executable: build/release.sh compares its two builds itself")
    run_build(tmp_path / "build.log", "--work", str(tmp_path / "work"), "--dist", str(tmp_path / "dist"))
    first, second = built.binary.read_bytes(), (tmp_path / "dist" / "spike").read_bytes()
    if first != second:
        differing = [i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b]
        where = _entries_at(built.binary, differing[:1000])
        pytest.fail(
            f"two builds differ: {len(first)} and {len(second)} bytes, {len(differing)} bytes differ "
            f"(first at {differing[:5]}), in {sorted(where)[:20]}"
        )
    assert built.sbom.read_bytes() == (tmp_path / "dist" / "spike.cdx.json").read_bytes(), "the SBOMs differ"


def _entries_at(binary: Path, offsets: list[int]) -> set[str]:
    """Names of the archive entries holding these offsets (or 'bootloader'/'trailer' outside the archive)."""
    data = binary.read_bytes()
    cookie = data.rindex(b"MEI\x0c\x0b\x0a\x0b\x0e")
    start = cookie + 88 - int.from_bytes(data[cookie + 8 : cookie + 12], "big")
    toc_start = start + int.from_bytes(data[cookie + 12 : cookie + 16], "big")
    toc_end = toc_start + int.from_bytes(data[cookie + 16 : cookie + 20], "big")
    spans = [(0, start, "bootloader"), (toc_start, toc_end, "table of contents"), (toc_end, len(data), "trailer")]
    at = toc_start
    while at < toc_end:
        length = int.from_bytes(data[at : at + 4], "big")
        offset = start + int.from_bytes(data[at + 4 : at + 8], "big")
        size = int.from_bytes(data[at + 8 : at + 12], "big")
        spans.append((offset, offset + size, data[at + 18 : at + length].rstrip(b"\0").decode()))
        at += length
    return {name for offset in offsets for begin, end, name in spans if begin <= offset < end}
