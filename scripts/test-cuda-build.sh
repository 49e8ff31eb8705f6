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
#      and the stub (no LD_PRELOAD);
#   4. the GPU image: target runtime-prebuilt of deploy/Dockerfile.cuda, built
#      with buildah on scripts/test-deploy.sh's Debian base (run that first;
#      scripts/test.sh does) around this binary without its debug info,
#      libpdfium and the CUDA libraries the builder stage ships
#      (deploy/cuda-toolkit.sh --runtime-libs); then inside it as uid 65532,
#      with the stub mounted where the NVIDIA container toolkit mounts the
#      driver's libcuda.so.1: every library resolves, `quire --version` runs,
#      and a VLM run on --device cuda ends with quire's message naming the stub
#      (a GPU node without the toolkit's mounts), not a crash. --no-image skips it.
# Prints the time each step took.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

tools="${QUIRE_TOOLS:-$HOME/.cache/quire-tools}/cuda"
target="${QUIRE_CUDA_TARGET_DIR:-$HOME/.cache/quire-target-cuda}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
bin="$target/debug/quire"

image=1
[ "${1:-}" = --no-image ] && image=0
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

[ "$image" = 1 ] || exit 0
# --- the image ---------------------------------------------------------------
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
deploy_tools="${QUIRE_TOOLS:-$HOME/.cache/quire-tools}/deploy"
run_root="${TMPDIR:-/tmp}/quire-buildah-run-$(id -u)"
b() { buildah --root "$deploy_tools/containers" --runroot "$run_root" --storage-driver vfs "$@"; }
base="localhost/quire-ci-debian:bookworm"
if ! command -v buildah >/dev/null 2>&1 || ! b inspect --type image "$base" >/dev/null 2>&1; then
  echo "scripts/test-cuda-build.sh: buildah or the Debian base $base is missing: run scripts/test-deploy.sh first (or pass --no-image)" >&2
  exit 1
fi
pdfium="${QUIRE_PDFIUM:-$(scripts/setup-pdfium.sh "${QUIRE_TOOLS:-$HOME/.cache/quire-tools}/pdfium")}"
[ -d "$pdfium" ] && pdfium="$pdfium/libpdfium.so"
ctx="$(mktemp -d)" work="$(mktemp -d)" ctr=""
cleanup() {
  if [ -n "$ctr" ]; then b rm "$ctr" >/dev/null 2>&1 || true; fi
  b rmi --prune >/dev/null 2>&1 || true
  rm -rf "$ctx" "$work"
}
trap cleanup EXIT
strip --strip-debug -o "$ctx/quire" "$bin"
cp "$pdfium" "$ctx/libpdfium.so"
bash deploy/cuda-toolkit.sh --runtime-libs "$cuda" "$ctx/cuda"
tag="localhost/quire:ci-cuda"
b bud --quiet --format docker --isolation chroot -f deploy/Dockerfile.cuda --target runtime-prebuilt \
  --build-arg BASE_IMAGE="$base" --build-arg VERSION="$(awk '{print $2}' <<<"$version")" \
  --build-arg REVISION="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  -t "$tag" "$ctx" >/dev/null
step "image $tag built: $(b images --format '{{.Size}}' "$tag" | head -n1)"

# As a GPU Pod runs it: uid 65532, the driver's libcuda.so.1 mounted by the NVIDIA
# container toolkit into /usr/lib/x86_64-linux-gnu (here the stub stands in for it).
cp -r examples "$work/examples"
mkdir -p "$work/run" && chown -R 65532:65532 "$work/run" && chmod -R a+rX "$work/examples"
cp -r tests/fixtures/idefics3/split_sf2_gqa "$work/model" && chmod -R a+rX "$work/model"
ctr="$(b from "$tag")"
in_image=(b run --isolation chroot --user 65532:65532 -v "$cuda/lib/stubs/libcuda.so:/usr/lib/x86_64-linux-gnu/libcuda.so.1:ro"
  -v "$work/examples:/data/examples:ro" -v "$work/model:/data/model:ro" -v "$work/run:/data/run" --workingdir /data/run "$ctr" --)
[ "$("${in_image[@]}" quire --version)" = "$version" ] || { echo "quire --version differs in the image" >&2; exit 1; }
# Every library quire and the CUDA libraries load is in the image (the runtime has no ldd:
# the dynamic loader lists them).
loaded="$("${in_image[@]}" /lib64/ld-linux-x86-64.so.2 --list /usr/local/bin/quire)"
if grep 'not found' <<<"$loaded" >&2; then echo "libraries missing from $tag" >&2; exit 1; fi
for lib in libcuda.so.1 libcublas.so.13 libcurand.so.10; do
  grep -q "$lib => " <<<"$loaded" || { echo "quire in $tag does not load $lib: $loaded" >&2; exit 1; }
done
set +e
out="$("${in_image[@]}" quire run /data/examples/report.pdf --out out --engine vlm --device cuda --model /data/model --quiet 2>&1)"
rc=$?
set -e
echo "$out" >&2
if [ "$rc" = 0 ] || ! grep -q 'cuda:0: cannot open the GPU (.*CUDA_ERROR_STUB_LIBRARY' <<<"$out" || grep -q 'panicked' <<<"$out"; then
  echo "scripts/test-cuda-build.sh: quire run --device cuda in $tag with the stub driver: exit $rc, not quire's message naming the stub" >&2
  exit 1
fi
step "in the image as uid 65532: $version; all libraries resolve; --device cuda on the stub driver: exit $rc with the stub named"
