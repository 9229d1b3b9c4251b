"""`spike completion bash|zsh|fish`: scripts generated from the parser, run in the real shells.

The script is printed by a real `spike` process and loaded into a real shell,
which is asked what it offers after the words typed so far: bash through its
completion function (COMP_WORDS / COMP_CWORD, as readline sets them), fish
through `complete -C`, zsh through the function with `compadd` and `_files`
stood in for (they exist only inside zsh's completion widgets).  zsh and fish
are installed by .ci/shells (run by .ci/run); a machine without them skips
those tests and says so (under CI=true they fail instead).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spike.app.cli import build_parser
from spike.app.commands.completion import tree

SPIKE = [sys.executable, "-m", "spike"]


def generated(shell: str, tmp_path: Path) -> Path:
    done = subprocess.run([*SPIKE, "completion", shell], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stderr == "", done
    path = tmp_path / f"spike.{shell}"
    path.write_text(done.stdout)
    return path


def need(shell: str) -> str:
    found = shutil.which(shell)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{shell} is not installed: .ci/run installs it with .ci/shells")
        pytest.skip(f"{shell} is not installed here (.ci/shells installs it for CI)")
    return found


# ---------------------------------------------------------------------- bash

BASH_ASK = """
source {script}
ask() {{
    COMP_WORDS=("$@"); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); COMPREPLY=()
    _spike
    printf '%s\\n' "${{COMPREPLY[*]}}"
}}
"""


def bash_offers(script: Path, *lines: list[str], cwd: Path | None = None) -> list[list[str]]:
    """What bash's completion of `spike` offers after each line of words (the last word: being typed)."""
    program = BASH_ASK.format(script=script) + "".join(
        "ask " + " ".join(f"'{w}'" for w in words) + "\n" for words in lines
    )
    done = subprocess.run(["bash", "--norc", "-c", program], capture_output=True, text=True, check=False, cwd=cwd)
    assert done.returncode == 0 and done.stderr == "", done
    return [line.split() for line in done.stdout.splitlines()]


def test_bash_registers_the_function_for_spike(tmp_path: Path) -> None:
    script = generated("bash", tmp_path)
    done = subprocess.run(
        ["bash", "--norc", "-c", f"source {script} && complete -p spike"], capture_output=True, text=True, check=False
    )
    assert done.stdout.strip() == "complete -F _spike spike", done


def test_bash_completes_commands_subcommands_flags_and_their_values(tmp_path: Path) -> None:
    script = generated("bash", tmp_path)
    (tmp_path / "shards").mkdir()
    (tmp_path / "policy.yaml").write_text("")
    offers = bash_offers(
        script,
        ["spike", ""],
        ["spike", "se"],
        ["spike", "secret", ""],
        ["spike", "secret", "put", "--c"],
        ["spike", "--log-level", "debug", "status", "--format", ""],
        ["spike", "secret", "get", "app/db", "--version", "3", "--f"],
        ["spike", "status", "--nexus", "secret", "--format", "j"],  # a flag's value is never a subcommand
        ["spike", "operator", "recover", "--dir", "sh"],
        ["spike", "policy", "apply", "--file", "pol"],
        ["spike", "completion", ""],
        ["spike", "migrate", ""],
        ["spike", "migrate", "from-spike", "--recovery-dir", "sh"],
        cwd=tmp_path,
    )
    top = {"keeper", "nexus", "bootstrap", "status", "dev", "dev-identity", "secret", "cipher", "policy"}
    assert top | {"operator", "migrate", "version", "completion"} == set(offers[0])
    assert offers[1] == ["secret"]
    assert offers[2] == ["put", "get", "list", "delete", "undelete", "destroy", "metadata", "tune", "purge"]
    assert offers[3] == ["--config", "--cas"]
    assert offers[4] == ["human", "json"]
    assert offers[5] == ["--format"]
    assert offers[6] == ["json"]
    assert offers[7] == ["shards"]  # a directory
    assert offers[8] == ["policy.yaml"]  # a file
    assert offers[9] == ["bash", "zsh", "fish"]
    assert offers[10] == ["from-spike"]
    assert offers[11] == ["shards"]


def test_every_subcommand_and_flag_of_the_parser_is_in_the_bash_script(tmp_path: Path) -> None:
    """Generated from the tree `spike` parses with: nothing is left out, whatever is added later."""
    text = generated("bash", tmp_path).read_text()
    walk = [("", tree(build_parser()))]
    while walk:
        path, node = walk.pop()
        for name, sub in node.subcommands.items():
            assert name in text
            walk.append((f"{path} {name}".strip(), sub))
        for flag in node.flags:
            for spelling in flag.names:
                assert f" {spelling}" in text, (path, spelling)


# ---------------------------------------------------------------------- fish


def fish_offers(script: Path, line: str) -> list[str]:
    fish = need("fish")
    program = f"source {script}; complete -C '{line}'"
    done = subprocess.run([fish, "--no-config", "-c", program], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stderr == "", done
    return [entry.split("\t")[0] for entry in done.stdout.splitlines()]


def test_fish_script_is_valid_and_completes_the_tree(tmp_path: Path) -> None:
    fish = need("fish")
    script = generated("fish", tmp_path)
    checked = subprocess.run([fish, "--no-config", "-n", str(script)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked
    assert "secret" in fish_offers(script, "spike ")
    assert fish_offers(script, "spike operator r") == ["recover", "restore", "rotate"]
    assert fish_offers(script, "spike secret put --ca") == ["--cas"]
    assert fish_offers(script, "spike policy list --format ") == ["human", "json", "yaml"]  # SPIKE's yaml (issue 17)


# ---------------------------------------------------------------------- zsh

ZSH_ASK = """
compdef() {{ :; }}
compadd() {{ print -r -- "${{@:2}}"; }}
_files() {{ print -r -- "_files $*"; }}
source {script}
ask() {{ words=("$@"); CURRENT=$#; PREFIX="${{words[-1]}}"; _spike; }}
"""


def test_zsh_script_is_valid_and_completes_the_tree(tmp_path: Path) -> None:
    zsh = need("zsh")
    script = generated("zsh", tmp_path)
    assert script.read_text().startswith("#compdef spike\n")
    checked = subprocess.run([zsh, "-n", str(script)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked
    program = ZSH_ASK.format(script=script) + (
        "ask spike secret ''\nask spike status --format ''\nask spike operator recover --dir ''\nask spike cipher e\n"
    )
    done = subprocess.run([zsh, "-f", "-c", program], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stderr == "", done
    assert done.stdout.splitlines() == [
        "put get list delete undelete destroy metadata tune purge",
        "human json",
        "_files -/",
        "encrypt decrypt",  # compadd filters by the prefix typed itself
    ]


def test_an_unknown_shell_is_refused_with_exit_2() -> None:
    done = subprocess.run([*SPIKE, "completion", "tcsh"], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert "invalid choice: 'tcsh'" in done.stderr and "Traceback" not in done.stderr
