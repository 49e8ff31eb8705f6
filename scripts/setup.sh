#!/usr/bin/env bash
# Builds quire (release) and puts libpdfium next to the binary, where quire
# finds it without any setting. Prints the path of the binary.
#
#   scripts/setup.sh            # CPU build
#   scripts/setup.sh cuda       # with the CUDA backend (needs a CUDA toolkit)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
features=()
[ "${1:-}" = cuda ] && features=(--features cuda)
cargo build --release -p quire "${features[@]}" >&2
bin="${CARGO_TARGET_DIR:-$root/target}/release"
scripts/setup-pdfium.sh "$bin" >&2
echo "$bin/quire"
