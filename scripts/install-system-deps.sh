#!/usr/bin/env bash
# System packages lungcad and its tests use, from Debian's archive (idempotent; `make test` runs it).
#   chromium    the browser tests (Playwright drives Debian's chromium: Playwright's own download fails offline)
#   postgresql  the web app's PostgreSQL test (the test starts its own server on loopback)
#   libjemalloc2  a faster allocator for PyTorch on CPU (+25-33 % training throughput measured here);
#                 lungcad preloads it when present (lungcad/allocator.py)
#   orthanc, orthanc-dicomweb  a real PACS (and its DICOMweb plugin) for the dicom-node round-trip test
#   dcmtk         storescu / echoscu / findscu, a second DICOM implementation the tests talk to
#   dicom3tools   dciodvfy, the independent validator the DICOM result tests run
#   nodejs, npm   build the web app's image viewer (web/viewer: Cornerstone3D + esbuild; `make viewer`)
# Skips quietly when not root or without apt-get; the tests that need a package then skip with a reason.
set -euo pipefail

PACKAGES=(chromium postgresql libjemalloc2 orthanc orthanc-dicomweb dcmtk dicom3tools)
# Only when there is no npm at all: a Node.js from elsewhere (e.g. NodeSource, which bundles npm) conflicts
# with Debian's npm package.
if ! command -v npm >/dev/null 2>&1; then
    PACKAGES+=(nodejs npm)
fi

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    exit 0
fi
missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
echo "install-system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null
