#!/usr/bin/env bash
# Builds what benches/gpu/check.sh and engine.sh run: the quire-vlm parity test binary and the
# bench and batching examples, release, stripped, xz-compressed (check.sh unpacks them with python's lzma), into
# DEST (default: .gpu of this checkout; keep it out of git, e.g. `/.gpu/` in .git/info/exclude).
#
#   CUDA=1 (default): --features cuda, with the CUDA 13.0 toolkit of deploy/cuda-toolkit.sh
#   (PyPI wheels, cached under ~/.cache/quire-tools/cuda, as scripts/test-cuda-build.sh) or
#   CUDA_ROOT if set. The binaries link against the toolkit's generated libcuda stub and record
#   NEEDED libcuda.so.1, which the GPU machine's driver provides at run time.
#   CUDA=0: CPU-only binaries, to try check.sh with DEVICE=cpu.
# Env: CARGO_TARGET_DIR (default target), CUDA_COMPUTE_CAP (default 90 = H100/H200), JOBS (2).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${DEST:-$PWD/.gpu}
CUDA=${CUDA:-1}
JOBS=${JOBS:-2}
TGT=${CARGO_TARGET_DIR:-$PWD/target}
feat=()
if [ "$CUDA" = 1 ]; then
  CUDA_ROOT=${CUDA_ROOT:-$(bash deploy/cuda-toolkit.sh "${QUIRE_TOOLS:-$HOME/.cache/quire-tools}/cuda")}
  export PATH="$CUDA_ROOT/bin:$PATH" CUDA_ROOT CUDA_PATH="$CUDA_ROOT" LIBRARY_PATH="$CUDA_ROOT/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
  feat=(--features cuda)
fi
parity=$(cargo test -p quire-vlm --release "${feat[@]}" -j "$JOBS" --test parity --no-run --message-format=json \
  | python3 -c 'import json, sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "parity" and m.get("executable"):
        print(m["executable"])')
cargo build -p quire-vlm --release "${feat[@]}" -j "$JOBS" --example bench --example batching
mkdir -p "$DEST"
rm -f "$DEST"/parity* "$DEST"/bench* "$DEST"/batching*
for pair in "parity:$parity" "bench:$TGT/release/examples/bench" "batching:$TGT/release/examples/batching"; do
  name=${pair%%:*} src=${pair#*:}
  strip -o "$DEST/$name" "$src"
  xz -9 -T1 -f "$DEST/$name"
done
ls -la "$DEST"
