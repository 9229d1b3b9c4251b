"""`--format` for the secret and policy commands: SPIKE's names for it, and its YAML.

SPIKE's Pilot takes ``-f``/``--format`` with ``human`` (``h``, ``plain``, ``p``), ``json`` (``j``) and
``yaml`` (``y``); spike's take the same.  YAML comes from PyYAML (already what `policy apply` reads),
imported only when asked for.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

FORMATS = ("human", "json", "yaml")
_ALIASES = {"h": "human", "plain": "human", "p": "human", "j": "json", "y": "yaml"}


def output_format(text: str) -> str:
    """SPIKE's spellings of a format, as spike names it (argparse then checks it is one of `FORMATS`)."""
    lowered = text.lower()
    return _ALIASES.get(lowered, lowered)


def add_format_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f",
        "--format",
        type=output_format,
        choices=FORMATS,
        default="human",
        help="human (h, plain, p), json (j) or yaml (y)",
    )


def machine(output: str) -> bool:
    """Whether `output` is for programs (JSON or YAML) rather than people."""
    return output in ("json", "yaml")


def render(output: str, data: Any) -> str:
    """`data` (JSON-like builtins) as one JSON line, or as a YAML document for `yaml`."""
    if output == "yaml":
        import yaml

        text: str = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
        return text.rstrip("\n")
    return json.dumps(data)
