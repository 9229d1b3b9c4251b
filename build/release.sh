#!/usr/bin/env bash
# The release, step by step: what .github/workflows/release.yml runs, and what runs here too.
#
#   build/release.sh build       build twice and compare (reproducible or nothing), then name the files for
#                                this machine in dist/release/: spike-linux-<arch>, spike-linux-<arch>.cdx.json
#   build/release.sh smoke       the binary tests (tests/binary) against dist/release/spike-linux-<arch>,
#                                CI=true: a skip for want of a build is a failure
#   build/release.sh checksums   dist/release/SHA256SUMS over every file there (after both machines' files
#                                are gathered in it)
#   build/release.sh sign        a keyless sigstore signature bundle <file>.sigstore.json for each file
#                                (cosign; needs the workflow's OIDC token, so: GitHub Actions only)
#   build/release.sh publish TAG a GitHub release TAG with every file of dist/release/ (gh; GitHub Actions only)
#
# <arch> is the machine's (`uname -m`): x86_64 or aarch64. build/build.sh does the building; see its header.
set -euo pipefail
cd "$(dirname "$0")/.."
RELEASE=dist/release
ARCH=$(uname -m)
NAME=spike-linux-$ARCH

say() { printf 'release: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

case "${1:-}" in
    build)
        build/build.sh
        # The second build: another work dir and output dir (under build/work/, ignored by git: an untracked
        # directory would make the commit stamp say -dirty), the same commit and machine.
        build/build.sh --work build/work/repro --dist build/work/repro/dist
        for file in spike spike.cdx.json; do
            cmp "dist/$file" "build/work/repro/dist/$file" ||
                die "two builds of this commit differ in $file: not reproducible, not released"
        done
        say "reproducible: two builds gave the same bytes ($(sha256sum dist/spike | cut -d' ' -f1))"
        mkdir -p "$RELEASE"
        cp dist/spike "$RELEASE/$NAME"
        cp dist/spike.cdx.json "$RELEASE/$NAME.cdx.json"
        (cd "$RELEASE" && sha256sum "$NAME" "$NAME.cdx.json")
        ;;
    smoke)
        [ -x "$RELEASE/$NAME" ] || die "no $RELEASE/$NAME: run build/release.sh build first"
        .ci/postgres
        [ -x .venv/bin/pytest ] || {
            python3 -m venv .venv
            .venv/bin/pip install -q --require-hashes -r requirements/test.txt
            .venv/bin/pip install -q --no-deps --no-build-isolation -e .
        }
        CI=true SPIKE_BINARY="$PWD/$RELEASE/$NAME" .venv/bin/pytest -p no:cacheprovider tests/binary
        ;;
    checksums)
        files=$(cd "$RELEASE" && find . -maxdepth 1 -type f ! -name SHA256SUMS ! -name '*.sigstore.json' -printf '%P\n' |
            LC_ALL=C sort)
        [ -n "$files" ] || die "nothing in $RELEASE"
        # shellcheck disable=SC2086 # one name a line, no spaces in them
        (cd "$RELEASE" && sha256sum $files >SHA256SUMS && cat SHA256SUMS)
        ;;
    sign)
        command -v cosign >/dev/null || die "cosign is not installed (the workflow installs it)"
        [ -f "$RELEASE/SHA256SUMS" ] || die "no $RELEASE/SHA256SUMS: run build/release.sh checksums first"
        for file in $(cd "$RELEASE" && find . -maxdepth 1 -type f ! -name '*.sigstore.json' -printf '%P\n' | LC_ALL=C sort); do
            cosign sign-blob --yes --bundle "$RELEASE/$file.sigstore.json" "$RELEASE/$file"
        done
        ;;
    publish)
        tag=${2:?usage: build/release.sh publish TAG}
        command -v gh >/dev/null || die "gh is not installed"
        [ -f "$RELEASE/SHA256SUMS" ] || die "no $RELEASE/SHA256SUMS: run build/release.sh checksums first"
        gh release create "$tag" --verify-tag --title "spike $tag" \
            --notes "Verify a download before running it: see \"Single binary\" in README.md." "$RELEASE"/*
        ;;
    *)
        echo "usage: build/release.sh build|smoke|checksums|sign|publish TAG" >&2
        exit 2
        ;;
esac
