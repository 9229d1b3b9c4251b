#!/usr/bin/env bash
# Build dist/spike, a one-file Linux x86-64 executable, and dist/SHA256SUMS.
#
#   build/build.sh              build (PYTHON=python3.11 build/build.sh to choose the interpreter)
#   build/build.sh --if-stale   build only if dist/spike was not built from the current sources
#                               (what tests/binary does before its smoke test)
#
# Exit codes: 0 built (or up to date), 3 this machine cannot build it (not Linux x86-64, no
# Python 3.11+ with a shared libpython, no package index reachable): the smoke test skips on 3
# and fails on anything else.
#
# Everything scratch goes to build/work/ (ignored by git):
#   src/      a copy of the sources plus the generated spike/_build_info.py (the commit stamp);
#             pip/setuptools write their own build/ and egg-info there, not in the repository
#   venv/     a clean virtual environment: the runtime dependencies and PyInstaller, nothing else
#             (pip-list.txt: what it held)
#   pyinstaller/  PyInstaller's work dir; spike/modules.txt lists every module frozen in the binary
#   stamp     fingerprint of the sources and sha256 of the dist/spike built from them
# The repository itself is only read; dist/spike is replaced by a rename, so a running copy is
# never overwritten.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$ROOT/build/work
PYTHON=${PYTHON:-python3}
IF_STALE=0
[ "${1:-}" = "--if-stale" ] && IF_STALE=1

say() { printf 'build: %s\n' "$*" >&2; }
cannot() { say "cannot build here: $*"; exit 3; }

mkdir -p "$WORK" dist
exec 9>"$WORK/.lock"
flock 9  # one build at a time in this tree (test runs may start it concurrently)

# What the binary is made from: the sources, the build files, the interpreter's version.
fingerprint() {
    {
        "$PYTHON" -c 'import sys; print(sys.version)' 2>/dev/null || true
        echo "unlocked=${SPIKE_BUILD_UNLOCKED:-0}"
        sha256sum pyproject.toml requirements/build.txt build/spike.spec build/entry.py build/build.sh
        find spike -type f \( -name '*.py' -o -name py.typed \) ! -name _build_info.py \
            ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum
    } | sha256sum | cut -d' ' -f1
}
inputs=$(fingerprint)
if [ "$IF_STALE" = 1 ] && [ -x dist/spike ] && [ -f "$WORK/stamp" ] &&
    [ "$(cat "$WORK/stamp")" = "$inputs $(sha256sum dist/spike | cut -d' ' -f1)" ]; then
    say "dist/spike is up to date ($(dist/spike --version))"
    exit 0
fi

[ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] || cannot "the binary is built for Linux x86-64, this is $(uname -sm)"
"$PYTHON" -c 'import sys; raise SystemExit(sys.version_info < (3, 11))' 2>/dev/null ||
    cannot "$PYTHON is not Python 3.11 or newer"
"$PYTHON" -c 'import sysconfig; raise SystemExit(not sysconfig.get_config_var("Py_ENABLE_SHARED"))' ||
    cannot "$PYTHON has no shared libpython, which PyInstaller needs (build Python with --enable-shared)"

rm -rf "$WORK/src" "$WORK/venv" "$WORK/pyinstaller" "$WORK/dist" "$WORK/probe" "$WORK/stamp"
mkdir -p "$WORK/src"

# 1. A copy of the sources, stamped with the commit it was built from.
cp pyproject.toml README.md "$WORK/src/"
cp -R spike "$WORK/src/spike"
find "$WORK/src/spike" -name __pycache__ -prune -exec rm -rf {} +
rm -f "$WORK/src/spike/_build_info.py"
commit=unknown
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    commit=$(git rev-parse --short=12 HEAD)
    if [ -n "$(git status --porcelain -- spike pyproject.toml build/spike.spec build/entry.py)" ]; then
        commit="$commit-dirty"  # built from uncommitted changes: say so
    fi
fi
cat >"$WORK/src/spike/_build_info.py" <<EOF
"""Written by build/build.sh into the build's copy of the sources; never committed."""

COMMIT = "$commit"
EOF

# 2. A clean virtual environment: the runtime dependencies and PyInstaller only.
say "virtual environment (runtime dependencies + PyInstaller) in $WORK/venv"
"$PYTHON" -m venv "$WORK/venv" || cannot "$PYTHON -m venv failed (is the venv module installed?)"
pip() { "$WORK/venv/bin/python" -m pip "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
pyinstaller_pin=$(grep -oE '^pyinstaller==[^ ;\\]+' requirements/build.txt)
pip download -q --no-deps --dest "$WORK/probe" "$pyinstaller_pin" ||
    cannot "pip could not fetch PyInstaller from a package index (no network?)"
# The index answered: a failure from here on is a real one.
if [ "${SPIKE_BUILD_UNLOCKED:-0}" = 1 ]; then
    # .ci/newest: the newest releases pyproject.toml's ranges allow, as an embedder would get them.
    say "SPIKE_BUILD_UNLOCKED=1: installing from pyproject.toml's ranges, not requirements/build.txt"
    pip install -q --upgrade --upgrade-strategy eager "$WORK/src[build]"
else
    # Exactly the locked versions, every file checked against its hash; spike itself adds nothing.
    pip install -q --require-hashes -r requirements/build.txt
    pip install -q --no-deps --no-build-isolation "$WORK/src"
fi
pip list --format=freeze >"$WORK/pip-list.txt"
if grep -iE '^(pytest|_pytest|hypothesis|mypy|ruff|types-|trustme|pluggy|iniconfig)[-_a-z]*==' "$WORK/pip-list.txt"; then
    say "a test tool is in the build environment (see $WORK/pip-list.txt): refusing to build"
    exit 1
fi

# 3. The one-file executable. The spec refuses a module list that holds a test tool.
say "PyInstaller (build/spike.spec)"
(cd "$WORK" && "$WORK/venv/bin/pyinstaller" --noconfirm --clean --log-level WARN \
    --workpath "$WORK/pyinstaller" --distpath "$WORK/dist" "$ROOT/build/spike.spec")
"$WORK/dist/spike" --version >/dev/null

# 4. Into dist/ by a rename, checksums next to it, and the stamp for --if-stale.
cp "$WORK/dist/spike" dist/.spike.new
mv -f dist/.spike.new dist/spike
(cd dist && sha256sum spike >SHA256SUMS)
echo "$inputs $(cut -d' ' -f1 dist/SHA256SUMS)" >"$WORK/stamp"
say "dist/spike: $(stat -c %s dist/spike) bytes, sha256 $(cut -d' ' -f1 dist/SHA256SUMS)"
dist/spike --version
