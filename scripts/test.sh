#!/usr/bin/env bash
# The one test command: installs what the tests need when it is missing
# (poppler-utils, libpdfium, nats-server, Garage, pyarrow + webdataset) and runs
# every test, then the deploy checks (scripts/test-deploy.sh) and, when their
# builds are cached, the GPU build up to its link (scripts/test-cuda-build.sh)
# and the chart on a real cluster (scripts/test-cluster.sh).
#
#   scripts/test.sh [extra cargo test args]
#
# Idempotent and quick once everything is installed. Tools are cached under
# ~/.cache/quire-tools; set CARGO_TARGET_DIR to keep builds elsewhere.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

# pdftotext: the independent extractor the text-layer tests compare with.
if ! command -v pdftotext >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq poppler-utils >/dev/null
  else
    echo "scripts/test.sh: pdftotext is missing; install poppler-utils" >&2
    exit 1
  fi
fi

tools="${QUIRE_TOOLS:-$HOME/.cache/quire-tools}"
export QUIRE_PDFIUM="${QUIRE_PDFIUM:-$(scripts/setup-pdfium.sh "$tools/pdfium")}"
# pyarrow and webdataset, pinned: the tests read the caption datasets back with them.
if [ "${QUIRE_SKIP_PYTHON_READERS:-}" != 1 ]; then
  export QUIRE_PYTHON="${QUIRE_PYTHON:-$(scripts/setup-python-readers.sh "$tools/py-readers")}"
fi
if [ -x scripts/install-services.sh ]; then
  eval "$(scripts/install-services.sh)"
fi

# A long-lived target folder (CI keeps one between runs) is pruned of stale
# test binaries before the build, so that it cannot fill the disk.
target="${CARGO_TARGET_DIR:-$root/target}"
bash scripts/prune-target.sh "$target"
# Cargo names the build units of this workspace's crates by their path inside
# the workspace, so two checkouts sharing a target folder (CI's clean clone and
# a working copy) write the same files, and sources older than the other
# checkout's build look fresh: the tests would run the other checkout's code.
# When the last build here came from another checkout, our crates are cleaned.
marker="$target/.quire-checkout"
if [ -f "$marker" ] && [ "$(cat "$marker")" != "$root" ]; then
  echo "scripts/test.sh: $target was last built from $(cat "$marker"); rebuilding this checkout's crates" >&2
  cargo clean -q $(sed -n 's/^name = "\(quire[a-z-]*\)"$/-p \1/p' crates/*/Cargo.toml | sort -u)
fi
mkdir -p "$target" && printf '%s\n' "$root" >"$marker"
cargo test --workspace "$@"
# Lints: the workspace's [workspace.lints] and clippy's defaults, every warning an error.
if ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add clippy
fi
cargo clippy --workspace --all-targets -- -D warnings
# Then deploy/ and helm/quire/: linters, chart checks, and the CPU image built
# around the binary cargo test just built, run with buildah (QUIRE_DEPLOY_CHECKS=0 skips them).
if [ "${QUIRE_DEPLOY_CHECKS:-1}" != 0 ]; then
  bash scripts/test-deploy.sh
  # Then the GPU image's build up to its link (scripts/test-cuda-build.sh: CUDA 13.0 wheels,
  # `cargo build -p quire --features cuda` against the generated libcuda stub, the NEEDED
  # libcuda.so.1 check), when its toolkit and build are cached: cold, it is a second
  # build of all of quire's dependencies plus candle's CUDA kernels in its own target folder,
  # too much beside a cold run of everything else in CI's time. Warm, it rebuilds only what
  # changed. Skipped loudly otherwise; QUIRE_CUDA_CHECKS=0 skips it on purpose.
  if [ "${QUIRE_CUDA_CHECKS:-1}" = 0 ]; then
    echo "=================================================================================" >&2
    echo "scripts/test.sh: SKIPPED the GPU build (scripts/test-cuda-build.sh): QUIRE_CUDA_CHECKS=0." >&2
    echo "=================================================================================" >&2
  elif bash scripts/test-cuda-build.sh --cached; then
    bash scripts/test-cuda-build.sh
  else
    echo "=================================================================================" >&2
    echo "scripts/test.sh: SKIPPED the GPU build (scripts/test-cuda-build.sh): its CUDA wheels and" >&2
    echo "build are not cached (${QUIRE_TOOLS:-\$HOME/.cache/quire-tools}/cuda, ${QUIRE_CUDA_TARGET_DIR:-\$HOME/.cache/quire-target-cuda})." >&2
    echo "Build them once with: scripts/test-cuda-build.sh   (then rerun the tests)" >&2
    echo "=================================================================================" >&2
  fi
  # Then the chart on a real single-node Kubernetes (scripts/test-cluster.sh, needs root, 4 to 5
  # minutes warm), when its binaries are cached: building them takes 10+ minutes and 5 GB of Go
  # build cache, more than a cold CI machine has to spare. Skipped loudly otherwise;
  # QUIRE_CLUSTER_CHECKS=0 skips it on purpose.
  if [ "${QUIRE_CLUSTER_CHECKS:-1}" = 0 ]; then
    echo "=================================================================================" >&2
    echo "scripts/test.sh: SKIPPED the cluster test (scripts/test-cluster.sh): QUIRE_CLUSTER_CHECKS=0." >&2
    echo "=================================================================================" >&2
  elif [ "$(id -u)" = 0 ] && bash scripts/test-cluster.sh --cached; then
    bash scripts/test-cluster.sh
  else
    echo "=================================================================================" >&2
    echo "scripts/test.sh: SKIPPED the cluster test (scripts/test-cluster.sh): it needs root and" >&2
    echo "the Kubernetes binaries cached under ${QUIRE_TOOLS:-\$HOME/.cache/quire-tools}/k8s." >&2
    echo "Build them once with: scripts/test-cluster.sh --build   (then rerun the tests)" >&2
    echo "=================================================================================" >&2
  fi
fi
