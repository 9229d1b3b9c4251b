"""PyInstaller hook for psycopg_binary, in place of pyinstaller-hooks-contrib's (build/spike.spec: hookspath).

The contrib hook names `psycopg_binary._uuid` as a hidden import: a pure-Python helper that the C extension
of some psycopg releases imports to build UUID values.  psycopg-binary 3.3 has no such module (its wheel
holds `_psycopg`, `pq` and `version` only; its UUID loaders import the standard `uuid` module, which is in the
binary), so PyInstaller warned `Hidden import "psycopg_binary._uuid" not found!` and collected nothing for
it.  Named here only if the installed release has it, so the warning is gone without losing the module
when a release brings it back.
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.find_spec("psycopg_binary")  # finds the package without importing it
_package = Path(_spec.origin).parent if _spec is not None and _spec.origin else None
hiddenimports = ["psycopg_binary._uuid"] if _package is not None and any(_package.glob("_uuid.*")) else []
