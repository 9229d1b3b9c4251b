"""`spike completion bash|zsh|fish`: a shell completion script, generated from the argparse tree.

The script is data plus one small walker per shell, so that it cannot drift
from the parser: `tree()` reads every command, subcommand and flag out of the
parser `spike` itself uses (`spike.app.cli.build_parser`), and each shell gets
the same four lookups keyed by the subcommand path typed so far (``""``,
``"secret"``, ``"secret put"``):

* the subcommands there;
* the flags there;
* the flags there that take a value (so the walker skips that value);
* per flag, its choices (``--format`` -> ``human json``) or whether it
  names a file or a directory.

The walker reads the words before the cursor, skips flags and their values,
and follows the words that are subcommands; then it offers flags (after a
``-``), the flag's value (after a flag that takes one), or the subcommands.
Positional arguments (a secret path, a key) are not completed: they live in
Nexus, and completion never calls it.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from pathlib import Path

SHELLS = ("bash", "zsh", "fish")

# Flags whose value is a path on this machine, by metavar (argparse knows only `type=Path` otherwise).
_FILE_METAVARS = frozenset({"FILE", "PEM", "TOML", "SHARD_FILE"})
_DIR_METAVARS = frozenset({"DIR"})


@dataclass(frozen=True, slots=True)
class Flag:
    names: tuple[str, ...]  # every spelling: ("-h", "--help")
    takes_value: bool
    choices: tuple[str, ...] = ()
    kind: str = ""  # "file", "dir" or "" (a value completion cannot guess)
    help: str = ""


@dataclass(slots=True)
class Node:
    """One command: its subcommands (with their help) and its flags."""

    help: str = ""
    subcommands: dict[str, Node] = field(default_factory=dict)
    flags: list[Flag] = field(default_factory=list)


def _flag(action: argparse.Action) -> Flag:
    takes_value = action.nargs != 0
    choices = tuple(str(c) for c in action.choices) if takes_value and action.choices else ()
    metavar = action.metavar if isinstance(action.metavar, str) else ""
    kind = ""
    if action.type is Path or metavar in _FILE_METAVARS:
        kind = "dir" if (metavar in _DIR_METAVARS or action.dest.endswith("dir")) else "file"
    elif metavar in _DIR_METAVARS:
        kind = "dir"
    help_text = "" if action.help in (None, argparse.SUPPRESS) else str(action.help)
    return Flag(tuple(action.option_strings), takes_value, choices, kind, help_text)


def tree(parser: argparse.ArgumentParser, help_text: str = "") -> Node:
    """Every command, subcommand and flag of `parser`, as completion needs them."""
    node = Node(help=help_text)
    for action in parser._actions:  # argparse has no public walk of its tree
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                node.subcommands[name] = tree(sub, helps.get(name, ""))
        elif action.option_strings:
            node.flags.append(_flag(action))
        elif action.choices:  # a positional with fixed values (`spike completion SHELL`): offered like subcommands
            for choice in action.choices:
                node.subcommands[str(choice)] = Node(help=str(action.help or ""))
    return node


def _walk(node: Node, path: tuple[str, ...] = ()) -> list[tuple[str, Node]]:
    found = [(" ".join(path), node)]
    for name, sub in node.subcommands.items():
        found += _walk(sub, (*path, name))
    return found


def _words(values: list[str]) -> str:
    return " ".join(values)


def _quoted(key: str) -> str:
    return shlex.quote(key) if key else "''"


def _case(lines: list[str], name: str, entries: list[tuple[str, str]], shell: str) -> None:
    """A function `name KEY` printing the words filed under KEY (one `case` for bash and zsh, `switch` for fish)."""
    if shell == "fish":
        lines.append(f"function {name}")
        lines.append("    switch $argv[1]")
        for key, words in entries:
            lines.append(f"        case {_quoted(key)}")
            lines.append(f"            printf '%s\\n' {words}")
        lines.append("    end")
        lines.append("end")
        return
    lines.append(f"{name}() {{")
    lines.append('    case "$1" in')
    for key, words in entries:
        lines.append(f"        {_quoted(key)}) printf '%s\\n' {words} ;;")
    lines.append("    esac")
    lines.append("}")


def _tables(root: Node, shell: str, prefix: str) -> list[str]:
    nodes = _walk(root)
    lines: list[str] = []
    subcommands = [(path, _words(list(node.subcommands))) for path, node in nodes if node.subcommands]
    flags = [(path, _words([n for f in node.flags for n in f.names])) for path, node in nodes if node.flags]
    valued = [
        (path, _words([n for f in node.flags if f.takes_value for n in f.names]))
        for path, node in nodes
        if any(f.takes_value for f in node.flags)
    ]
    choices = [
        (f"{path}|{name}", _words([shlex.quote(c) for c in f.choices]))
        for path, node in nodes
        for f in node.flags
        if f.choices
        for name in f.names
    ]
    kinds = [(f"{path}|{name}", f.kind) for path, node in nodes for f in node.flags if f.kind for name in f.names]
    _case(lines, f"{prefix}_subcommands", subcommands, shell)
    _case(lines, f"{prefix}_flags", flags, shell)
    _case(lines, f"{prefix}_valued", valued, shell)
    _case(lines, f"{prefix}_choices", choices, shell)
    _case(lines, f"{prefix}_kind", kinds, shell)
    return lines


_HEADER = "# {shell} completion for spike, generated by `spike completion {shell}` from its own parser."

_BASH = r"""
# The subcommand path typed before the cursor ("", "secret", "secret put"), in _spike_path;
# set _spike_value to the flag whose value is being typed, if any.
_spike_walk() {
    local i word skip=""
    _spike_path="" _spike_value=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${COMP_WORDS[i]}"
        if [[ -n $skip ]]; then
            skip=""
            [[ $word == "=" ]] && skip=1  # --flag=value, split by COMP_WORDBREAKS
            continue
        fi
        if [[ $word == -* ]]; then
            if [[ $word != *=* ]] && [[ " $(_spike_valued "$_spike_path" | tr '\n' ' ') " == *" $word "* ]]; then
                skip=1
                _spike_value="$word"
            fi
            continue
        fi
        if [[ " $(_spike_subcommands "$_spike_path" | tr '\n' ' ') " == *" $word "* ]]; then
            _spike_path="${_spike_path:+$_spike_path }$word"
        fi
    done
    [[ -n $skip ]] || _spike_value=""
}

_spike() {
    local cur="${COMP_WORDS[COMP_CWORD]}" _spike_path _spike_value
    [[ $cur == "=" ]] && cur=""
    _spike_walk
    COMPREPLY=()
    if [[ -n $_spike_value ]]; then
        local choices
        choices="$(_spike_choices "$_spike_path|$_spike_value")"
        if [[ -n $choices ]]; then
            mapfile -t COMPREPLY < <(compgen -W "$choices" -- "$cur")
        else
            case "$(_spike_kind "$_spike_path|$_spike_value")" in
                dir) compopt -o filenames 2>/dev/null; mapfile -t COMPREPLY < <(compgen -d -- "$cur") ;;
                file) compopt -o filenames 2>/dev/null; mapfile -t COMPREPLY < <(compgen -f -- "$cur") ;;
            esac
        fi
    elif [[ $cur == -* ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$(_spike_flags "$_spike_path")" -- "$cur")
    else
        mapfile -t COMPREPLY < <(compgen -W "$(_spike_subcommands "$_spike_path")" -- "$cur")
    fi
}

complete -F _spike spike
"""

_ZSH = r"""
_spike() {
    local cmdpath="" value="" word skip="" i
    local -a offered
    for ((i = 2; i < CURRENT; i++)); do
        word="${words[i]}"
        if [[ -n $skip ]]; then
            skip=""
            continue
        fi
        if [[ $word == -* ]]; then
            if [[ $word != *=* ]] && (( ${${(f)"$(_spike_valued "$cmdpath")"}[(Ie)$word]} )); then
                skip=1
                value="$word"
            fi
            continue
        fi
        if (( ${${(f)"$(_spike_subcommands "$cmdpath")"}[(Ie)$word]} )); then
            cmdpath="${cmdpath:+$cmdpath }$word"
        fi
    done
    [[ -n $skip ]] || value=""
    if [[ -n $value ]]; then
        offered=(${(f)"$(_spike_choices "$cmdpath|$value")"})
        if (( ${#offered} )); then
            compadd -- $offered
        else
            case "$(_spike_kind "$cmdpath|$value")" in
                dir) _files -/ ;;
                file) _files ;;
            esac
        fi
    elif [[ $PREFIX == -* ]]; then
        offered=(${(f)"$(_spike_flags "$cmdpath")"})
        compadd -- $offered
    else
        offered=(${(f)"$(_spike_subcommands "$cmdpath")"})
        (( ${#offered} )) && compadd -- $offered
    fi
}

if [[ $funcstack[1] == _spike ]]; then
    _spike "$@"  # autoloaded from a file named _spike on $fpath
else
    compdef _spike spike  # sourced: source <(spike completion zsh)
fi
"""

_FISH = r"""
# The subcommand path typed so far ("", "secret", "secret put").
function __spike_path
    set -l path
    set -l skip 0
    for word in (commandline -opc)[2..-1]
        if test $skip = 1
            set skip 0
            continue
        end
        if string match -q -- '-*' $word
            if not string match -q -- '*=*' $word; and contains -- $word (__spike_valued (string join ' ' $path))
                set skip 1
            end
            continue
        end
        if contains -- $word (__spike_subcommands (string join ' ' $path))
            set -a path $word
        end
    end
    string join ' ' $path
end

function __spike_at
    set -l path (__spike_path)
    test "$path" = "$argv[1]"
end

complete -c spike -f
"""


def _fish_lines(root: Node) -> list[str]:
    lines: list[str] = []
    for path, node in _walk(root):
        at = f"-n \"__spike_at '{path}'\""  # paths are words of [a-z-]
        for name, sub in node.subcommands.items():
            lines.append(f"complete -c spike {at} -a {shlex.quote(name)} -d {shlex.quote(_short(sub.help))}")
        for f in node.flags:
            spell = " ".join(
                f"-l {shlex.quote(n[2:])}" if n.startswith("--") else f"-s {shlex.quote(n[1:])}" for n in f.names
            )
            extra = ""
            if f.choices:
                extra = f" -x -a {shlex.quote(' '.join(f.choices))}"
            elif f.kind:
                extra = " -r -F"
            elif f.takes_value:
                extra = " -x"
            lines.append(f"complete -c spike {at} {spell}{extra} -d {shlex.quote(_short(f.help))}")
    return lines


def _short(text: str) -> str:
    """The start of a help text: fish shows it beside each candidate."""
    first = text.split(" (", 1)[0].split("; ", 1)[0].strip()
    return first if len(first) <= 60 else first[:57] + "..."


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for `shell` (one of SHELLS)."""
    root = tree(parser)
    header = _HEADER.format(shell=shell)
    if shell == "bash":
        return "\n".join([header, *_tables(root, "bash", "_spike"), _BASH.strip("\n")]) + "\n"
    if shell == "zsh":
        return "\n".join(["#compdef spike", header, *_tables(root, "zsh", "_spike"), _ZSH.strip("\n")]) + "\n"
    if shell == "fish":
        return "\n".join([header, *_tables(root, "fish", "__spike"), _FISH.strip("\n"), *_fish_lines(root)]) + "\n"
    raise ValueError(f"no completion for the shell {shell!r}: one of {', '.join(SHELLS)}")
