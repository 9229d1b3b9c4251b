"""The release workflow (.github/workflows/release.yml) cannot run here; what it calls can, and must exist.

Every `run:` line calls a script of this repository (with a subcommand that script has), every action is
pinned to a full commit (a tag can be moved; a commit cannot), no `run:` expands a `${{ }}` expression into
the shell (a tag name is attacker-controlled text), and only the publishing job may write or sign.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"


def workflow() -> dict[Any, Any]:
    loaded: dict[Any, Any] = yaml.safe_load(WORKFLOW.read_text())
    return loaded


def steps() -> list[tuple[str, dict[str, Any]]]:
    return [(job, step) for job, body in workflow()["jobs"].items() for step in body["steps"]]


def subcommands(script: Path) -> set[str]:
    """The words of a script's top-level `case` ( `build)`, `smoke)` ... ), if it has one."""
    return {word for label in re.findall(r"^    ([a-z|-]+)\)", script.read_text(), re.M) for word in label.split("|")}


def test_it_runs_on_a_version_tag_for_both_linux_machines() -> None:
    flow = workflow()
    trigger = flow.get("on", flow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert trigger == {"push": {"tags": ["v*"]}}
    matrix = flow["jobs"]["build"]["strategy"]["matrix"]["include"]
    assert {(m["runner"], m["arch"]) for m in matrix} == {("ubuntu-24.04", "x86_64"), ("ubuntu-24.04-arm", "aarch64")}
    build = [step.get("run") for job, step in steps() if job == "build" and "run" in step]
    assert build == ["build/release.sh build", "build/release.sh smoke"], "built, then smoke-tested, per machine"
    publish = [step.get("run") or step["uses"].split("@")[0] for job, step in steps() if job == "publish"]
    for needed in ("build/release.sh checksums", "actions/attest-build-provenance", "build/release.sh sign"):
        assert needed in publish, needed
    assert publish[-1].startswith("build/release.sh publish")


def test_every_run_line_calls_a_script_of_the_repository() -> None:
    seen = 0
    for job, step in steps():
        if "run" not in step:
            continue
        assert "${{" not in step["run"], f"{job}: {step['run']!r} expands an expression in the shell"
        for line in step["run"].splitlines():
            if not line.strip() or line.strip().startswith("#"):
                continue
            words = shlex.split(line)
            script = ROOT / words[0]
            assert not Path(words[0]).is_absolute() and script.is_file(), f"{job}: {line!r} calls no repository script"
            assert os.access(script, os.X_OK), f"{words[0]} is not executable"
            known = subcommands(script)
            if known:
                assert len(words) > 1 and words[1] in known, f"{job}: {line!r}: {words[0]} has {sorted(known)}"
            seen += 1
    assert seen >= 5


def test_every_action_is_pinned_to_a_commit() -> None:
    uses = [step["uses"] for _job, step in steps() if "uses" in step]
    assert uses
    for action in uses:
        assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", action), f"{action} is not pinned to a full commit"


def test_only_the_publishing_job_writes_or_signs() -> None:
    flow = workflow()
    assert flow["permissions"] == {}
    assert flow["jobs"]["build"]["permissions"] == {"contents": "read"}
    assert flow["jobs"]["publish"]["permissions"] == {"contents": "write", "id-token": "write", "attestations": "write"}
    assert flow["jobs"]["publish"]["needs"] == "build"
    for job, step in steps():
        if step.get("uses", "").startswith("actions/checkout@"):
            assert step["with"]["persist-credentials"] is False, job
