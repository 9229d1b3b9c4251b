"""CycloneDX 1.5 SBOM of the spike binary: what is frozen into it, from the environment it was built from.

    build/work/venv/bin/python build/sbom.py --binary build/work/dist/spike --report build/work/pip-report.json \\
        --lock requirements/build.txt --sources build/work/pyinstaller/spike/sources.txt --commit abc --out x.json

Run by build/build.sh with the build venv's interpreter (PyInstaller's archive reader, that venv's metadata).
The binary is read, not the build's intentions: a distribution of the venv is listed when a module or a file
of its RECORD is in the executable (its PYZ, its archive, or the lazily unpacked blob of build/lazy_pack.py),
with its version, purl, the sha256 of the exact file pip installed (which must be one of the lock's hashes
for that version) and its licence from its metadata.  The interpreter (CPython: libpython, the standard
library) and the system's shared libraries PyInstaller copied in (OpenSSL, zlib, SQLite, ... with their
Debian package when dpkg knows the file) are listed too.  Deterministic: the timestamp is SOURCE_DATE_EPOCH,
the serial number is derived from the binary's sha256, every list is sorted.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import uuid
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from PyInstaller.archive.readers import CArchiveReader, ZlibArchiveReader

LAZY_ENTRY = "spike-lazy.bin"
SPDX_IDS = {"MIT", "MIT-0", "BSD-2-Clause", "BSD-3-Clause", "Apache-2.0", "PSF-2.0", "LGPL-3.0-only", "ISC"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def contents(binary: Path) -> tuple[set[str], set[str], set[str]]:
    """Module names in the PYZ, file names the bootloader unpacks or the lazy blob holds, bootstrap scripts."""
    archive = CArchiveReader(str(binary))
    files = {name for name, entry in archive.toc.items() if entry[4] in "bxZn"}
    scripts = {name for name, entry in archive.toc.items() if entry[4] in "msM"}
    with tempfile.TemporaryDirectory() as tmp:
        pyz_path = Path(tmp) / "PYZ.pyz"
        pyz_path.write_bytes(archive.extract("PYZ.pyz"))
        modules = set(ZlibArchiveReader(str(pyz_path)).toc)
    if LAZY_ENTRY in archive.toc:
        blob = archive.extract(LAZY_ENTRY)
        _magic, length, rest = blob.split(b"\n", 2)
        for line in rest[: int(length)].decode().splitlines():
            kind, *fields = line.split(" ")
            if kind == "F":
                files.add(fields[3])
            elif kind == "S":
                files.add(fields[0])
    return modules, files, scripts


def frozen(dist: metadata.Distribution, modules: set[str], files: set[str], scripts: set[str]) -> bool:
    for record in dist.files or []:
        path = PurePosixPath(str(record))
        if path.parts[0] == ".." or path.parts[0].endswith(".dist-info"):
            continue  # console scripts, and the metadata PyInstaller copies for importlib.metadata
        if path.suffix == ".py":
            name = ".".join(path.with_suffix("").parts).removesuffix(".__init__")
            # PyInstaller's loader and runtime hooks are frozen as bootstrap modules and scripts by base name.
            bootstrap = path.parts[0] in ("PyInstaller", "_pyinstaller_hooks_contrib") and path.stem in scripts
            if name in modules or bootstrap:
                return True
        elif str(path) in files:
            return True
    return False


def lock_hashes(lock: Path) -> dict[tuple[str, str], set[str]]:
    pins: dict[tuple[str, str], set[str]] = {}
    for block in re.split(r"\n(?=\S)", lock.read_text()):
        pin = re.match(r"([A-Za-z0-9_.-]+)==([^ ;\\\n]+)", block)
        if pin:
            pins[(canonical(pin[1]), pin[2])] = set(re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return pins


def licenses(meta: Any) -> list[dict[str, Any]]:
    expression = meta.get("License-Expression")
    if expression:
        return [{"expression": expression}]
    text = (meta.get("License") or "").strip()
    if text and "\n" not in text and len(text) < 80:
        return [{"license": {"id": text} if text in SPDX_IDS else {"name": text}}]
    classifiers = [c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License :: ")]
    return [{"license": {"name": name}} for name in sorted(set(classifiers))]


def debian_package(path: str) -> tuple[str, str, str] | None:
    """(package, version, architecture) of the Debian package that installed `path`, if dpkg knows it."""
    candidates = [path, os.path.realpath(path)]
    candidates += [p.removeprefix("/usr") for p in candidates if p.startswith("/usr/")]
    candidates += ["/usr" + p for p in candidates if p.startswith("/lib")]
    for candidate in dict.fromkeys(candidates):
        try:
            found = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True, check=False)
        except OSError:
            return None
        if found.returncode == 0:
            package = found.stdout.split(":", 1)[0].strip()
            show = ["dpkg-query", "-W", "-f=${Version} ${Architecture}", package]
            version, arch = subprocess.run(show, capture_output=True, text=True, check=True).stdout.split()
            return package, version, arch
    return None


def os_id() -> str:
    try:
        release = Path("/etc/os-release").read_text()
    except OSError:
        return "linux"
    found = re.search(r'^ID="?([a-z0-9._-]+)"?$', release, re.M)
    return found[1] if found else "linux"


def system_libraries(sources: Path, files: set[str]) -> list[dict[str, Any]]:
    """The shared libraries copied in from outside the venv and the interpreter, grouped by package."""
    venv, base = Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()
    found: dict[str, dict[str, Any]] = {}
    for line in sources.read_text().splitlines():
        dest, src, kind = line.split("\t")
        if kind not in ("BINARY", "EXTENSION") or dest not in files:
            continue
        real = Path(src).resolve()
        if real.is_relative_to(venv) or real.is_relative_to(base):
            continue
        package = debian_package(src)
        if package is None:
            name, version = Path(dest).name, "unknown"
            purl = f"pkg:generic/{name}"
        else:
            name, version, arch = package
            purl = f"pkg:deb/{os_id()}/{name}@{version}?arch={arch}"
        component = found.setdefault(
            purl, {"type": "library", "bom-ref": purl, "name": name, "version": version, "purl": purl, "files": []}
        )
        component["files"].append(dest)
    listed = []
    for component in found.values():
        files_in = sorted(component.pop("files"))
        component["properties"] = [{"name": "spike:file", "value": f} for f in files_in]
        listed.append(component)
    return listed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True, help="pip install --report of the build venv")
    parser.add_argument("--lock", type=Path, required=True)
    parser.add_argument("--sources", type=Path, required=True, help="dest<TAB>source<TAB>kind, from spike.spec")
    parser.add_argument("--commit", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    modules, files, scripts = contents(args.binary)
    installed = {canonical(item["metadata"]["name"]): item for item in json.loads(args.report.read_text())["install"]}
    locked = lock_hashes(args.lock)
    components: list[dict[str, Any]] = []
    spike_version = "unknown"
    for dist in metadata.distributions():
        name = canonical(dist.metadata["Name"])
        if name == "spike":
            spike_version = dist.version
            continue
        if not frozen(dist, modules, files, scripts):
            continue
        item = installed.get(name)
        if item is None:
            raise SystemExit(f"sbom: {name} is frozen into the binary but pip's report does not list it")
        digest = item["download_info"]["archive_info"]["hashes"]["sha256"]
        allowed = locked.get((name, dist.version))
        if allowed is not None and digest not in allowed:
            raise SystemExit(f"sbom: {name} {dist.version}: installed file {digest} is not in {args.lock}")
        purl = f"pkg:pypi/{name}@{dist.version}"
        component: dict[str, Any] = {
            "type": "library",
            "bom-ref": purl,
            "name": name,
            "version": dist.version,
            "purl": purl,
            "hashes": [{"alg": "SHA-256", "content": digest}],
            "properties": [{"name": "spike:wheel", "value": item["download_info"]["url"].rsplit("/", 1)[-1]}],
        }
        found_licenses = licenses(dist.metadata)
        if found_licenses:
            component["licenses"] = found_licenses
        if allowed is None:
            component["properties"].append({"name": "spike:locked", "value": "false (SPIKE_BUILD_UNLOCKED=1)"})
        components.append(component)
    python = ".".join(map(str, sys.version_info[:3]))
    components.append(
        {
            "type": "framework",
            "bom-ref": f"pkg:generic/cpython@{python}",
            "name": "cpython",
            "version": python,
            "purl": f"pkg:generic/cpython@{python}",
            "licenses": [{"license": {"id": "PSF-2.0"}}],
        }
    )
    components.extend(system_libraries(args.sources, files))
    components.sort(key=lambda c: (c["type"], c["name"], c["bom-ref"]))

    binary_sha256 = hashlib.sha256(args.binary.read_bytes()).hexdigest()
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    root = f"pkg:generic/spike@{spike_version}"
    bom = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, 'spike-sbom:' + binary_sha256)}",
        "version": 1,
        "metadata": {
            "timestamp": datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "tools": {"components": [{"type": "application", "name": "spike build/sbom.py"}]},
            "component": {
                "type": "application",
                "bom-ref": root,
                "name": "spike",
                "version": spike_version,
                "purl": root,
                "licenses": [{"license": {"id": "Apache-2.0"}}],
                "hashes": [{"alg": "SHA-256", "content": binary_sha256}],
                "properties": [{"name": "spike:commit", "value": args.commit}],
            },
        },
        "components": components,
        "dependencies": [{"ref": root, "dependsOn": [c["bom-ref"] for c in components]}],
    }
    args.out.write_text(json.dumps(bom, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
