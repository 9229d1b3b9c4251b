#!/usr/bin/env bash
# Build dist/spike, a one-file Linux executable (x86-64 or aarch64), its SBOM dist/spike.cdx.json
# and dist/SHA256SUMS.
#
#   build/build.sh              build (PYTHON=python3.11 build/build.sh to choose the interpreter)
#   build/build.sh --if-stale   build only if dist/spike was not built from the current sources
#                               (what tests/binary does before its smoke test)
#   build/build.sh --work DIR --dist DIR
#                               scratch and output elsewhere (the reproducibility check builds twice)
#
# Exit codes: 0 built (or up to date), 3 this machine cannot build it (not Linux x86-64/aarch64,
# no Python 3.11+ with a shared libpython, no package index reachable): the smoke test skips on 3
# (fails under CI=true) and fails on anything else.
#
# Reproducible: two builds of one commit on one machine give the same bytes. Timestamps come from
# SOURCE_DATE_EPOCH (the commit's time unless set), PYTHONHASHSEED is fixed, the copy of the sources
# has one mtime and is read in sorted order, and PyInstaller's cache is private to the work dir.
#
# Everything scratch goes to build/work/ (ignored by git):
#   src/      a copy of the sources plus the generated spike/_build_info.py (the commit stamp);
#             pip/setuptools write their own build/ and egg-info there, not in the repository
#   venv/     a clean virtual environment: the runtime dependencies and PyInstaller, nothing else
#             (pip-list.txt: what it held; pip-report.json: the file pip installed for each)
#   pyinstaller/  PyInstaller's work dir; spike/modules.txt lists every module frozen in the binary,
#             spike/lazy.txt the shared libraries unpacked on first import (build/lazy_pack.py)
#   stamp     fingerprint of the inputs and sha256 of the dist/spike built from them
# The repository itself is only read; dist/spike is replaced by a rename, so a running copy is
# never overwritten.
set -euo pipefail
CALLER=$PWD
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$ROOT/build/work
DIST=$ROOT/dist
PYTHON=${PYTHON:-python3}
IF_STALE=0
while [ $# -gt 0 ]; do
    case $1 in
        --if-stale) IF_STALE=1 ;;
        --work | --dist)
            [ $# -ge 2 ] || { echo "build.sh: $1 needs a directory" >&2; exit 2; }
            dir=$(cd "$CALLER" && realpath -m -- "$2")
            if [ "$1" = --work ]; then WORK=$dir; else DIST=$dir; fi
            shift ;;
        *) echo "usage: build/build.sh [--if-stale] [--work DIR] [--dist DIR]" >&2; exit 2 ;;
    esac
    shift
done

say() { printf 'build: %s\n' "$*" >&2; }
cannot() { say "cannot build here: $*"; exit 3; }

umask 022
mkdir -p "$WORK" "$DIST"
exec 9>"$WORK/.lock"
flock 9  # one build at a time in this work dir (test runs may start it concurrently)

# The commit stamped into the binary, and the time every timestamp in it takes.
commit=unknown
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    commit=$(git rev-parse --short=12 HEAD)
    if [ -n "$(git status --porcelain -- spike pyproject.toml requirements/build.txt build)" ]; then
        commit="$commit-dirty"  # built from uncommitted changes: say so
    fi
    SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct HEAD)}
fi
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-315532800}  # outside git: 1980-01-01, the oldest a zip holds
export PYTHONHASHSEED=0 TZ=UTC
# PyInstaller's cache of stripped binaries: one per work dir, so that `--clean` in another tree
# (engineers share this machine) never empties it under a running build.
export PYINSTALLER_CONFIG_DIR=$WORK/pyinstaller-config

# What the binary is made from: the sources, the build files, the interpreter, the stamp.
fingerprint() {
    {
        "$PYTHON" -c 'import sys; print(sys.version)' 2>/dev/null || true
        echo "unlocked=${SPIKE_BUILD_UNLOCKED:-0} commit=$commit epoch=$SOURCE_DATE_EPOCH $(uname -m)"
        sha256sum pyproject.toml requirements/build.txt build/build.sh build/spike.spec build/entry.py \
            build/lazy_pack.py build/lazy_unpack.py build/sbom.py
        find spike -type f \( -name '*.py' -o -name py.typed \) ! -name _build_info.py \
            ! -path '*/__pycache__/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    } | sha256sum | cut -d' ' -f1
}
inputs=$(fingerprint)
if [ "$IF_STALE" = 1 ] && [ -x "$DIST/spike" ] && [ -f "$WORK/stamp" ] &&
    [ "$(cat "$WORK/stamp")" = "$inputs $(sha256sum "$DIST/spike" | cut -d' ' -f1)" ]; then
    say "$DIST/spike is up to date ($("$DIST/spike" --version))"
    exit 0
fi

case "$(uname -s)-$(uname -m)" in
    Linux-x86_64 | Linux-aarch64) ;;
    *) cannot "the binary is built for Linux x86-64 and aarch64, this is $(uname -sm)" ;;
esac
"$PYTHON" -c 'import sys; raise SystemExit(sys.version_info < (3, 11))' 2>/dev/null ||
    cannot "$PYTHON is not Python 3.11 or newer"
"$PYTHON" -c 'import sysconfig; raise SystemExit(not sysconfig.get_config_var("Py_ENABLE_SHARED"))' ||
    cannot "$PYTHON has no shared libpython, which PyInstaller needs (build Python with --enable-shared)"
command -v strip >/dev/null && command -v readelf >/dev/null ||
    cannot "strip and readelf (binutils) are needed to strip and split the shared libraries"

rm -rf "$WORK/src" "$WORK/venv" "$WORK/pyinstaller" "$WORK/pyinstaller-config" "$WORK/dist" "$WORK/probe" \
    "$WORK/stamp"
mkdir -p "$WORK/src"

# 1. A copy of the sources, stamped with the commit it was built from, every file with one mtime.
cp pyproject.toml README.md "$WORK/src/"
cp -R spike "$WORK/src/spike"
find "$WORK/src/spike" -name __pycache__ -prune -exec rm -rf {} +
rm -f "$WORK/src/spike/_build_info.py"
cat >"$WORK/src/spike/_build_info.py" <<EOF
"""Written by build/build.sh into the build's copy of the sources; never committed."""

COMMIT = "$commit"
EOF
find "$WORK/src" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

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
    pip install -q --upgrade --upgrade-strategy eager --report "$WORK/pip-report.json" "$WORK/src[build]"
else
    # Exactly the locked versions, every file checked against its hash; spike itself adds nothing.
    pip install -q --require-hashes -r requirements/build.txt --report "$WORK/pip-report.json"
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

# 4. The SBOM: every distribution frozen into it, as pip installed it from the lock.
"$WORK/venv/bin/python" build/sbom.py --binary "$WORK/dist/spike" --report "$WORK/pip-report.json" \
    --lock requirements/build.txt --sources "$WORK/pyinstaller/spike/sources.txt" --commit "$commit" \
    --out "$WORK/dist/spike.cdx.json"

# 5. Into the output directory by a rename, checksums next to it, and the stamp for --if-stale.
cp "$WORK/dist/spike.cdx.json" "$DIST/.spike.cdx.json.new"
cp "$WORK/dist/spike" "$DIST/.spike.new"
mv -f "$DIST/.spike.cdx.json.new" "$DIST/spike.cdx.json"
mv -f "$DIST/.spike.new" "$DIST/spike"
(cd "$DIST" && sha256sum spike spike.cdx.json >SHA256SUMS)
echo "$inputs $(sha256sum "$DIST/spike" | cut -d' ' -f1)" >"$WORK/stamp"
say "$DIST/spike: $(stat -c %s "$DIST/spike") bytes, sha256 $(sha256sum "$DIST/spike" | cut -d' ' -f1)"
"$DIST/spike" --version
