#!/usr/bin/env bash
# The GPU build up to its link step, with no GPU and no container: what the
# builder stage of deploy/Dockerfile.cuda does, on this machine.
#
#   scripts/test-cuda-build.sh            # build and check
#   scripts/test-cuda-build.sh --cached   # exit 0 when a warm run is possible (toolkit and build cached)
#
#   1. the CUDA 13.0 toolkit from NVIDIA's PyPI wheels and the generated libcuda
#      stub, by deploy/cuda-toolkit.sh (the script the Dockerfile runs), in
#      ${QUIRE_TOOLS:-~/.cache/quire-tools}/cuda (kept between runs);
#   2. `cargo build --locked -p quire --features cuda` (dev profile: the link is
#      the point, and it costs less than release's thin LTO) for
#      CUDA_COMPUTE_CAP (default 90, the Dockerfile's default) into
#      ${QUIRE_CUDA_TARGET_DIR:-~/.cache/quire-target-cuda};
#   3. the link: the binary records NEEDED libcuda.so.1 and every cu* function
#      it imports is one the stub (so cuda.h 13.0, so the driver) defines,
#      linked with no ignored symbols; then `quire --version` and
#      `quire worker --help` run with LD_LIBRARY_PATH on the wheels' libraries
#      and the stub (no LD_PRELOAD).
# Prints the time each step took.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

tools="${QUIRE_TOOLS:-$HOME/.cache/quire-tools}/cuda"
target="${QUIRE_CUDA_TARGET_DIR:-$HOME/.cache/quire-target-cuda}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
bin="$target/debug/quire"

if [ "${1:-}" = --cached ]; then
  [ -f "$tools/venv/.wheels" ] && [ -x "$bin" ]
  exit
fi

t_start=$SECONDS
step() { echo "cuda-build: $* ($((SECONDS - t_start)) s)" >&2; }

cuda="$(bash deploy/cuda-toolkit.sh "$tools")"
step "CUDA 13.0 toolkit and libcuda stub ready in $cuda"

export PATH="$cuda/bin:$PATH" CUDA_ROOT="$cuda" CUDA_PATH="$cuda" LIBRARY_PATH="$cuda/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CARGO_TARGET_DIR="$target" CARGO_INCREMENTAL=0
# As in scripts/test.sh: when this target folder was last built from another
# checkout, our crates are cleaned (cargo names their build units by their path
# inside the workspace, so the other checkout's build could look fresh).
marker="$target/.quire-checkout"
if [ -f "$marker" ] && [ "$(cat "$marker")" != "$root" ]; then
  echo "scripts/test-cuda-build.sh: $target was last built from $(cat "$marker"); rebuilding this checkout's crates" >&2
  cargo clean -q $(sed -n 's/^name = "\(quire[a-z-]*\)"$/-p \1/p' crates/*/Cargo.toml | sort -u)
fi
mkdir -p "$target" && printf '%s\n' "$root" >"$marker"
cargo build --locked -p quire --features cuda
step "cargo build -p quire --features cuda (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP)"

# --- the link ----------------------------------------------------------------
needed="$(readelf -d "$bin" | grep '(NEEDED)')"
echo "$needed" >&2
grep -q '\[libcuda\.so\.1\]' <<<"$needed" || { echo "scripts/test-cuda-build.sh: $bin does not record NEEDED libcuda.so.1" >&2; exit 1; }
# Every driver function the binary imports is defined by the stub made from cuda.h.
nm -D --undefined-only "$bin" | awk '{print $2}' | sed 's/@.*//' | grep '^cu[A-Z]' | sort -u > "$target/cuda-imports.txt"
nm -D --defined-only "$cuda/lib/stubs/libcuda.so" | awk '{print $3}' | sort -u > "$target/cuda-stub-exports.txt"
missing="$(comm -23 "$target/cuda-imports.txt" "$target/cuda-stub-exports.txt")"
[ -z "$missing" ] || { echo "scripts/test-cuda-build.sh: imported but not in the stub: $missing" >&2; exit 1; }
n_imports="$(wc -l < "$target/cuda-imports.txt")"
[ "$n_imports" -gt 0 ] || { echo "scripts/test-cuda-build.sh: $bin imports no cu* function: not a CUDA build?" >&2; exit 1; }
export LD_LIBRARY_PATH="$cuda/lib:$cuda/lib/stubs"
unset LD_PRELOAD
if LD_LIBRARY_PATH="$cuda/lib:$cuda/lib/stubs" ldd "$bin" | grep 'not found' >&2; then
  echo "scripts/test-cuda-build.sh: $bin has libraries that are not found" >&2
  exit 1
fi
version="$("$bin" --version)"
"$bin" worker --help >/dev/null
step "linked: NEEDED libcuda.so.1, $n_imports driver functions imported, all in the stub; $version and worker --help run"
