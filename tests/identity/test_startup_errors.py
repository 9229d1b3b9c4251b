"""`spike` under the Workload API identity source that cannot get an identity: one clear line, exit 2.

Real processes (`python -m spike ...`), all started at once and then waited
for, so the whole table costs about one interpreter start.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.identity.workload_api import WorkloadApi

SPIKE = [sys.executable, "-m", "spike"]
TD = "spike.test"
PEERS = "1=https://127.0.0.1:1,2=https://127.0.0.1:2,3=https://127.0.0.1:3"


@dataclass
class Case:
    name: str
    args: list[str]
    env: dict[str, str]
    expect: tuple[str, ...]  # all in the one line on stderr


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPIKE_", "SPIFFE_"))}
    env["SPIKE_TRUST_ROOT"] = TD
    return env


def test_identity_failures_at_start_are_one_line_and_exit_2(workload_api: WorkloadApi, tmp_path: Path) -> None:
    workload_api.add("stranger", f"spiffe://{TD}/spike/nexus", register=False)
    no_bundle = workload_api.add("bootstrap", f"spiffe://{TD}/spike/bootstrap")
    workload_api.send("bootstrap", workload_api.response(no_bundle, bundle=b""))
    missing = f"unix://{tmp_path}/agent.sock"
    data_dir = tmp_path / "nexus-data"
    cases = [
        Case(
            "keeper, no socket",
            ["keeper", "--listen", "127.0.0.1:0"],
            {"SPIFFE_ENDPOINT_SOCKET": missing},
            ("spike keeper: no SPIFFE Workload API socket at", "agent.sock"),
        ),
        Case(
            "nexus, no SVID for this workload",
            ["nexus", "--listen", "127.0.0.1:0", "--keepers", PEERS, "--data-dir", str(data_dir)],
            {"SPIFFE_ENDPOINT_SOCKET": workload_api.address("stranger"), "SPIKE_WORKLOAD_API_TIMEOUT": "500ms"},
            ("spike nexus: ", "sent no X.509 SVID within 0.5s", "no identity issued"),
        ),
        Case(
            "bootstrap, no trust bundle",
            ["bootstrap", "--nexus", "https://127.0.0.1:1"],
            {"SPIFFE_ENDPOINT_SOCKET": workload_api.address("bootstrap")},
            ("spike bootstrap: ", "sent no usable trust bundle"),
        ),
        Case(
            "status, no socket",
            ["status", "--nexus", "https://127.0.0.1:1"],
            {"SPIFFE_ENDPOINT_SOCKET": missing},
            ("spike status: no SPIFFE Workload API socket at",),
        ),
        Case(
            "secret, no socket",
            ["secret", "get", "apps/db", "--nexus", "https://127.0.0.1:1"],
            {"SPIFFE_ENDPOINT_SOCKET": missing},
            ("spike secret: no SPIFFE Workload API socket at",),
        ),
        Case(
            "keeper, Workload API chosen without a socket",
            ["keeper", "--identity", "workload-api", "--listen", "127.0.0.1:0"],
            {},
            ("spike keeper: configuration error: ", "needs SPIFFE_ENDPOINT_SOCKET"),
        ),
    ]
    running = [
        (
            case,
            subprocess.Popen(
                [*SPIKE, *case.args],
                env={**base_env(), **case.env},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            ),
        )
        for case in cases
    ]
    failures = []
    for case, process in running:
        try:
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        lines = err.decode(errors="replace").splitlines()
        ok = process.returncode == 2 and len(lines) == 1 and all(part in lines[0] for part in case.expect)
        if not ok or out:
            failures.append(f"{case.name}: exit {process.returncode}, stdout {out!r}, stderr {lines}")
    assert not failures, "\n".join(failures)
    assert not data_dir.exists(), "a Nexus without an identity must not touch its data dir"


@pytest.mark.parametrize("command", [["keeper", "--listen", "127.0.0.1:0"]])
def test_a_missing_svid_file_still_says_which(command: list[str], tmp_path: Path) -> None:
    """Unchanged for the files source: the configuration check names the missing file."""
    env = {
        **base_env(),
        "SPIKE_SVID_CERT": str(tmp_path / "svid.pem"),
        "SPIKE_SVID_KEY": str(tmp_path / "svid_key.pem"),
        "SPIKE_SVID_BUNDLE": str(tmp_path / "bundle.pem"),
    }
    done = subprocess.run([*SPIKE, *command], env=env, capture_output=True, timeout=30, check=False)
    lines = done.stderr.decode().splitlines()
    assert done.returncode == 2
    assert len(lines) == 1
    assert "SVID certificate" in lines[0]
    assert "no such file" in lines[0]


def test_an_svid_path_that_cannot_be_looked_at_is_one_line_too(tmp_path: Path) -> None:
    """A path the system refuses to stat (here: a name too long; as a user, a directory it may not
    search) is a configuration error naming the file, not a traceback."""
    env = {
        **base_env(),
        "SPIKE_SVID_CERT": str(tmp_path / ("c" * 300)),
        "SPIKE_SVID_KEY": str(tmp_path / "svid_key.pem"),
        "SPIKE_SVID_BUNDLE": str(tmp_path / "bundle.pem"),
    }
    done = subprocess.run(
        [*SPIKE, "keeper", "--listen", "127.0.0.1:0"], env=env, capture_output=True, timeout=30, check=False
    )
    lines = done.stderr.decode().splitlines()
    assert done.returncode == 2, lines
    assert len(lines) == 1, lines
    assert "SVID certificate" in lines[0] and "File name too long" in lines[0]


# A `sitecustomize` that makes chosen modules warn as they finish importing, attributed to the
# module's own file: what a dependency's import-time deprecation notice looks like to Python.
_PLANT = """
import builtins, importlib.abc, importlib.machinery, sys, warnings

PLANTED = {plant!r}  # module name -> name of a built-in warning category

class _Planter(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in PLANTED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            warnings.warn_explicit(
                "planted warning in " + name, getattr(builtins, PLANTED[name]), module.__file__, 1, module=name
            )

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _Planter())
"""


def _with_planted_warnings(tmp_path: Path, plant: dict[str, str]) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_PLANT.format(plant=plant))
    return {"PYTHONPATH": str(site)}


def test_a_dependency_that_warns_at_import_does_not_break_the_one_line_promise(
    workload_api: WorkloadApi, tmp_path: Path
) -> None:
    """Warnings raised by importing a dependency go to the debug log, never to the operator's stderr."""
    workload_api.add("stranger", f"spiffe://{TD}/spike/nexus", register=False)
    plant = _with_planted_warnings(
        tmp_path, {"spiffe": "UserWarning", "cryptography.x509": "DeprecationWarning", "h11": "FutureWarning"}
    )
    env = {
        **base_env(),
        **plant,
        "PYTHONWARNINGS": "always",  # shown even where Python's defaults would hide them
        "SPIFFE_ENDPOINT_SOCKET": workload_api.address("stranger"),
        "SPIKE_WORKLOAD_API_TIMEOUT": "500ms",
    }
    args = ["nexus", "--listen", "127.0.0.1:0", "--keepers", PEERS, "--data-dir", str(tmp_path / "data")]
    done = subprocess.run([*SPIKE, *args], env=env, capture_output=True, timeout=30, check=False)
    lines = done.stderr.decode(errors="replace").splitlines()
    assert done.returncode == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("spike nexus: ") and "sent no X.509 SVID" in lines[0]

    # At debug level the log says what was held back, with the dependency named.
    debug = subprocess.run(
        [*SPIKE, *args, "--log-level", "debug"], env=env, capture_output=True, timeout=30, check=False
    )
    text = debug.stderr.decode(errors="replace")
    assert debug.returncode == 2
    assert "spike.dependencies: UserWarning from " in text
    assert "planted warning in spiffe" in text
    assert "Traceback" not in text


def test_spikes_own_warnings_are_still_shown(tmp_path: Path) -> None:
    """Only dependencies are quietened: a warning raised by spike's own code reaches stderr as usual."""
    plant = _with_planted_warnings(tmp_path, {"spike.app.commands.devca": "UserWarning"})
    env = {**base_env(), **plant}
    done = subprocess.run(
        [*SPIKE, "dev-identity", "--dir", str(tmp_path / "id")], env=env, capture_output=True, timeout=30, check=False
    )
    text = done.stderr.decode(errors="replace")
    assert done.returncode == 0, text
    assert "UserWarning: planted warning in spike.app.commands.devca" in text
