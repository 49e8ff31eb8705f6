#!/usr/bin/env bash
# Installs libpdfium for quire-render (pdfium, the PDF engine of Chromium).
#
#   scripts/setup-pdfium.sh [DEST_DIR]
#
# Debian has no pdfium package, so this takes the libpdfium.so that the PyPI wheel
# `pypdfium2` carries (a plain build of pdfium; depends on libc/libm/libgcc_s only) and puts
# it into DEST_DIR. Default DEST_DIR: the folder of the quire binary,
# ${CARGO_TARGET_DIR:-target}/release, where quire looks for it without any setting.
# Elsewhere, point QUIRE_PDFIUM at the file or its folder.
#
# Idempotent: if DEST_DIR/libpdfium.so already has the expected checksum nothing is fetched.
# Needs `pip` (or `python3 -m pip`) and `unzip`/python3 to extract. Prints the library path.
set -euo pipefail

# pypdfium2 5.15.2 carries pdfium chromium/8149 (pdfium-render feature pdfium_8125 binds it).
PYPDFIUM2_VERSION=5.15.2
declare -A SHA256=(
  [x86_64]=c76dc0f7839644bfa7c3e3107a6068df714e339c861bb7d4519907b821d427f9
  [aarch64]=4378615ad9710397c96c112611be9018629bbfe38805d91a2663a534b99c28ca
)
declare -A PLATFORM=(
  [x86_64]=manylinux_2_17_x86_64
  [aarch64]=manylinux_2_17_aarch64
)

root="$(cd "$(dirname "$0")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
dest="${1:-$target/release}"
arch="$(uname -m)"
case "$arch" in
  x86_64|amd64) arch=x86_64 ;;
  aarch64|arm64) arch=aarch64 ;;
  *) echo "setup-pdfium: no pdfium build known for architecture $arch" >&2; exit 1 ;;
esac
if [ "$(uname -s)" != Linux ]; then
  echo "setup-pdfium: only Linux is handled here; get libpdfium from https://github.com/bblanchon/pdfium-binaries and set QUIRE_PDFIUM" >&2
  exit 1
fi
want="${SHA256[$arch]}"
lib="$dest/libpdfium.so"

sha() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$lib" ] && { [ -z "$want" ] || [ "$(sha "$lib")" = "$want" ]; }; then
  echo "$lib"
  exit 0
fi

mkdir -p "$dest"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
pip=(pip)
command -v pip >/dev/null 2>&1 || pip=(python3 -m pip)
"${pip[@]}" download --quiet --no-deps --only-binary=:all: \
  --platform "${PLATFORM[$arch]}" --python-version 3.11 --implementation py \
  --dest "$tmp" "pypdfium2==$PYPDFIUM2_VERSION" >&2
wheel="$(ls "$tmp"/pypdfium2-*.whl | head -n1)"
if command -v unzip >/dev/null 2>&1; then
  unzip -q -o -j "$wheel" 'pypdfium2_raw/libpdfium.so' -d "$tmp/x"
else
  python3 - "$wheel" "$tmp/x" <<'PY'
import sys, zipfile, os
z = zipfile.ZipFile(sys.argv[1]); os.makedirs(sys.argv[2], exist_ok=True)
open(os.path.join(sys.argv[2], "libpdfium.so"), "wb").write(z.read("pypdfium2_raw/libpdfium.so"))
PY
fi
got="$(sha "$tmp/x/libpdfium.so")"
if [ -n "$want" ] && [ "$got" != "$want" ]; then
  echo "setup-pdfium: checksum mismatch for libpdfium.so from pypdfium2 $PYPDFIUM2_VERSION ($arch): got $got, want $want" >&2
  exit 1
fi
# Atomic replace, so a running quire never sees half a library.
install -m 0755 "$tmp/x/libpdfium.so" "$lib.tmp.$$"
mv -f "$lib.tmp.$$" "$lib"
echo "$lib"
