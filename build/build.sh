#!/usr/bin/env bash
# Build dist/spike, a one-file Linux executable, from a clean virtual environment
# that holds only the runtime dependencies and PyInstaller.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf build/work/venv
python3 -m venv build/work/venv
build/work/venv/bin/pip install -q --upgrade pip
build/work/venv/bin/pip install -q . 'pyinstaller>=6.6'
build/work/venv/bin/pyinstaller --noconfirm --clean \
    --workpath build/work/pyinstaller --distpath dist build/spike.spec
(cd dist && sha256sum spike > SHA256SUMS)
dist/spike --version
