"""The binary under test: dist/spike built from this checkout (`build/build.sh --if-stale`), or `SPIKE_BINARY`.

`SPIKE_BINARY=/path/to/spike` tests a given executable instead (a release: build/release.sh runs the tests
so); its SBOM is the file beside it named `<binary>.cdx.json`.  Both are copied first: a rebuild in the same
tree (another test run) must not change them under the tests.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.binary.binary_build import ROOT, Built, run_build


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    given = os.environ.get("SPIKE_BINARY")
    if given:
        source = Path(given).resolve()
        assert source.is_file() and os.access(source, os.X_OK), f"SPIKE_BINARY={given} is not an executable"
        sbom = Path(f"{source}.cdx.json")
    else:
        run_build(tmp_path_factory.mktemp("build") / "build.log", "--if-stale")
        source, sbom = ROOT / "dist" / "spike", ROOT / "dist" / "spike.cdx.json"
    copies = tmp_path_factory.mktemp("bin")
    shutil.copy2(source, copies / "spike")
    if sbom.exists():
        shutil.copy2(sbom, copies / "spike.cdx.json")
    return Built(copies / "spike", copies / "spike.cdx.json", bool(given))


@pytest.fixture(scope="session")
def spike_binary(built: Built) -> Path:
    return built.binary
