"""The benchmark suite's plumbing, checked without running a benchmark (no timing in here).

`bench/run --list` names the groups and the user group's rows; docs/benchmarks.md must explain every one of
them, and a row the suite could not measure must say why in the table rather than show a number.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
DOCS = (ROOT / "docs" / "benchmarks.md").read_text()


def _bench_python(code: str) -> str:
    """Run `code` with bench/ as the suite sees it (its modules import one another by name)."""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=BENCH, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_list_names_every_group_and_the_user_rows_and_runs_nothing() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "suite.py"), "--list"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # the suite says what it starts on stderr: --list starts nothing
    facts = json.loads(_bench_python("import json, suite, user_rows; print(json.dumps([suite.GROUPS, "
                                     "[[s.key, s.label] for s in user_rows.ROWS]]))"))  # fmt: skip
    groups, rows = facts
    listed = done.stdout.splitlines()
    assert [line.split()[0] for line in listed if not line.startswith(" ")] == groups
    for key, label in rows:
        assert f"row {key}: {label}" in done.stdout
    assert {"dev_ready", "cli_get", "cli_get_binary", "version_binary"} <= {key for key, _ in rows}


def test_docs_explain_every_group_and_every_user_row() -> None:
    groups, labels = json.loads(
        _bench_python(
            "import json, suite, user_rows; print(json.dumps([suite.GROUPS, [s.label for s in user_rows.ROWS]]))"
        )
    )
    only = re.search(r"`--only\s+([a-z,]+)`", DOCS)
    assert only is not None
    assert only.group(1).split(",") == groups
    rows_table = DOCS.split("### The user rows", 1)[1].split("\n## ", 1)[0]
    for label in labels:
        assert f"| {label} |" in rows_table, label


def test_a_row_not_measured_says_why_in_the_table() -> None:
    code = """
import json, suite
r = suite.Results()
r.row("measured", "a measured row", "s", "lower").add(suite.SPIKE, 0.5)
r.row("skipped", "a binary row", "s", "lower").skipped = "not measured: no --binary PATH"
print(json.dumps(suite.table([row.summary() for row in r.rows.values()])))
"""
    _, measured, skipped = json.loads(_bench_python(code))
    assert measured[2] == "0.500"
    assert skipped[2] == "not measured: no --binary PATH"
